"""The ``l2l`` command. ``l2l plan``: the runs a profile implies (per experiment/model/dataset and
per claim), which are done, and the remaining device-hours estimated from measured throughput.
Run it from the repository root (params.yaml, claims.yaml, runs/)."""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from l2l.checks import ConfigError
from l2l.claims import Claim, power_table
from l2l.config import Config
from l2l.cost import (LAUNCH_US, SHARE_OF_PEAK, THROUGHPUT_FILE, DeviceEstimate, RunCost, device_estimate, disk_bytes,
                      load_throughput, measured_against, pick_timing, run_costs)
from l2l.devices import DEVICES
from l2l.modes import parse as parse_mode
from l2l.io import read_json
from l2l.selection import load_selection
from l2l.stats import MAX_SEEDS
from l2l.timing import TIMING_FILE

CLAIMS_RESULT = Path("results/claims.json")

GROUP = ("experiment", "method", "model", "dataset")


def _hours(h: float | None) -> str:
    return "-" if h is None else f"{h:,.1f}" if h >= 10 else f"{h:.2f}"


def _sum(costs: list[RunCost]) -> float | None:
    todo = [c.hours for c in costs if not c.done]
    return None if any(h is None for h in todo) else sum(todo)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]


def _pricing(throughput_path: Path, device: str | None, share: float, launch_us: float
             ) -> tuple[object, DeviceEstimate | None]:
    """(the measurement of `device`, None) or, for a GPU nobody measured, (None, its data-sheet estimate)."""
    try:
        return load_throughput(throughput_path, device), None
    except ConfigError as e:
        estimate = device_estimate(device, share, launch_us) if device else None
        if estimate is None:
            raise ConfigError(f"{e}; no data sheet for it either (l2l/devices.py: "
                              + ", ".join(d.key for d in DEVICES) + ")") from None
        return None, estimate


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _needs(costs: list[RunCost], remaining: float | None, what: str) -> list[str]:
    """What the profile takes: downloads, disk, device-hours."""
    d = disk_bytes(costs)
    out = ["", "## What this profile needs", "",
           f"- downloads: {_gb(d['downloads'])} (the original archives of its datasets; data.npz / data.mirror / "
           "data.voc2007.root avoid them)",
           f"- disk: about {_gb(sum(d.values()))}: the archives and their extraction {_gb(d['downloads'] + d['extracted'])}, "
           f"prepared arrays {_gb(d['prepared'])}, runs {_gb(d['runs'])} (final.pt, best.pt and MLflow's copy of "
           "final.pt per run; a run in training keeps two resume states more)"]
    if remaining is not None:
        out.append(f"- {what}: {remaining:,.1f} for the runs remaining (above)")
    return out


def plan_report(config: Config, claims: list[Claim], throughput_path: Path, device: str | None, list_runs: bool,
                claims_path: Path, timing_path: Path = TIMING_FILE, share: float = SHARE_OF_PEAK,
                launch_us: float = LAUNCH_US) -> str:
    profile = config.profile.name
    throughput, estimate = _pricing(throughput_path, device, share, launch_us)
    timing = None if estimate is not None else pick_timing(device, timing_path)
    costs, notes = run_costs(config, throughput, timing=timing, estimate=estimate)
    done = sum(c.done for c in costs)
    papers = "" if config.papers is None else ", papers " + ", ".join(config.papers)
    out = [f"# l2l plan: profile {profile}{papers}", "",
           f"{len(costs)} runs, {done} done, {len(costs) - done} remaining."]
    what = "device-hours"
    if estimate is not None:
        what = f"{estimate.sheet.name} GPU-hours (estimate, not measured)"
        out += _estimate_lines(config, estimate, costs)
    elif timing is not None:
        train_s = sum(timing.seconds(*c.features) for c in costs if not c.done)
        out.append(f"Estimate calibrated per run on {timing.label} ({timing_path}): the train stage's remaining "
                   f"runs {train_s:,.0f} s, plus the evaluate stage's passes in the hours below; one run at a time.")
        m = measured_against(costs, timing)
        out.append("No finished run in runs/ measured on that device to compare with." if m is None else
                   f"Against the {m[0]} finished runs in runs/ measured on it: predicted {m[1]:,.0f} s, measured "
                   f"{m[2]:,.0f} s (x{m[1] / m[2]:.2f}).")
    elif throughput is None:
        out.append(f"No throughput measurement ({throughput_path} missing): no estimate. "
                   "Run benchmarks/gpu_check.py (or benchmarks/throughput.py --json) on the training device.")
    else:
        modes = sorted({c.mode for c in costs if not c.done})
        out.append(f"Estimate from the measurement on {throughput.label} ({throughput_path}): device-hours on that "
                   f"device, not a measurement; each run in the mode the executor gives it (executor.stack_seeds "
                   f"{config.executor['stack_seeds']}: {', '.join(modes) or 'separate'}).")
        if throughput.device == "cuda":
            what = f"{throughput.device_name} GPU-hours"
        if throughput.device != "cuda":
            out.append(f"No GPU measurement in {throughput_path}: these are CPU hours on {throughput.device_name}; "
                       "GPU figures are missing (run benchmarks/gpu_check.py on a GPU: benchmarks/RESULTS.md "
                       "says how).")
    out += [f"Note: {n}" for n in notes] + [""]

    groups: dict[tuple, list[RunCost]] = defaultdict(list)
    for c in costs:
        groups[tuple(getattr(c.spec, k) for k in GROUP)].append(c)
    rows = [[*key, len(g), sum(c.done for c in g), sum(not c.done for c in g), g[0].epochs,
             _hours(g[0].hours), _hours(_sum(g)), g[0].basis] for key, g in groups.items()]
    rows.append(["**total**", "", "", "", len(costs), done, len(costs) - done, "", "", _hours(_sum(costs)), ""])
    out += _table([*GROUP, "runs", "done", "remaining", "epochs/run", "hours/run", "remaining hours", "throughput"],
                  rows)
    out += _needs(costs, _sum(costs), what)
    out += ["", "## Per claim", ""] + _claims(config, claims, costs, claims_path)
    if list_runs:
        out += ["", "## Runs", ""] + _table(["run", *GROUP, "seed", "status", "hours"], [
            [c.spec.hash, *(getattr(c.spec, k) for k in GROUP), c.spec.seed, "done" if c.done else "to do",
             _hours(c.hours)] for c in costs])
    return "\n".join(out)


def _estimate_lines(config: Config, estimate: DeviceEstimate, costs: list[RunCost]) -> list[str]:
    """An unmeasured GPU's estimate: its assumptions, and what stacking would save."""
    todo = [c for c in costs if not c.done]
    separate = sum(c.hours for c in todo)
    stacked = sum(c.stacked[1] if c.stacked else c.hours for c in todo)
    sizes = sorted({c.stacked[0] for c in todo if c.stacked and c.stacked[0] != "separate"},
                   key=lambda m: parse_mode(m).members)
    setting = config.executor["stack_seeds"]
    out = [f"**{estimate.sheet.name}: estimate, not measured** (no measurement of it in benchmarks/throughput.json; "
           "benchmarks/RESULTS.md says how one GPU window measures it). Assumptions:"]
    out += [f"- {a}" for a in estimate.assumptions()]
    out += [f"Under executor.stack_seeds {setting} (what the executor runs on a device with no measured modes: "
            f"{'one run at a time' if setting in ('auto', 'off') else f'stacks of up to {setting}'}): "
            f"**{separate:,.1f} GPU-hours** for the {len(todo)} remaining runs (the table below).",
            f"Stacked where the method allows (conventional, distill, generations, layerwise; the stack size per "
            f"model the estimate finds fastest, of {', '.join(sizes) or 'none'}): **{stacked:,.1f} GPU-hours** "
            f"(x{separate / stacked:.2f}); l2l's {sum(c.spec.method == 'l2l' for c in todo)} runs do not stack "
            "(two dependent updates per batch)." if stacked else ""]
    return out


def _claims(config: Config, claims: list[Claim], costs: list[RunCost], path: Path) -> list[str]:
    profile = config.profile.name
    if not path.exists():
        return [f"No {path}."]
    if not claims:
        return [f"{path} holds no claims yet."]
    rows, trained = [], config.profile.trains()
    for cl in claims:
        arms = {(a.experiment, a.model) for a in cl.arms}
        mine = [c for c in costs if c.spec.dataset == cl.dataset and (c.spec.experiment, c.spec.model) in arms]
        label = ", ".join(a.label for a in cl.arms)
        absent = [a.label for a in cl.arms if (a.experiment, a.model, cl.dataset) not in trained]
        if absent:  # as the report says: not run, whatever its other arms' runs
            rows.append([cl.id, label, cl.dataset, 0, 0, 0, f"not run: {', '.join(absent)} not in profile {profile}"])
            continue
        n_done = sum(c.done for c in mine)
        rows.append([cl.id, label, cl.dataset, len(mine), n_done, len(mine) - n_done, _hours(_sum(mine))])
    return ["A run serving several claims counts in each.", ""] + _table(
        ["claim", "arms", "dataset", "runs", "done", "remaining", "remaining hours"], rows) + \
        ["", "## Power per claim", ""] + _power(config, claims)


def _power(config: Config, claims: list) -> list[str]:
    st, profile = config.stats, config.profile.name
    measured = {}
    if CLAIMS_RESULT.exists():  # once runs exist: the measured sd of each claim's tested quantity
        done = read_json(CLAIMS_RESULT)
        if done.get("profile") == profile:
            measured = {r["id"]: (r.get("comparison") or {}).get("sd") for r in done["claims"]}
    rows = [[r["claim"], f"{r['family']} ({r['family_tests']})", r["kind"], r["seeds"],
             "-" if r["effect"] is None else f"{r['effect']:g}",
             f"{r['sd']:.2f}" + (" (measured)" if r["sd_source"] == "measured" else ""),
             "-" if r["power"] is None else f"{'>= ' if r['power_how'] == 'lower bound' else ''}{100 * r['power']:.0f}%",
             r["seeds_for_80"] or f"> {MAX_SEEDS}"] for r in power_table(config, claims, measured)]
    return [f"Power of the full verdict rule (l2l/stats.py) at each claim's effect of interest (superiority: the "
            f"paper's difference or min_effect; equivalence / reported value: truly equal, against the margin / "
            f"tolerance), between-seed sd stats.planning_sd = {st['planning_sd']} points per run (x sqrt 2 for a "
            f"difference) or, where {CLAIMS_RESULT} has the claim, its measured sd; each test at its family's first Holm level alpha/m (alpha {st['alpha']}).", ""] + _table(
        ["claim", "family (tests)", "kind", "seeds per arm", "effect / bound", "sd", "power", "seeds for 80%"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="l2l", description="l2l-bench tools (run from the repository root)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="runs of a profile per experiment and per claim, done/remaining, "
                                    "estimated device-hours")
    p.add_argument("--profile", help="a profile of params.yaml (default: run.yaml's profile)")
    p.add_argument("--papers", type=lambda v: v if v == "all" else v.split(","),
                   help="all, or paper ids of claims.yaml, comma-separated (e.g. P3 or P3,P5): only the runs their "
                        "claims need (default: run.yaml's papers)")
    p.add_argument("--device", help="use the throughput measured on this device (part of its name, e.g. H100); "
                                    "a GPU not measured but listed in l2l/devices.py is estimated from its data "
                                    "sheet (marked 'estimate, not measured'); default: a GPU's measurement if any")
    p.add_argument("--share", type=float, default=SHARE_OF_PEAK,
                   help=f"an estimate's share of the data sheet's peak (default {SHARE_OF_PEAK})")
    p.add_argument("--launch-us", type=float, default=LAUNCH_US,
                   help=f"an estimate's seconds per kernel launch, in microseconds (default {LAUNCH_US})")
    p.add_argument("--throughput", type=Path, default=THROUGHPUT_FILE)
    p.add_argument("--timing", type=Path, default=TIMING_FILE,
                   help="per-run calibrations (benchmarks/run_timing.py); the device's is used where there is one")
    p.add_argument("--claims", type=Path, default=Path("claims.yaml"))
    p.add_argument("--runs", action="store_true", help="list every run with its status")
    args = parser.parse_args(argv)
    try:
        config, claims = load_selection(claims_path=args.claims, profile=args.profile, papers=args.papers)
        print(plan_report(config, claims, args.throughput, args.device, args.runs, args.claims, args.timing,
                          args.share, args.launch_us))
    except ConfigError as e:
        print(f"l2l: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

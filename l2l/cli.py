"""The ``l2l`` command. ``l2l plan``: the runs a profile implies (per experiment/model/dataset and
per claim), which are done, the remaining device-hours estimated from measured throughput, and the
sequential design's expected seeds and hours per claim. ``l2l adapt``: run the design's looks
(l2l.adapt). Run it from the repository root (params.yaml, claims.yaml, runs/)."""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from l2l.adapt import adapt
from l2l.checks import ConfigError
from l2l.claims import Claim, power_table
from l2l.config import Config
from l2l.cost import (LAUNCH_US, SHARE_OF_PEAK, THROUGHPUT_FILE, DeviceEstimate, RunCost, device_estimate, disk_bytes,
                      load_throughput, measured_against, pick_timing, run_costs)
from l2l.devices import DEVICES
from l2l.modes import parse as parse_mode
from l2l.io import read_json
from l2l.looks import sequential_design
from l2l.selection import load_selection
from l2l.simulate import expected
from l2l.stats import MAX_SEEDS, SPENDING
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
                launch_us: float = LAUNCH_US, spending: str | None = None) -> str:
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
    if spending is not None:  # another spending function than params.yaml's, to compare designs
        config = replace(config, stats={**config.stats, "sequential": {**config.stats["sequential"], "spending": spending}})
    out += ["", "## The sequential design: seeds and hours to a verdict", ""] + sequential_table(config, claims, costs)
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


SDS = (0.2, 1.0)  # between-seed sds per run that the design is priced at, with stats.planning_sd between


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def sequential_table(config: Config, claims: list[Claim], costs: list[RunCost], replicates: int = 200) -> list[str]:
    """Per claim and per paper's primary claims: the sequential design's power, expected and maximum seeds
    per arm and device-hours at between-seed sd 0.2 / stats.planning_sd / 1.0 per run, against the fixed
    plan's seeds, hours and power (l2l.simulate: the real rule simulated, the effect of interest)."""
    try:
        design = sequential_design(config)
    except ConfigError as e:
        return [f"No sequential design: {e}"]
    sds = sorted({SDS[0], config.stats["planning_sd"], SDS[1]})
    sim = expected(config, claims, design, sds, replicates)
    if not sim:
        return ["No claim has its arms in this profile."]
    per_run: dict[tuple, list[float | None]] = defaultdict(list)
    for c in costs:
        per_run[(c.spec.experiment, c.spec.model, c.spec.dataset)].append(c.hours)
    hours = {g: None if any(h is None for h in v) else float(np.mean(v)) for g, v in per_run.items()}
    by_id = {c.id: c for c in claims}

    def groups(cl: Claim) -> list[tuple]:  # a run counts once per claim (arms may be phases of one run)
        return list(dict.fromkeys((a.experiment, a.model, cl.dataset) for a in cl.arms))

    def cost(gs: list[tuple], seeds) -> float | None:
        hs = [hours.get(g) for g in gs]
        return None if any(h is None for h in hs) else float(np.mean(sum(h * seeds[g] for g, h in zip(gs, hs))))

    fixed_seeds = {g: len(config.profile.seeds_of(g)) for g in hours}
    head = [f"The design: {design.text()}; alpha {config.stats['alpha']} per family over all looks "
            f"(l2l.stats.VERDICT_RULE). Simulated through the rule ({replicates} replicates per family and sd, "
            "normal seeds, every claim at its effect of interest): power = supported; seeds = per arm at the "
            "stop, mean (the cap is the most); hours = its arms' runs at those seeds priced as the rows above "
            "(a run serving several claims counts in each). Fixed: today's plan (params.yaml seeds, one look) "
            "through the same rule. A difference of two runs has sqrt 2 x the sd per run.", ""]
    rows = []
    for cid, r in sim.items():
        cl = by_id[cid]
        gs = groups(cl)
        cells = [cid, f"{r['family']} ({r['family_tests']})", r["fixed_seeds"],
                 _hours(cost(gs, {g: fixed_seeds.get(g, r["fixed_seeds"]) for g in gs})),
                 " / ".join(_pct(r[sd]["fixed_power"]) for sd in sds)]
        for sd in sds:
            hours_sd = _hours(cost(gs, dict.fromkeys(gs, r[sd]["seeds"])))
            cells.append(f"{_pct(r[sd]['power'])}, {r[sd]['seeds']:.1f}, {hours_sd}")
        cells += [design.cap, _hours(cost(gs, dict.fromkeys(gs, design.cap)))]
        rows.append(cells)
    sd_head = [f"sd {sd:g}: power, seeds, hours" for sd in sds]
    out = head + _table(["claim", "family (tests)", "fixed seeds", "fixed hours",
                         "fixed power (sd " + " / ".join(f"{sd:g}" for sd in sds) + ")", *sd_head,
                         "max seeds", "max hours"], rows)
    out += ["", "Per paper, its primary claims together (a run counts once: a group's seeds are the most any of "
            "the paper's primary claims took in that replicate; power: the mean over its primary claims):", ""]
    rows = []
    for paper in dict.fromkeys(by_id[cid].paper for cid in sim):
        prim = [cid for cid in sim if by_id[cid].paper == paper and by_id[cid].role == "primary"]
        if not prim:
            continue
        gs = list(dict.fromkeys(g for cid in prim for g in groups(by_id[cid])))
        fixed_h = cost(gs, {g: fixed_seeds.get(g, 0) for g in gs})
        cells = [paper, len(prim), _hours(fixed_h)]
        for sd in sds:
            draws = {g: np.max([sim[cid][sd]["draws"] for cid in prim if g in groups(by_id[cid])], 0) for g in gs}
            cells.append(f"{np.mean([sim[cid][sd]['seeds'] for cid in prim]):.1f}, {_hours(cost(gs, draws))}, "
                         f"{_pct(float(np.mean([sim[cid][sd]['fixed_power'] for cid in prim])))} fixed, "
                         f"{_pct(float(np.mean([sim[cid][sd]['power'] for cid in prim])))} sequential")
        cells.append(_hours(cost(gs, dict.fromkeys(gs, design.cap))))
        rows.append(cells)
    return out + _table(["paper", "primary claims", "fixed hours",
                         *(f"sd {sd:g}: seeds per arm, hours, mean power" for sd in sds), "max hours"], rows)


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
    p.add_argument("--spending", choices=SPENDING, help="the sequential design's spending function for its table "
                                                         "(default: params.yaml stats.sequential.spending)")
    a = sub.add_parser("adapt", help="run the sequential design's looks (each a dvc exp run) until every claim "
                                     "has stopped or the budget is spent")
    a.add_argument("--budget-hours", type=float, required=True,
                   help="device-hours (l2l plan's estimate) the runs of this call's looks may take in all")
    a.add_argument("--profile", help="a profile of params.yaml (default: run.yaml's profile)")
    a.add_argument("--papers", type=lambda v: v if v == "all" else v.split(","),
                   help="all, or paper ids, comma-separated (default: run.yaml's papers)")
    a.add_argument("--device", help="price runs at this device's calibration or throughput (as l2l plan)")
    a.add_argument("--dry-run", action="store_true", help="print the next look's dvc exp run and stop")
    args = parser.parse_args(argv)
    try:
        if args.command == "adapt":
            sys.exit(adapt(args.budget_hours, args.profile, args.papers, args.dry_run, device=args.device))
        config, claims = load_selection(claims_path=args.claims, profile=args.profile, papers=args.papers)
        print(plan_report(config, claims, args.throughput, args.device, args.runs, args.claims, args.timing,
                          args.share, args.launch_us, args.spending))
    except ConfigError as e:
        print(f"l2l: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

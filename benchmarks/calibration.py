"""The verdict rule's measured error rates, power, seeds and interval coverage, with the sequential
design (run on demand; the report of each profile prints its rows).

Every family of a profile's claims (the claims it trains) goes through the real procedure,
l2l.simulate.simulate: per-seed values per arm, the failed-run rule (l2l.claims.failed_mask), each
look's t statistics, the kinds' tests, l2l.stats.run_family (Lan-DeMets spending over the looks of
params stats.sequential, Holm's sharing over the family, futility) and the intervals the report
prints. Conditions: between-seed sd 0.2 / stats.planning_sd / 1.0 per run with normal seeds; t noise
(3 degrees of freedom) at the planning sd; one failed run per claim (seed 0 of its first arm: finite,
5 points low, its training accuracy below the floor) with the rule, and the same run kept without it.

- family-wise false supported: every claim of the family false at its supporting boundary (no effect;
  a difference at the margin; our mean off by the tolerance; a saturation gap at min_effect with the
  gain at the threshold): the share of replicates with any claim supported; family-wise false
  contradicted: every claim true at its contradicting boundary (the effect at min_effect; the
  difference at the margin; our mean off by the tolerance; gap at min_effect, gain at the threshold):
  any claim contradicted. Both at most alpha (+ 3 Monte Carlo s.e.).
- worst case per claim (each kind of each family): one claim at its boundary while every other claim
  of its family is decided at once the other way (50 sds beyond), so that Holm passes it the whole of
  alpha: its false supported / false contradicted rate.
- reported values at 0.5 and 0.9 x the tolerance off (the others at their effect): contradicted
  (at most alpha: the difference is inside the tolerance) and supported.
- power: every claim at its effect of interest, supported; seeds per arm at the stop (mean; the cap is
  the most); coverage: the reported 95% interval (repeated over looks) at the stop holding the truth;
  agreement: the decision interval shows what the verdict says (always, by construction: checked).

Writes benchmarks/calibration.json keyed by profile and prints Markdown tables (also the text of
benchmarks/RESULTS.md's calibration section).

    python benchmarks/calibration.py --profile paper --replicates 400
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from l2l import stats  # noqa: E402
from l2l.claims import Claim, failed_rule, load_claims  # noqa: E402
from l2l.config import Config, load_config  # noqa: E402
from l2l.io import read_json, write_json  # noqa: E402
from l2l.looks import sequential_design  # noqa: E402
from l2l.simulate import Member, families, simulate, strong, truth  # noqa: E402

OUT = REPO / "benchmarks" / "calibration.json"


def conditions(planning_sd: float) -> list[dict]:
    """The noise conditions: (name, sd, noise, failed)."""
    out = [{"name": f"sd {sd:g}", "sd": sd, "noise": "normal", "failed": ""} for sd in sorted({0.2, planning_sd, 1.0})]
    out += [{"name": f"sd {planning_sd:g}, t3 noise", "sd": planning_sd, "noise": "t3", "failed": ""},
            {"name": f"sd {planning_sd:g}, one failed run (rule)", "sd": planning_sd, "noise": "normal",
             "failed": "rule"}]
    return out


def _rate(x: np.ndarray) -> tuple[float, float]:
    """Mean of per-replicate values and its Monte Carlo s.e., floored at that of one event in R (a rate of
    0 is not exact)."""
    x = np.asarray(x, dtype=float)
    n = x.shape[0]
    se = float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return float(np.mean(x)), max(se, math.sqrt(1 - 1 / n) / n)  # one event in n: sqrt(p (1 - p) / n), p = 1/n


def _with(members: list[Member], target: int, t: dict, others: dict | None) -> list[Member]:
    """The family with member `target` at truth t and the others at `others` (a function of the claim)."""
    return [Member(m.claim, m.n, t if i == target else (others(m.claim) if others else None))  # type: ignore[misc]
            for i, m in enumerate(members)]


def calibrate(config: Config, replicates: int, seed: int = 0, claims: list[Claim] | None = None) -> dict:
    """Rows for the active profile: "families" (family-wise rates per condition), "kinds" (per kind of
    each family: worst case per claim, power, seeds, coverage per condition), "reported" (offsets)."""
    st = config.stats
    alpha, psd, rule = st["alpha"], st["planning_sd"], failed_rule(config)
    design = sequential_design(config)
    rng = np.random.default_rng(seed)
    fams = families(config, claims if claims is not None else load_claims(config))
    conds = conditions(psd)
    fam_rows, kind_rows, reported_rows = [], [], []
    for fam, members in fams.items():
        m = len(members)

        def run(ms: list[Member], scenario: str, sd: float = psd, noise: str = "normal", failed: str = ""):
            return simulate(ms, design, alpha, sd, scenario, replicates, rng, noise, failed, rule)

        kinds: dict[str, list[int]] = {}
        for i, mem in enumerate(members):
            kinds.setdefault(mem.claim.kind, []).append(i)
        power: dict[str, dict] = {k: {} for k in kinds}
        for cond in conds:
            null = run(members, "null", cond["sd"], cond["noise"], cond["failed"])
            true = run(members, "true", cond["sd"], cond["noise"], cond["failed"])
            eff = run(members, "effect", cond["sd"], cond["noise"], cond["failed"])
            fs, fs_se = _rate((null.code == stats.SUPPORTED).any(1).astype(float))
            fc, fc_se = _rate((true.code == stats.CONTRADICTED).any(1).astype(float))
            fam_rows.append({"family": fam, "family_tests": m, "condition": cond["name"], "fw_false_supported": fs,
                             "fw_false_supported_se": fs_se, "fw_false_contradicted": fc,
                             "fw_false_contradicted_se": fc_se})
            for kind, idx in kinds.items():
                cell = {}
                for key, x in (("power", eff.code[:, idx] == stats.SUPPORTED), ("seeds", eff.seeds[:, idx]),
                               ("coverage", eff.covered[:, idx]), ("agrees", np.concatenate(
                                   [o.agrees[:, idx] for o in (null, true, eff)], 0))):
                    cell[key], cell[key + "_se"] = _rate(np.asarray(x, dtype=float).mean(1))
                power[kind][cond["name"]] = cell
        kept = run(members, "effect", psd, "normal", "kept")  # the failed run kept: what the rule buys
        for kind, idx in kinds.items():
            i = idx[0]
            claim = members[i].claim
            ws = run(_with(members, i, truth(claim, "null"), lambda c: strong(c, "supported")), "null")
            wc = run(_with(members, i, truth(claim, "true"), lambda c: strong(c, "contradicted")), "true")
            row = {"family": fam, "family_tests": m, "kind": kind, "claims": len(idx), "claim": claim.id,
                   "boundary": _boundary(claim), "cap": design.cap, "by_condition": power[kind]}
            row["worst_false_supported"], row["worst_false_supported_se"] = _rate(
                (ws.code[:, i] == stats.SUPPORTED).astype(float))
            row["worst_false_contradicted"], row["worst_false_contradicted_se"] = _rate(
                (wc.code[:, i] == stats.CONTRADICTED).astype(float))
            row["power_failed_kept"], row["power_failed_kept_se"] = _rate(
                (kept.code[:, idx] == stats.SUPPORTED).mean(1).astype(float))
            kind_rows.append(row)
            if kind == "reported_value":
                for share in (0.5, 0.9):
                    t = {"diff": share * float(claim.tolerance)}  # type: ignore[arg-type]
                    o = run(_with(members, i, t, lambda c: truth(c, "effect")), "effect")
                    r = {"family": fam, "claim": claim.id, "tolerance": claim.tolerance, "offset_share": share}
                    for key, code in (("contradicted", stats.CONTRADICTED), ("supported", stats.SUPPORTED)):
                        r[key], r[key + "_se"] = _rate((o.code[:, i] == code).astype(float))
                    # the worst case: the rest of the family decided at once, the whole alpha on this claim
                    o = run(_with(members, i, t, lambda c: strong(c, "contradicted")), "effect")
                    r["worst_contradicted"], r["worst_contradicted_se"] = _rate(
                        (o.code[:, i] == stats.CONTRADICTED).astype(float))
                    reported_rows.append(r)
    return {"families": fam_rows, "kinds": kind_rows, "reported": reported_rows,
            "conditions": [c["name"] for c in conds]}


def _boundary(c: Claim) -> str:
    if c.kind in ("equivalence", "cost_equivalence"):
        return f"margin {c.margin:g}"
    if c.kind == "reported_value":
        return f"tolerance {c.tolerance:g}"
    if c.kind in ("saturation", "rise_then_plateau"):
        return f"min_effect {c.min_effect:g}, threshold {c.extra['threshold']:g}"
    return f"0 and min_effect {c.min_effect:g}" if c.min_effect is not None else "0"


def _pct(x: float, se: float) -> str:
    return f"{100 * x:.1f} ± {100 * se:.1f}%"


def markdown(doc: dict) -> str:
    """The profile's tables: family-wise rates, per kind, reported values off by part of the tolerance."""
    out = ["| family (tests) | condition | family-wise false supported | family-wise false contradicted |",
           "|---|---|---|---|"]
    out += [f"| {r['family']} ({r['family_tests']}) | {r['condition']} | "
            f"{_pct(r['fw_false_supported'], r['fw_false_supported_se'])} | "
            f"{_pct(r['fw_false_contradicted'], r['fw_false_contradicted_se'])} |" for r in doc["families"]]
    conds = doc["conditions"]
    out += ["", "| family | kind (claims) | boundary | worst case per claim: false supported / false contradicted | "
            + " | ".join(f"{c}: power, seeds, coverage" for c in conds) + " | failed run kept: power |",
            "|" + "---|" * (5 + len(conds))]
    for r in doc["kinds"]:
        cells = [f"{100 * r['by_condition'][c]['power']:.0f}%, {r['by_condition'][c]['seeds']:.1f}, "
                 f"{100 * r['by_condition'][c]['coverage']:.1f}%" for c in conds]
        out.append(f"| {r['family']} ({r['family_tests']}) | {r['kind']} ({r['claims']}) | {r['boundary']} | "
                   f"{_pct(r['worst_false_supported'], r['worst_false_supported_se'])} / "
                   f"{_pct(r['worst_false_contradicted'], r['worst_false_contradicted_se'])} | " + " | ".join(cells)
                   + f" | {100 * r['power_failed_kept']:.0f}% |")
    if doc["reported"]:
        out += ["", "| family | claim | our mean off by | contradicted | worst case contradicted | supported |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['family']} | {r['claim']} | {r['offset_share']:g} x tolerance "
                f"({r['offset_share'] * r['tolerance']:g}) | {_pct(r['contradicted'], r['contradicted_se'])} | "
                f"{_pct(r['worst_contradicted'], r['worst_contradicted_se'])} | "
                f"{_pct(r['supported'], r['supported_se'])} |" for r in doc["reported"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--replicates", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    config = load_config(REPO / "params.yaml", args.profile, run=None)  # the shipped configuration
    started = time.perf_counter()
    rows = calibrate(config, args.replicates, args.seed, load_claims(config, REPO / "claims.yaml"))
    st = config.stats
    design = sequential_design(config)
    doc = read_json(OUT) if OUT.exists() else {}
    doc[args.profile] = {"replicates": args.replicates, "seed": args.seed, "alpha": st["alpha"],
                         "planning_sd": st["planning_sd"], "min_seeds": st["min_seeds"], "design": design.text(),
                         "failed_run": failed_rule(config), **rows}
    write_json(OUT, doc)
    print(f"profile {args.profile}: {args.replicates} replicates per cell, alpha {st['alpha']}, {design.text()}; "
          f"{time.perf_counter() - started:.0f} s\n")
    print(markdown(doc[args.profile]))


if __name__ == "__main__":
    main()

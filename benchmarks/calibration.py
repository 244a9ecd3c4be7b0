"""The verdict rule's measured error rates, power and interval coverage (run on demand).

Simulates every family of a profile's claims (the claims it trains, with their planned seeds per
arm and family sizes) through the REAL rule: the comparison functions the claims stage uses
(l2l.claims.compare_values; l2l.stats.compare_saturation / compare_superiority for P2's kinds,
compare_rise_then_plateau and compare_cost_equivalence for P4's and P5's) and
l2l.claims.decide (Holm within each family, l2l.stats.verdict). Per-seed values are normal with
the between-seed sd stats.planning_sd per run. Each replicate draws the whole family under one
scenario, applied to every claim of it:

- null: each claim false at its boundary: superiority/early_overfit/ordering steps diff 0,
  equivalence diff = margin, reported value offset = tolerance, saturation gap = min_effect with
  the last-stage gain = threshold (rise_then_plateau alike: rise = min_effect, gain after it =
  threshold), cost_equivalence diff = margin with its cost ratios clearly below their maxima
  (tests/test_teacher_claims.py measures the ratio-at-its-maximum boundary) -> rate of "supported"
  (false supported);
- true: each claim true at the edge of what its contradicting test rejects: superiority/ordering
  steps diff = min_effect (or the effect of interest), equivalence diff = margin, reported value
  offset 0, saturation gap = min_effect with gain = threshold -> rate of "contradicted";
- effect: the effect of interest: superiority diff = it, equivalence diff 0, reported value
  offset 0, saturation gain 0 -> rate of "supported" (power) and coverage of the 95% t-interval.

Rates are averaged over a family's claims of the same kind and seed count; Monte Carlo standard
errors come from the spread over replicates. Writes benchmarks/calibration.json keyed by profile
(the report reads its profile's rows) and prints a Markdown table.

    python benchmarks/calibration.py --profile paper --replicates 400
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from l2l import stats  # noqa: E402
from l2l.claims import Claim, compare_values, decide, effect_of_interest, load_claims, profile_claims  # noqa: E402
from l2l.config import Config, load_config  # noqa: E402
from l2l.io import read_json, write_json  # noqa: E402

OUT = REPO / "benchmarks" / "calibration.json"
SCENARIOS = ("null", "true", "effect")
COLUMNS = ("false_supported", "false_contradicted", "power", "coverage")


def _truth(claim: Claim, scenario: str) -> dict:
    """The simulated truth of a claim: diff (per step for an ordering) and, for saturation, the gain."""
    eoi = effect_of_interest(claim)
    edge = claim.min_effect if claim.min_effect is not None else eoi
    if claim.kind in ("equivalence", "cost_equivalence"):
        return {"diff": 0.0 if scenario == "effect" else claim.margin}
    if claim.kind == "reported_value":
        return {"diff": claim.tolerance if scenario == "null" else 0.0}
    if claim.kind in ("saturation", "rise_then_plateau"):
        return {"diff": claim.min_effect, "gain": 0.0 if scenario == "effect" else claim.extra["threshold"]}
    return {"diff": 0.0 if scenario == "null" else edge if scenario == "true" else eoi}


def _simulate(claim: Claim, n: int, sd: float, truth: dict, alpha: float,
              rng: np.random.Generator) -> tuple[stats.Comparison, float]:
    """One claim's comparison on simulated seeds -> (comparison, the true value its interval estimates)."""
    seeds = range(n)

    def arm(mean: float, spread: float = sd) -> dict:
        return dict(zip(seeds, mean + rng.normal(0, spread, n)))

    d = float(truth["diff"])
    if claim.kind == "saturation":
        comp = stats.compare_saturation(arm(d), arm(0.0), arm(truth["gain"], sd * math.sqrt(2)),
                                        threshold=float(claim.extra["threshold"]), min_effect=claim.min_effect,
                                        alpha=alpha)
        return comp, d
    if claim.kind == "rise_then_plateau":  # start 0, peak d, end = peak + gain
        start = arm(0.0, sd / math.sqrt(2))
        peak = {s: v + d + rng.normal(0, sd) for s, v in start.items()}
        end = {s: v + truth["gain"] + rng.normal(0, sd) for s, v in peak.items()}
        return stats.compare_rise_then_plateau(start, peak, end, threshold=float(claim.extra["threshold"]),
                                               min_effect=claim.min_effect, alpha=alpha), d
    if claim.kind == "cost_equivalence":  # FLOPs ratio equal on every seed, latency ratios noisy, both at half their max
        ratios = {"flops_ratio": dict.fromkeys(seeds, claim.extra["flops_ratio_max"] / 2),
                  "latency_ratio_b1": arm(claim.extra["latency_ratio_max"] / 2, 0.05)}
        maxima = {"flops_ratio": claim.extra["flops_ratio_max"], "latency_ratio_b1": claim.extra["latency_ratio_max"]}
        return stats.compare_cost_equivalence(arm(d), arm(0.0), ratios, maxima, margin=claim.margin, alpha=alpha), d
    if claim.kind == "early_overfit":  # what layerwise_analysis.early_overfit_check compares
        return stats.compare_superiority(arm(d), arm(0.0), alpha=alpha, min_effect=claim.min_effect), d
    if claim.kind == "reported_value":
        r = float(claim.reported["value"])
        return compare_values(claim, {"a": arm(r + d)}, alpha)[0], r + d
    if claim.kind == "ordering":
        vals = {a.name: arm(i * d) for i, a in enumerate(claim.arms)}
        return compare_values(claim, vals, alpha)[0], d * (len(claim.arms) - 1)
    return compare_values(claim, {"a": arm(d), "b": arm(0.0)}, alpha)[0], d


def calibrate(config: Config, replicates: int, seed: int = 0, claims: list[Claim] | None = None) -> list[dict]:
    """Rows (family, kind, seeds) of the active profile with each rate and its Monte Carlo standard error."""
    st = config.stats
    alpha, sd = st["alpha"], st["planning_sd"]
    planned = profile_claims(config.profile, claims if claims is not None else load_claims(config))
    families: dict[str, list[tuple[Claim, int]]] = {}
    for c, n, _ in planned:
        families.setdefault(c.family_key, []).append((c, n))
    rng = np.random.default_rng(seed)
    rows = []
    for fam, members in families.items():
        fam_claims = [c for c, _ in members]
        groups: dict[tuple, list[int]] = {}
        for i, (c, n) in enumerate(members):
            groups.setdefault((c.kind, n), []).append(i)
        # hits[scenario][group] = per-replicate share of the group's claims with the event
        hits = {k: {g: np.zeros(replicates) for g in groups} for k in COLUMNS}
        for scenario in SCENARIOS:
            for r in range(replicates):
                sims = [_simulate(c, n, sd, _truth(c, scenario), alpha, rng)
                        for c, n in members]
                verdicts = decide(fam_claims, [s[0] for s in sims], alpha, st["min_seeds"], power=False)
                for g, idx in groups.items():
                    v = [verdicts[i]["verdict"] for i in idx]  # type: ignore[index]
                    if scenario == "null":
                        hits["false_supported"][g][r] = np.mean([x == "supported" for x in v])
                    elif scenario == "true":
                        hits["false_contradicted"][g][r] = np.mean([x == "contradicted" for x in v])
                    else:
                        hits["power"][g][r] = np.mean([x == "supported" for x in v])
                        hits["coverage"][g][r] = np.mean([
                            sims[i][0].ci_low <= sims[i][1] <= sims[i][0].ci_high for i in idx])
        for (kind, n), idx in groups.items():
            row = {"family": fam, "family_tests": len(members), "kind": kind, "seeds": n, "claims": len(idx)}
            for k in COLUMNS:
                x = hits[k][(kind, n)]
                row[k], row[k + "_se"] = float(x.mean()), float(x.std(ddof=1) / math.sqrt(replicates))
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| family (tests) | kind | seeds | claims | false supported | false contradicted | power | 95% CI coverage |"
    out = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{100 * r[k]:.1f} ± {100 * r[k + '_se']:.1f}%" for k in COLUMNS]
        out.append(f"| {r['family']} ({r['family_tests']}) | {r['kind']} | {r['seeds']} | {r['claims']} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--replicates", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    config = load_config(REPO / "params.yaml", args.profile, run=None)  # the shipped configuration
    rows = calibrate(config, args.replicates, args.seed, load_claims(config, REPO / "claims.yaml"))
    st = config.stats
    doc = read_json(OUT) if OUT.exists() else {}
    doc[args.profile] = {"replicates": args.replicates, "seed": args.seed, "alpha": st["alpha"],
                         "planning_sd": st["planning_sd"], "min_seeds": st["min_seeds"], "rows": rows}
    write_json(OUT, doc)
    print(f"profile {args.profile}: {args.replicates} replicates per scenario, alpha {st['alpha']}, "
          f"between-seed sd {st['planning_sd']} per run\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()

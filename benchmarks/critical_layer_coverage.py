"""Measured coverage of P2's critical-layer interval at the seeds it is used with (run on demand).

The critical unit of one run is the first unit within the claim's threshold of the full-depth
accuracy (l2l.layerwise_analysis.critical_stage); the report gives the median over seeds with the
order-statistics interval of l2l.stats.median_interval, whose coverage of the population median is
guaranteed (>= its stated level, for any distribution) by the binomial argument. This script
checks that claim through the real functions: per-seed layerwise test-accuracy curves are drawn
around a true curve, with a seed effect that is correlated along depth (AR(1), rho 0.7: a run's
units share their trunk) and sd stats.planning_sd per unit; the population median of the per-seed
critical unit comes from 20,000 simulated seeds; coverage = the share of replicates whose interval
holds it, +- one Monte Carlo standard error.

Curves (13 units, VGG16 per layer; threshold 0.5 points):
- saturating: 80 (1 - exp(-l / 1.5)) + 10 (the mean curve is within 0.5 of its end from unit 6);
- peaked: +5 a unit to unit 6, then -0.3 a unit (later units hurt: critical at 6 or before);
- slow: 0.4 points a unit after unit 4 (each gain below the threshold, together well above);
- rising: 1.5 points a unit to the end (critical unit = the last).

    python benchmarks/critical_layer_coverage.py --replicates 2000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from l2l.layerwise_analysis import critical_stage  # noqa: E402
from l2l.stats import median_interval  # noqa: E402

UNITS = 13
THRESHOLD = 0.5
SD = 0.6  # params.yaml stats.planning_sd
RHO = 0.7
SEEDS = (3, 5, 8, 13)  # min_seeds, the paper profile's P2 seeds (5 per-layer, 8 stage-wise layerwise), 13
POPULATION = 20_000


def true_curve(name: str, units: int = UNITS) -> np.ndarray:
    layer = np.arange(1, units + 1, dtype=float)
    if name == "saturating":
        return 80 * (1 - np.exp(-layer / 1.5)) + 10
    if name == "peaked":
        return 60 + 5 * np.minimum(layer, 6) - 0.3 * np.maximum(layer - 6, 0)
    if name == "slow":
        return 60 + 6 * np.minimum(layer, 4) + 0.4 * np.maximum(layer - 4, 0)
    if name == "rising":
        return 60 + 1.5 * layer
    raise ValueError(f"unknown curve {name!r}")


CURVES = ("saturating", "peaked", "slow", "rising")


def draw_critical(rng: np.random.Generator, curve: np.ndarray, n: int, sd: float = SD, rho: float = RHO) -> np.ndarray:
    """Critical units of n simulated seeds (AR(1) noise along depth, stationary sd `sd`)."""
    noise = np.empty((n, curve.size))
    noise[:, 0] = rng.normal(0, sd, n)
    for j in range(1, curve.size):
        noise[:, j] = rho * noise[:, j - 1] + rng.normal(0, sd * np.sqrt(1 - rho**2), n)
    return np.array([critical_stage(list(c), THRESHOLD) for c in curve + noise])


def coverage(name: str, n: int, replicates: int, seed: int = 0, level: float = 0.95) -> dict:
    """Simulated coverage of the median interval at n seeds for one curve."""
    rng = np.random.default_rng(seed)
    curve = true_curve(name)
    truth = float(np.median(draw_critical(rng, curve, POPULATION)))
    hits, stated = 0, None
    for _ in range(replicates):
        _, low, high, stated = median_interval(draw_critical(rng, curve, n), level)
        hits += low <= truth <= high
    rate = hits / replicates
    return {"curve": name, "seeds": n, "true_median": truth, "stated": stated, "coverage": rate,
            "mc_se": float(np.sqrt(rate * (1 - rate) / replicates))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=2000)
    args = ap.parse_args()
    print(f"| curve | true median critical unit | seeds | stated coverage | simulated coverage ({args.replicates} reps) |")
    print("|---|---|---|---|---|")
    for name in CURVES:
        for n in SEEDS:
            r = coverage(name, n, args.replicates)
            print(f"| {name} | {r['true_median']:g} | {n} | >= {100 * r['stated']:.2f}% | "
                  f"{100 * r['coverage']:.1f} +- {100 * r['mc_se']:.1f}% |")


if __name__ == "__main__":
    main()

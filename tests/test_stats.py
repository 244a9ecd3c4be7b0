"""Tests that the claim statistics and the verdict rule are right, not just that they run.

Simulation tests use fixed numpy seeds (deterministic) and small Monte Carlo sizes; their
tolerances are 3 Monte Carlo standard errors (the issue's acceptance bounds), so a correct rule
passes them by design and a rule off by a few percentage points fails.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from l2l.stats import (VERDICT_RULE, Comparison, Design, LookStats, combine_mcnemar, compare_equivalence,
                       compare_ordering, compare_reported, compare_saturation, compare_superiority, decide_alone,
                       mcnemar_paired, rule_power, run_family, seeds_for_power, tost_power, SUPPORTED)

ALPHA = 0.05


def arm(values, seeds=None) -> dict[int, float]:
    seeds = range(len(values)) if seeds is None else seeds
    return {int(s): float(v) for s, v in zip(seeds, values)}


def decide_one(c: Comparison, m: int = 1, min_seeds: int = 3) -> tuple[str, str]:
    """The verdict of a claim alone in its family, or at the first Holm step of a family of m (one look)."""
    return decide_alone(c, ALPHA / m, min_seeds)


def rate(hits: list[bool]) -> tuple[float, float]:
    p = float(np.mean(hits))
    return p, math.sqrt(max(p * (1 - p), 1e-4) / len(hits))  # s.e. floored so a 0 rate is not exact


def verdict_rate(draw, verdict_name: str, replicates: int = 800) -> tuple[float, float]:
    """(rate, s.e.) of `verdict_name` over `replicates` comparisons drawn by draw()."""
    return rate([decide_one(draw())[0] == verdict_name for _ in range(replicates)])


# ---------------------------------------------------------------- tests and intervals

def test_paired_t_and_interval_match_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(91, 0.6, 5), rng.normal(90, 0.6, 5)
    c = compare_superiority(arm(a), arm(b), min_effect=0.5)
    ref = sps.ttest_rel(a, b, alternative="greater")
    assert c.p_value == pytest.approx(ref.pvalue) and c.paired
    ci = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high))
    assert c.p_contra == pytest.approx(sps.ttest_1samp(a - b, 0.5, alternative="less").pvalue)
    assert decide_one(c)[0] == "supported" and c.adj_ci_low > 0  # alone: p 0.015 < alpha
    # at the first Holm step of a family of 4 (each bound at alpha/4) p 0.015 is not enough, and the
    # decision interval printed beside "inconclusive" holds 0
    assert decide_one(c, m=4)[0] == "inconclusive"
    ci4 = sps.ttest_rel(a, b).confidence_interval(1 - 2 * ALPHA / 4)
    assert (c.adj_ci_low, c.adj_ci_high) == pytest.approx((ci4.low, ci4.high)) and c.adj_ci_low < 0 < c.adj_ci_high


def test_reported_value_is_tost_against_the_tolerance():
    x = arm([90.1, 90.6, 89.9, 90.4, 90.3])
    c = compare_reported(x, 90.0, tolerance=1.0)
    v = np.array(list(x.values()))
    tost = max(sps.ttest_1samp(v, 89.0, alternative="greater").pvalue,
               sps.ttest_1samp(v, 91.0, alternative="less").pvalue)
    assert c.p_value == pytest.approx(tost)
    # contradicting: the difference shown outside the tolerance, one side at a time (Bonferroni over the two)
    assert c.p_contra == pytest.approx(min(1.0, 2 * min(sps.ttest_1samp(v, 91.0, alternative="greater").pvalue,
                                                        sps.ttest_1samp(v, 89.0, alternative="less").pvalue)))
    assert decide_one(c)[0] == "supported"
    # our mean 2 points above the paper's: never supported, here shown more than the tolerance off
    far = compare_reported({s: v + 2.0 for s, v in x.items()}, 90.0, tolerance=1.0)
    v_far, reason = decide_one(far, m=5)
    assert v_far == "contradicted" and "shown more than 1 from the paper's number" in reason
    assert far.adj_ci_low > 91.0  # the printed decision interval lies beyond the tolerance
    # 0.9 points off at a small sd: equality is rejected (the old rule's "contradicted"), the tolerance holds
    near = compare_reported({s: v + 0.9 for s, v in x.items()}, 90.0, tolerance=1.0)
    assert sps.ttest_1samp(v + 0.9, 90.0).pvalue < 0.01 and decide_one(near, m=5)[0] != "contradicted"
    with pytest.raises(ValueError):
        compare_reported(x, 90.0, tolerance=0)


def test_equivalence_tost_and_contradiction():
    a, b = arm([90.0, 90.3, 89.8, 90.1, 90.2]), arm([90.1, 90.0, 90.0, 90.2, 89.9])
    c = compare_equivalence(a, b, margin=1.0)
    d = np.array(list(a.values())) - np.array(list(b.values()))
    assert c.p_value == pytest.approx(max(sps.ttest_1samp(d, -1, alternative="greater").pvalue,
                                          sps.ttest_1samp(d, 1, alternative="less").pvalue))
    assert decide_one(c)[0] == "supported"
    off = compare_equivalence({s: v + 3 for s, v in a.items()}, b, margin=1.0)
    assert decide_one(off)[0] == "contradicted"
    with pytest.raises(ValueError):
        compare_equivalence(a, b, margin=0)


def test_no_meaningful_effect_contradicts_superiority():
    """Zero effect with the family-adjusted upper bound below min_effect: contradicted (was inconclusive)."""
    rng = np.random.default_rng(3)
    b = rng.normal(90, 0.5, 5)
    a = b + rng.normal(0, 0.1, 5)
    c = compare_superiority(arm(a), arm(b), min_effect=0.5)
    v, reason = decide_one(c, m=4)
    assert v == "contradicted" and c.adj_ci_high < 0.5 and "below" in reason


def test_one_point_effect_supported_in_a_per_paper_family():
    """+1 point at sd(diff) 0.3 with 5 seeds: supported with Holm's sharing in a family of 5 (one look)."""
    rng = np.random.default_rng(4)
    looks = []
    for _ in range(5):
        b = rng.normal(90, 0.6, 5)
        looks.append([LookStats.of(compare_superiority(arm(b + 1.0 + rng.normal(0, 0.3, 5)), arm(b), min_effect=0.5))])
    out = run_family(looks, Design(None), ALPHA)
    assert (out.code == SUPPORTED).all()


def test_ordering_is_intersection_union():
    a1, a2, a3 = arm([88.0, 88.4, 88.2, 88.1]), arm([90.0, 90.5, 90.3, 90.2]), arm([91.8, 91.6, 92.0, 91.9])
    c, steps = compare_ordering([a1, a2, a3])
    assert len(steps) == 2 and c.p_value == max(s.p_value for s in steps)
    assert decide_one(c)[0] == "supported"
    c, steps = compare_ordering([a1, a3, a2])  # second step reversed
    assert c.p_contra == pytest.approx(min(1.0, 2 * min(s.p_contra for s in steps)))
    assert decide_one(c)[0] == "contradicted"


def test_saturation_keeps_improving_contradicts():
    e2e, lw = arm([92.0, 92.3, 91.8, 92.1, 92.2]), arm([88.0, 88.2, 88.1, 87.9, 88.3])
    flat = compare_saturation(e2e, lw, arm([0.1, -0.2, 0.0, 0.1, -0.1]), threshold=0.5, min_effect=1.0)
    assert decide_one(flat)[0] == "supported"
    rising = compare_saturation(e2e, lw, arm([2.0, 2.3, 1.8, 2.1, 2.2]), threshold=0.5, min_effect=1.0)
    v, reason = decide_one(rising)
    assert v == "contradicted" and "gain > 0.5" in reason


def test_zero_variance_needs_three_seeds():
    two = compare_superiority(arm([90.5, 91.5]), arm([90.0, 91.0]), min_effect=0.5)
    assert two.zero_variance and decide_one(two)[1].startswith("only 2 seeds")  # min_seeds is at least 3
    three = compare_superiority(arm([90.5, 91.5, 92.5]), arm([90.0, 91.0, 92.0]), min_effect=0.5)
    assert three.zero_variance and decide_one(three)[0] == "supported"
    small = compare_superiority(arm([90.2, 91.2, 92.2]), arm([90.0, 91.0, 92.0]), min_effect=0.5)
    assert decide_one(small)[0] == "contradicted"  # exact 0.2 on every seed: below min_effect


def test_min_seeds_and_missing():
    assert decide_one(compare_superiority(arm([1, 2]), arm([0, 0.5])))[1].startswith("only 2 seeds")
    assert decide_one(compare_superiority({}, arm([1, 2, 3])))[1].startswith("missing runs")
    assert decide_one(compare_reported(arm([90.0]), 90, tolerance=1))[1] == "1 seed: no test possible"


def test_diverged_runs_are_named_and_pairing_uses_shared_seeds():
    a = {0: 91.0, 1: float("nan"), 2: 91.4, 3: 91.2, 4: 90.9}
    b = {0: 90.0, 1: 90.1, 2: 90.3, 3: 90.2, 5: 90.0}
    c = compare_superiority(a, b, min_effect=0.5)
    assert c.paired and c.n_a == c.n_b == 3  # seeds 0, 2, 3
    assert c.dropped == ["arm a seed 1 (non-finite)", "arm a seed 4 (no pair)", "arm b seed 1 (no pair)",
                         "arm b seed 5 (no pair)"]
    assert "dropped: arm a seed 1 (non-finite)" in decide_one(c)[1]
    json.dumps(c.to_dict(), allow_nan=False)


def test_one_look_of_the_family_procedure_is_holm():
    """With one look (the fixed plan) the family procedure rejects exactly what statsmodels' Holm rejects."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        comps = [compare_superiority(arm(rng.normal(rng.choice([0.0, 0.6]), 0.5, 5)), arm(np.zeros(5)), rank_test=False)
                 for _ in range(6)]
        p = [c.p_value for c in comps]
        out = run_family([[LookStats.of(c)] for c in comps], Design(None), ALPHA)
        assert list(out.code[0] == SUPPORTED) == list(multipletests(p, alpha=ALPHA, method="holm")[0])


def test_rule_text_is_the_module_constant():
    for text in ("Holm", "min_seeds (at least 3)", "No bootstrap", "Lan-DeMets", "failed run", "decision interval",
                 "repeated confidence interval", "futility"):
        assert text in VERDICT_RULE


# ---------------------------------------------------------------- power

def test_superiority_power_is_statsmodels_at_the_holm_step():
    p, how = rule_power("superiority", 5, 0.85, 0.05 / 4, effect=0.5)
    assert how == "exact" and p == pytest.approx(TTestPower().power(0.5 / 0.85, 5, 0.0125, alternative="larger"))
    n = seeds_for_power(lambda k: rule_power("superiority", k, 0.85, 0.0125, effect=0.5)[0])
    assert rule_power("superiority", n, 0.85, 0.0125, effect=0.5)[0] >= 0.8
    assert rule_power("superiority", n - 1, 0.85, 0.0125, effect=0.5)[0] < 0.8


def test_tost_power_exact_matches_simulation_of_the_rule():
    rng = np.random.default_rng(7)
    n, sd, tol, a = 6, 0.6, 1.0, 0.01
    exact = tost_power(0.0, tol, sd, n, a)
    hits = [compare_reported(arm(rng.normal(90, sd, n)), 90.0, tolerance=tol).p_value < a for _ in range(1500)]
    p, se = rate(hits)
    assert abs(p - exact) < 3 * se


# ---------------------------------------------------------------- calibration (issue acceptance bounds)

def _two_arm(rng, n, delta, sd=0.6):
    b = rng.normal(90, sd, n)
    return arm(b + delta + rng.normal(0, sd * 0.5, n)), arm(b)


@pytest.mark.parametrize("n", [3, 5])
def test_null_false_supported_rate(n):
    rng = np.random.default_rng(10 + n)
    p, se = verdict_rate(lambda: compare_superiority(*_two_arm(rng, n, 0.0), min_effect=0.5), "supported")
    assert p <= ALPHA + 3 * se


@pytest.mark.parametrize("n", [3, 5])
def test_reported_value_off_by_twice_the_tolerance_is_rarely_supported(n):
    rng = np.random.default_rng(20 + n)
    for offset in (2.0, 1.0):  # twice the tolerance, and the TOST boundary itself
        p, se = verdict_rate(lambda: compare_reported(arm(rng.normal(90 + offset, 0.6, n)), 90.0, tolerance=1.0),
                             "supported")
        assert p <= ALPHA + 3 * se


@pytest.mark.parametrize("n", [3, 5])
def test_equivalence_at_the_margin_is_rarely_contradicted(n):
    rng = np.random.default_rng(30 + n)
    p, se = verdict_rate(lambda: compare_equivalence(*_two_arm(rng, n, 1.0), margin=1.0), "contradicted")
    assert p <= ALPHA / 2 + 3 * se


@pytest.mark.parametrize("n", [3, 5])
def test_interval_coverage(n):
    rng = np.random.default_rng(40 + n)
    hits = []
    for _ in range(800):
        c = compare_superiority(*_two_arm(rng, n, 0.7), min_effect=0.5)
        hits.append(c.ci_low <= 0.7 <= c.ci_high)
    p, se = rate(hits)
    assert abs(p - 0.95) <= 3 * se


# ---------------------------------------------------------------- McNemar (descriptive)

def _preds(both_right: int, a_only: int, b_only: int, both_wrong: int):
    """Predictions for 10-class labels with the given correctness table."""
    counts = [both_right, a_only, b_only, both_wrong]
    y = np.arange(sum(counts)) % 10
    wrong = (y + 1) % 10
    ra = np.repeat([True, True, False, False], counts)
    rb = np.repeat([True, False, True, False], counts)
    return np.where(ra, y, wrong), np.where(rb, y, wrong), y


def test_mcnemar_exact_small_discordant():
    p, table = mcnemar_paired(*_preds(50, 10, 2, 8))
    assert table.tolist() == [[50, 10], [2, 8]]
    # Exact two-sided binomial: 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert p == pytest.approx(2 * 79 / 4096)
    assert p == pytest.approx(0.0385742, abs=1e-6)


def test_mcnemar_chi2_with_continuity_correction():
    p, table = mcnemar_paired(*_preds(100, 30, 10, 5))
    assert table.tolist() == [[100, 30], [10, 5]]
    stat = (abs(30 - 10) - 1) ** 2 / (30 + 10)  # 9.025
    assert p == pytest.approx(math.erfc(math.sqrt(stat / 2)))  # chi2(1) survival function


def test_mcnemar_identical_and_empty_predictions():
    y = np.array([0, 1, 2, 3, 1])
    pred = np.array([0, 1, 0, 3, 2])
    p, table = mcnemar_paired(pred, pred.copy(), y)
    assert p == 1.0 and table.tolist() == [[3, 0], [0, 2]]
    p, table = mcnemar_paired(np.array([]), np.array([]), np.array([]))
    assert p is None and table.sum() == 0
    with pytest.raises(ValueError):
        mcnemar_paired(pred, pred[:3], y)


def test_combine_mcnemar_fisher():
    assert combine_mcnemar([]) is None and combine_mcnemar([None]) is None
    assert combine_mcnemar([0.3, None]) == pytest.approx(0.3)
    x = -2 * (math.log(0.01) + math.log(0.2))
    # chi2 with 4 df: survival function exp(-x/2) * (1 + x/2).
    assert combine_mcnemar([0.01, 0.2]) == pytest.approx(math.exp(-x / 2) * (1 + x / 2))


# ---------------------------------------------------------------- seeds needed


# --- P2's critical-layer interval -----------------------------------------------------------

def test_median_interval_order_statistics():
    from l2l.stats import median_interval

    assert median_interval([9, 3, 5, 4, 7]) == (5.0, 3.0, 9.0, pytest.approx(1 - 2 / 32))  # n=5: the range
    med, lo, hi, cov = median_interval(list(range(1, 14)))  # n=13: [x_(3), x_(11)], 1 - 2 P(Bin(13,.5) <= 2)
    assert (med, lo, hi) == (7.0, 3.0, 11.0) and cov == pytest.approx(1 - 2 * sps.binom.cdf(2, 13, 0.5))
    assert cov >= 0.95 > 1 - 2 * sps.binom.cdf(3, 13, 0.5)  # the largest k that keeps 95%
    assert all(math.isnan(v) for v in median_interval([]))


@pytest.mark.parametrize("curve", ["saturating", "slow"])
@pytest.mark.parametrize("n", [5, 8])  # the paper profile's seeds of the per-layer (5) and stage-wise (8) runs
def test_critical_layer_interval_covers_at_the_seeds_used(curve, n):
    """The interval holds the population median critical layer at least as often as it states
    (simulated through the real critical_stage and median_interval; 3 Monte Carlo s.e.)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "critical_layer_coverage.py"
    spec = importlib.util.spec_from_file_location("critical_layer_coverage", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.POPULATION = 4000
    r = bench.coverage(curve, n, replicates=300, seed=1)
    se = math.sqrt(r["stated"] * (1 - r["stated"]) / 300)
    assert r["coverage"] >= r["stated"] - 3 * se, r

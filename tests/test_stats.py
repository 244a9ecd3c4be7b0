"""Tests that the claim statistics are right, not just that they run.

Simulation tests use fixed numpy seeds, so they are deterministic; their tolerances
are 3 Monte-Carlo standard errors, so a correct implementation passes them by design.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from l2l.stats import (
    Comparison,
    combine_mcnemar,
    compare_equivalence,
    compare_ordering,
    compare_reported,
    compare_superiority,
    holm,
    mcnemar_paired,
    verdict,
    verdict_ordering,
)

ALPHA = 0.05
FAST = 999  # bootstrap resamples in simulations: the interval only needs to be roughly right


def arm(values, seeds=None) -> dict[int, float]:
    seeds = range(len(values)) if seeds is None else seeds
    return {int(s): float(v) for s, v in zip(seeds, values)}


def paired_arms(rng: np.random.Generator, n: int, delta: float, seed_sd: float = 1.0, noise_sd: float = 0.3):
    """Two arms on the same seeds: a shared per-seed effect (what pairing removes) plus noise."""
    shared = rng.normal(90.0, seed_sd, n)
    a = shared + delta + rng.normal(0, noise_sd, n)
    b = shared + rng.normal(0, noise_sd, n)
    return arm(a), arm(b)


def assert_json_safe(c: Comparison) -> dict:
    d = c.to_dict()
    json.dumps(d, allow_nan=False)  # raises on NaN/inf
    return d


# ---------------------------------------------------------------- calibration / power


def test_no_effect_calibration():
    """No true effect, n=5 paired seeds: the one-sided paired t-test rejects at rate alpha,
    and 'supported' (which also needs the bootstrap interval above 0) at most that often."""
    rng = np.random.default_rng(12345)
    sims = 2000
    se = math.sqrt(ALPHA * (1 - ALPHA) / sims)
    rejected = supported = rank_rejected = 0
    for _ in range(sims):
        a, b = paired_arms(rng, 5, delta=0.0)
        c = compare_superiority(a, b, n_resamples=FAST)
        assert c.paired and c.p_value is not None
        rejected += c.p_value < ALPHA
        rank_rejected += c.p_nonparam is not None and c.p_nonparam < ALPHA
        supported += verdict(c, alpha=ALPHA, p_adjusted=c.p_value)[0] == "supported"
    assert abs(rejected / sims - ALPHA) <= 3 * se
    assert supported / sims <= ALPHA + 3 * se
    # Exact Wilcoxon with 5 pairs: the smallest one-sided p is 1/32, hit with probability 1/32.
    assert rank_rejected / sims <= ALPHA + 3 * se


def test_planted_effect_power_matches_statsmodels():
    """A planted standardized effect d_z=1 with n=6 paired seeds is detected as often as
    statsmodels' analytic power of the one-sided paired t-test says."""
    rng = np.random.default_rng(2024)
    n, d_z, noise_sd, sims = 6, 1.0, 0.3, 1500
    delta = d_z * noise_sd * math.sqrt(2)  # sd of a difference of two independent noises
    hits = 0
    for _ in range(sims):
        a, b = paired_arms(rng, n, delta=delta, noise_sd=noise_sd)
        hits += compare_superiority(a, b, n_resamples=FAST).p_value < ALPHA
    expected = TTestPower().power(effect_size=d_z, nobs=n, alpha=ALPHA, alternative="larger")
    assert abs(hits / sims - expected) <= 0.04


def test_pairing_removes_shared_seed_variation():
    """Same numbers: paired they show the effect, unpaired (seed sets differ) they cannot."""
    rng = np.random.default_rng(7)
    a, b = paired_arms(rng, 6, delta=0.5, seed_sd=2.0, noise_sd=0.1)
    paired = compare_superiority(a, b)
    unpaired = compare_superiority(a, {s + 100: v for s, v in b.items()})
    assert paired.paired and not unpaired.paired
    assert any("seed sets differ" in n for n in unpaired.notes)
    assert verdict(paired, alpha=ALPHA, p_adjusted=paired.p_value)[0] == "supported"
    assert verdict(unpaired, alpha=ALPHA, p_adjusted=unpaired.p_value)[0] == "inconclusive"
    # The primary p-values are exactly SciPy's paired t and Welch t.
    va, vb = np.array(list(a.values())), np.array(list(b.values()))
    assert paired.p_value == pytest.approx(sps.ttest_rel(va, vb, alternative="greater").pvalue)
    assert unpaired.p_value == pytest.approx(
        sps.ttest_ind(va, vb, equal_var=False, alternative="greater").pvalue
    )


def test_superiority_contradicted_and_effect_sizes():
    a = arm([92.0, 92.3, 91.8, 92.1, 92.2])
    b = arm([93.0, 93.1, 93.2, 92.9, 93.3])
    c = compare_superiority(a, b)
    assert c.ci_high < 0 and c.p_reverse is not None and c.p_reverse < ALPHA
    assert verdict(c, alpha=ALPHA, p_adjusted=c.p_value)[0] == "contradicted"
    d = np.array(list(a.values())) - np.array(list(b.values()))
    assert c.effect_size == pytest.approx(d.mean() / d.std(ddof=1))  # Cohen's d_z
    assert c.prob_superiority == 0.0
    assert c.p_value + c.p_reverse == pytest.approx(1.0)  # the two one-sided t-tests


def test_holm_adjusted_p_can_make_a_claim_inconclusive():
    a = arm([93.1, 93.5, 92.8, 93.3, 93.2])
    b = arm([92.9, 93.0, 92.7, 93.0, 92.9])
    c = compare_superiority(a, b)
    assert c.p_value < ALPHA
    assert verdict(c, alpha=ALPHA, p_adjusted=c.p_value)[0] == "supported"
    v, reason = verdict(c, alpha=ALPHA, p_adjusted=0.2)
    assert v == "inconclusive" and "seeds needed" in reason


def test_bootstrap_interval_close_to_t_interval_for_large_n():
    rng = np.random.default_rng(3)
    a, b = paired_arms(rng, 200, delta=0.2)
    c = compare_superiority(a, b, n_resamples=FAST)
    assert c.ci_low < c.diff < c.ci_high
    width = c.t_ci_high - c.t_ci_low
    assert abs(c.ci_low - c.t_ci_low) < 0.1 * width
    assert abs(c.ci_high - c.t_ci_high) < 0.1 * width


# ---------------------------------------------------------------- equivalence / reported / ordering


def test_tost_accepts_equivalent_and_rejects_shifted():
    rng = np.random.default_rng(11)
    base = rng.normal(93.0, 1.0, 6)
    a = arm(base + rng.normal(0, 0.1, 6))
    same = arm(base + 0.05 + rng.normal(0, 0.1, 6))
    shifted = arm(base + 2.0 + rng.normal(0, 0.1, 6))

    eq = compare_equivalence(a, same, margin=1.0)
    assert eq.p_value < ALPHA and -1.0 < eq.ci_low <= eq.ci_high < 1.0
    assert verdict(eq, alpha=ALPHA, p_adjusted=eq.p_value)[0] == "supported"
    assert eq.seeds_needed is not None and eq.seeds_needed <= 6

    ne = compare_equivalence(a, shifted, margin=1.0)
    assert ne.p_value > 0.5 and ne.ci_high < -1.0
    assert ne.seeds_needed is None  # |diff| >= margin: no n makes TOST succeed on average
    assert verdict(ne, alpha=ALPHA, p_adjusted=ne.p_value)[0] == "contradicted"

    # TOST p = the larger of the two one-sided paired t-tests against the bounds.
    va, vb = np.array(list(a.values())), np.array(list(same.values()))
    lower = sps.ttest_1samp(va - vb, -1.0, alternative="greater").pvalue
    upper = sps.ttest_1samp(va - vb, 1.0, alternative="less").pvalue
    assert eq.p_value == pytest.approx(max(lower, upper))


def test_reported_value():
    a = arm([93.1, 93.5, 92.8, 93.3, 93.2])
    inside = compare_reported(a, 93.2)
    assert inside.ci_low <= 93.2 <= inside.ci_high and inside.n_b == 0
    assert verdict(inside, alpha=ALPHA, p_adjusted=inside.p_value)[0] == "supported"
    assert inside.p_value == pytest.approx(sps.ttest_1samp(list(a.values()), 93.2).pvalue)
    assert inside.t_ci_low < inside.mean_a < inside.t_ci_high

    far = compare_reported(a, 95.0)
    assert far.diff == pytest.approx(np.mean(list(a.values())) - 95.0)
    assert verdict(far, alpha=ALPHA, p_adjusted=far.p_value)[0] == "contradicted"
    # Outside the interval but not significant after adjustment -> inconclusive.
    assert verdict(far, alpha=ALPHA, p_adjusted=0.5)[0] == "inconclusive"
    assert_json_safe(far)


def test_ordering_intersection_union():
    rng = np.random.default_rng(5)
    shared = rng.normal(90, 1, 5)
    arms = [arm(shared + k + rng.normal(0, 0.1, 5)) for k in range(3)]
    steps, p_max = compare_ordering(arms)
    assert len(steps) == 2 and all(s.kind == "ordering" for s in steps)
    assert p_max == max(s.p_value for s in steps)
    assert verdict_ordering(steps, alpha=ALPHA, p_adjusted=p_max)[0] == "supported"
    # Reversed order: every step points the wrong way.
    steps, p_max = compare_ordering(arms[::-1])
    assert verdict_ordering(steps, alpha=ALPHA, p_adjusted=p_max)[0] == "contradicted"


# ---------------------------------------------------------------- multiple testing / McNemar


def test_holm_matches_statsmodels_with_none_passthrough():
    ps = [0.01, None, 0.04, 0.03, 0.005, float("nan")]
    out = holm(ps)
    ref = multipletests([0.01, 0.04, 0.03, 0.005], method="holm")[1]
    assert out[1] is None and out[5] is None
    assert [out[i] for i in (0, 2, 3, 4)] == pytest.approx(list(ref))
    # By hand: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1, then running max.
    assert [out[i] for i in (4, 0, 3, 2)] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert holm([]) == [] and holm([None]) == [None]


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


def test_seeds_needed_matches_solve_power():
    d = np.array([0.5, 1.5, 1.0, 0.0, 2.0])
    b = arm(np.full(5, 90.0) + np.arange(5))
    a = {s: v + dv for (s, v), dv in zip(b.items(), d)}
    c = compare_superiority(a, b, effect_of_interest=0.5)
    es = 0.5 / d.std(ddof=1)
    expected = math.ceil(TTestPower().solve_power(effect_size=es, alpha=ALPHA, power=0.8, alternative="larger"))
    assert c.seeds_needed == expected and expected > 5
    assert c.effect_of_interest == 0.5

    # Unpaired: pooled sd and TTestIndPower (seeds per arm).
    xa, xb = np.array([93.0, 93.4, 92.9, 93.6]), np.array([92.5, 93.1, 92.4])
    c = compare_superiority(arm(xa), arm(xb, seeds=[10, 11, 12]), effect_of_interest=0.3)
    pooled = math.sqrt((3 * xa.var(ddof=1) + 2 * xb.var(ddof=1)) / 5)
    expected = math.ceil(
        TTestIndPower().solve_power(effect_size=0.3 / pooled, alpha=ALPHA, power=0.8, alternative="larger")
    )
    assert not c.paired and c.seeds_needed == expected
    assert c.effect_size == pytest.approx((xa.mean() - xb.mean()) / pooled)  # Cohen's d


def test_seeds_needed_huge_effect_is_two():
    a, b = arm([95.0, 95.1, 95.2]), arm([90.0, 90.05, 90.2])
    assert compare_superiority(a, b).seeds_needed == 2


def test_tost_seeds_needed_is_smallest_n_of_documented_approximation():
    rng = np.random.default_rng(9)
    a, b = paired_arms(rng, 5, delta=0.1, noise_sd=0.4)
    c = compare_equivalence(a, b, margin=0.5)
    d = np.array(list(a.values())) - np.array(list(b.values()))
    sd = d.std(ddof=1)
    near, far = (0.5 - abs(d.mean())) / sd, (0.5 + abs(d.mean())) / sd

    def approx_power(n: int) -> float:
        tp = TTestPower()
        return tp.power(near, n, ALPHA, alternative="larger") + tp.power(far, n, ALPHA, alternative="larger") - 1

    n = c.seeds_needed
    assert n is not None and approx_power(n) >= 0.8 > approx_power(n - 1)


# ---------------------------------------------------------------- edge cases


def test_one_seed():
    c = compare_superiority({0: 93.0}, {0: 92.0})
    assert (c.n_a, c.n_b, c.p_value, c.seeds_needed) == (1, 1, None, None)
    assert verdict(c, alpha=ALPHA, p_adjusted=None) == ("inconclusive", "1 seed: no test possible")
    assert assert_json_safe(c)["ci_low"] is None
    r = compare_reported({0: 93.0}, 93.0)
    assert verdict(r, alpha=ALPHA, p_adjusted=None)[0] == "inconclusive"
    assert_json_safe(r)


@pytest.mark.parametrize("missing", [{}, None])
def test_missing_arm(missing):
    b = arm([92.0, 92.5, 93.0])
    for c in (compare_superiority(missing, b), compare_equivalence(b, missing, margin=1.0)):
        assert 0 in (c.n_a, c.n_b)
        v, reason = verdict(c, alpha=ALPHA, p_adjusted=None)
        assert v == "inconclusive" and reason.startswith("missing runs")
        d = assert_json_safe(c)
        assert d["diff"] is None and d["p_value"] is None
    r = compare_reported(missing, 93.0)
    assert r.n_a == 0 and verdict(r, alpha=ALPHA, p_adjusted=None)[1] == "missing runs"
    assert_json_safe(r)
    steps, p_max = compare_ordering([b, missing])
    assert p_max is None and verdict_ordering(steps, alpha=ALPHA, p_adjusted=None)[0] == "inconclusive"


def test_zero_variance():
    same = arm([93.0, 93.0, 93.0])
    c = compare_superiority(same, same)
    assert c.zero_variance and c.p_value is None and c.ci_low == c.ci_high == 0.0
    v, reason = verdict(c, alpha=ALPHA, p_adjusted=None)
    assert v == "contradicted" and "zero variance" in reason  # A is never better than B
    assert_json_safe(c)

    # Constant positive difference up to float rounding (93.4-93.3 vs 93.5-93.4).
    up = compare_superiority(arm([93.4, 93.5, 93.6]), arm([93.3, 93.4, 93.5]))
    assert up.zero_variance
    assert verdict(up, alpha=ALPHA, p_adjusted=None)[0] == "supported"

    eq = compare_equivalence(same, same, margin=0.5)
    assert verdict(eq, alpha=ALPHA, p_adjusted=None)[0] == "supported"
    far = compare_equivalence(arm([94.0, 94.0]), arm([93.0, 93.0]), margin=0.5)
    assert verdict(far, alpha=ALPHA, p_adjusted=None)[0] == "contradicted"

    r = compare_reported(same, 93.0)
    assert verdict(r, alpha=ALPHA, p_adjusted=None)[0] == "supported"
    r = compare_reported(same, 93.5)
    assert verdict(r, alpha=ALPHA, p_adjusted=None)[0] == "contradicted"
    for x in (eq, far, r):
        assert_json_safe(x)


def test_zero_variance_below_min_seeds_is_inconclusive():
    c = compare_superiority(arm([93.0, 93.0]), arm([92.0, 92.0]))
    assert verdict(c, alpha=ALPHA, p_adjusted=None, min_seeds=3)[0] == "inconclusive"


def test_one_arm_constant_is_not_zero_variance_when_unpaired():
    # Welch's test only needs variance in one arm.
    c = compare_superiority(arm([93.0, 93.0, 93.0], seeds=[0, 1, 2]), arm([91.0, 91.5, 92.0], seeds=[5, 6, 7]))
    assert not c.paired and not c.zero_variance and c.p_value is not None
    assert_json_safe(c)


def test_nan_values_are_dropped_with_a_note():
    c = compare_superiority(arm([93.0, float("nan"), 93.4]), arm([92.0, 92.1, 92.3]))
    assert c.n_a == 2 and not c.paired
    assert any("non-finite" in n for n in c.notes) and any("seed sets differ" in n for n in c.notes)
    assert_json_safe(c)


def test_unpaired_prob_superiority_counts_all_pairs_with_ties():
    c = compare_superiority(arm([1.0, 3.0], seeds=[0, 1]), arm([1.0, 2.0], seeds=[2, 3]))
    # pairs: (1,1) tie, (1,2) lose, (3,1) win, (3,2) win -> (0.5 + 0 + 1 + 1) / 4
    assert c.prob_superiority == pytest.approx(0.625)


def test_to_dict_is_json_safe_everywhere():
    rng = np.random.default_rng(1)
    a, b = paired_arms(rng, 4, delta=0.3)
    cases = [
        compare_superiority(a, b),
        compare_equivalence(a, b, margin=0.2),
        compare_reported(a, 90.0),
        compare_superiority({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0}),
        compare_superiority({}, {}),
    ]
    for c in cases:
        d = assert_json_safe(c)
        assert set(d) >= {"kind", "n_a", "n_b", "paired", "ci_low", "ci_high", "p_value", "notes"}


def test_equivalence_rejects_bad_margin():
    with pytest.raises(ValueError):
        compare_equivalence({0: 1.0}, {0: 1.0}, margin=0.0)

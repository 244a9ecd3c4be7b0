"""Statistics for checking a paper's claims against runs over several seeds.

An *arm* is a dict ``seed -> metric`` (e.g. test accuracy in %). Two arms are
*paired* when they were run on the same set of (>= 2) seeds; then every test
works on the per-seed differences, which removes the seed-to-seed variation the
two arms share. When the seed sets differ, the unpaired tests are used on all
values and a note says so. Non-finite values (diverged runs) are dropped, with a note.

All tests come from SciPy / statsmodels: paired t / Welch t (primary p),
Wilcoxon signed-rank / Mann-Whitney U (non-parametric check), TOST
(``ttost_paired`` / ``ttost_ind``) for equivalence, a one-sample t-test for
reported values, percentile/BCa bootstrap intervals (``scipy.stats.bootstrap``),
McNemar on per-example correctness, Holm's correction across the family of
claims and statsmodels' power analysis for the number of seeds needed.

Verdict rule
------------
Every claim gets one of ``supported``, ``contradicted`` or ``inconclusive``,
with a reason. ``alpha`` is the significance level (default 0.05), p-values
are Holm-adjusted across the family of all claims checked in one report, and
"the interval" is the (1 - alpha) bootstrap interval of the mean difference
(of arm A's mean for a reported value).

* Missing runs (an arm has 0 runs) -> inconclusive ("missing runs").
* Fewer than ``min_seeds`` (default 2) runs in an arm -> inconclusive
  ("1 seed: no test possible").
* Superiority "A > B" (one-sided tests):
  supported if the adjusted p < alpha AND the interval lies above 0;
  contradicted if the interval lies entirely below 0 AND the reverse
  one-sided test (B > A) has (unadjusted) p < alpha;
  otherwise inconclusive; the reason then gives the number of seeds per arm
  that would give 80% power at the effect of interest (the paper's reported
  difference when the caller passes it, else the observed difference).
* Ordering "A1 < A2 < ... < Ak": each consecutive step is a superiority
  claim; the ordering's p is the largest step p (intersection-union test):
  supported iff every step is supported, contradicted if any step is
  contradicted, else inconclusive.
* Equivalence "A ~ B within +-margin": supported if the TOST p (adjusted)
  < alpha; contradicted if the interval lies entirely outside
  (-margin, +margin); else inconclusive.
* Reported value "the paper's number": supported if the reported number lies
  inside our interval of arm A's mean; contradicted if it lies outside AND
  the two-sided one-sample t-test p (adjusted) < alpha; else inconclusive.
* Zero variance (the per-seed differences, or both unpaired arms, are
  constant): no t-test is possible, and none is needed because there is no
  noise to test against. With at least ``min_seeds`` runs the verdict follows
  the exact difference: superiority is supported if A exceeds B (diff > 0) and
  contradicted otherwise (diff <= 0: A is never better); equivalence is
  supported if |diff| < margin and contradicted otherwise; a reported value
  is supported only if it equals our (constant) value and contradicted
  otherwise. The reason says "zero variance".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

Arm = Mapping[Any, float]

POWER = 0.8
MAX_SEEDS = 100_000  # beyond this a "seeds needed" figure means "not feasible"


@dataclass
class Comparison:
    kind: str  # "superiority" | "equivalence" | "reported_value" | "ordering"
    n_a: int
    n_b: int
    paired: bool
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float | None
    p_nonparam: float | None
    effect_size: float | None
    prob_superiority: float | None
    seeds_needed: int | None
    mcnemar_p: float | None = None
    notes: list[str] = field(default_factory=list)
    # Additions beyond the agreed interface (all optional, so callers may ignore them):
    p_reverse: float | None = None  # one-sided p for B > A (superiority/ordering)
    t_ci_low: float | None = None  # (1-alpha) t-interval, next to the bootstrap one
    t_ci_high: float | None = None
    margin: float | None = None  # equivalence margin
    reported: float | None = None  # the paper's number (reported_value)
    effect_of_interest: float | None = None  # raw difference used for seeds_needed
    zero_variance: bool = False

    def to_dict(self) -> dict:
        """JSON-safe dict: numpy scalars become Python ones, NaN/inf become None."""
        return _json_safe(asdict(self))


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _f(x: Any) -> float | None:
    """Float or None: a NaN from a library call becomes an explicit 'no answer'."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _clean(arm: Arm | None, name: str, notes: list[str]) -> dict[Any, float]:
    """Keep finite values only; a diverged (NaN) run is reported, not averaged."""
    arm = arm or {}
    out = {k: float(v) for k, v in arm.items() if v is not None and math.isfinite(float(v))}
    if len(out) < len(arm):
        notes.append(f"arm {name}: dropped {len(arm) - len(out)} non-finite value(s)")
    return out


def _constant(sd: float, scale: float) -> bool:
    """Zero variance up to float rounding (93.4 - 93.3 and 93.5 - 93.4 differ in the last bits)."""
    return sd <= 1e-12 * max(1.0, scale)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run a library call; its warnings and failures become None (the caller adds a note)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn()
        except (ValueError, ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError):
            return None


def _bootstrap_ci(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    *,
    alpha: float,
    n_resamples: int,
    seed: int,
    notes: list[str],
) -> tuple[float, float]:
    """BCa interval, falling back to percentile when BCa is degenerate (small or tied samples)."""
    for method in ("BCa", "percentile"):
        res = _quiet(
            lambda: sps.bootstrap(
                data,
                statistic,
                n_resamples=n_resamples,
                confidence_level=1 - alpha,
                method=method,
                vectorized=True,
                rng=np.random.default_rng(seed),
            )
        )
        if res is not None:
            lo, hi = res.confidence_interval
            if math.isfinite(lo) and math.isfinite(hi):
                if method != "BCa":
                    notes.append("bootstrap: BCa degenerate, percentile interval used")
                return float(lo), float(hi)
    notes.append("bootstrap interval not computable")
    return float("nan"), float("nan")


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _diff_stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _seeds_for_power(power_fn: Callable[[int], float], solve_fn: Callable[[], Any]) -> int | None:
    """ceil(statsmodels solve_power), with the edges the solver does not handle.

    2 seeds is the least a t-test can use; statsmodels' root finder returns NaN when
    even 2 seeds give more than 80% power, so that case is checked first.
    """
    at_two = _f(_quiet(lambda: power_fn(2)))
    if at_two is not None and at_two >= POWER:
        return 2
    n = _f(_quiet(solve_fn))
    if n is None or n > MAX_SEEDS:
        return None
    return max(2, math.ceil(n - 1e-9))  # tolerance: the root finder lands a hair above integers


def _seeds_superiority(effect: float, sd: float, paired: bool, alpha: float) -> int | None:
    """Seeds per arm for 80% power of the one-sided t-test at raw difference `effect`."""
    if not (effect > 0 and sd > 0 and math.isfinite(effect / sd)):
        return None
    es = effect / sd
    analysis = TTestPower() if paired else TTestIndPower()
    return _seeds_for_power(
        lambda n: float(analysis.power(es, n, alpha, alternative="larger")),
        lambda: analysis.solve_power(effect_size=es, alpha=alpha, power=POWER, alternative="larger"),
    )


def _seeds_tost(diff: float, margin: float, sd: float, paired: bool, alpha: float) -> int | None:
    """Seeds per arm for 80% TOST power (approximation, documented here).

    TOST rejects when both one-sided tests reject: against the nearer bound at
    standardized effect (margin - |diff|)/sd and against the farther one at
    (margin + |diff|)/sd. P(both) >= P1 + P2 - 1 (Bonferroni), so we take the
    smallest n where P1(n) + P2(n) - 1 >= 0.8, each P from statsmodels'
    TTestPower/TTestIndPower. The answer is slightly conservative.
    """
    if not (sd > 0 and abs(diff) < margin):
        return None
    near, far = (margin - abs(diff)) / sd, (margin + abs(diff)) / sd
    analysis = TTestPower() if paired else TTestIndPower()

    def tost_power(n: np.ndarray) -> np.ndarray:
        p1 = analysis.power(near, n, alpha, alternative="larger")
        p2 = analysis.power(far, n, alpha, alternative="larger")
        return np.asarray(p1) + np.asarray(p2) - 1

    # Geometric bracket, then a vectorized scan inside it: exact integer answer, few calls.
    hi = 2
    while hi <= MAX_SEEDS and tost_power(np.array([hi]))[0] < POWER:
        hi *= 2
    if hi > MAX_SEEDS:
        return None
    ns = np.arange(max(2, hi // 2), hi + 1)
    return int(ns[np.argmax(tost_power(ns) >= POWER)])


@dataclass
class _Two:
    """Two arms after cleaning and pairing."""

    a: np.ndarray
    b: np.ndarray
    paired: bool
    notes: list[str]

    @property
    def d(self) -> np.ndarray:  # per-seed differences (paired only)
        return self.a - self.b


def _prepare(a: Arm | None, b: Arm | None) -> _Two:
    notes: list[str] = []
    ca, cb = _clean(a, "A", notes), _clean(b, "B", notes)
    same = set(ca) == set(cb)
    if same and len(ca) >= 2:
        seeds = sorted(ca, key=repr)  # any consistent order; keys may be int or str
        return _Two(np.array([ca[s] for s in seeds]), np.array([cb[s] for s in seeds]), True, notes)
    if ca and cb and not same:
        notes.append(
            f"seed sets differ ({len(set(ca) & set(cb))} shared of {len(ca)}/{len(cb)}): unpaired tests"
        )
    return _Two(np.array(list(ca.values())), np.array(list(cb.values())), False, notes)


def _n_problem(n_a: int, n_b: int | None) -> str | None:
    """Reason why no test is possible from the run counts alone (None when tests can run)."""
    counts = [n_a] if n_b is None else [n_a, n_b]
    if min(counts) == 0:
        return "missing runs" + ("" if n_b is None else f" (n_a={n_a}, n_b={n_b})")
    if min(counts) == 1:
        return "1 seed: no test possible"
    return None


def _prob_superiority(t: _Two) -> float | None:
    """P(A > B), ties count 1/2: share of paired seeds, or of all (a_i, b_j) pairs."""
    if not (t.a.size and t.b.size):
        return None
    if t.paired:
        return float(np.mean((t.d > 0) + 0.5 * (t.d == 0)))
    gt = t.a[:, None] > t.b[None, :]
    eq = t.a[:, None] == t.b[None, :]
    return float(np.mean(gt + 0.5 * eq))


def _spread(t: _Two) -> float:
    """SD that standardizes the difference: sd of the differences (d_z) or pooled sd (d)."""
    if t.paired:
        return float(np.std(t.d, ddof=1))
    na, nb = t.a.size, t.b.size
    pooled = ((na - 1) * np.var(t.a, ddof=1) + (nb - 1) * np.var(t.b, ddof=1)) / (na + nb - 2)
    return float(np.sqrt(pooled))


def _base(kind: str, t: _Two, alpha: float, n_resamples: int, seed: int) -> tuple[Comparison, bool]:
    """Fields shared by superiority and equivalence; returns (comparison, tests_possible)."""
    nan = float("nan")
    c = Comparison(
        kind=kind,
        n_a=int(t.a.size),
        n_b=int(t.b.size),
        paired=t.paired,
        mean_a=_mean(t.a),
        mean_b=_mean(t.b),
        diff=_mean(t.a) - _mean(t.b),
        ci_low=nan,
        ci_high=nan,
        p_value=None,
        p_nonparam=None,
        effect_size=None,
        prob_superiority=_prob_superiority(t),
        seeds_needed=None,
        notes=list(t.notes),
    )
    problem = _n_problem(c.n_a, c.n_b)
    if problem:
        c.notes.append(problem)
        return c, False
    sd = _spread(t)
    scale = max(np.max(np.abs(t.a)), np.max(np.abs(t.b)))
    if _constant(sd, scale):  # paired: constant differences; unpaired: both arms constant
        # Constant differences: the interval is the exact difference, no t-test exists.
        c.zero_variance = True
        c.ci_low = c.ci_high = c.diff
        c.notes.append("zero variance: no t-test, exact difference used")
        return c, False
    c.effect_size = c.diff / sd
    if t.paired:
        c.ci_low, c.ci_high = _bootstrap_ci(
            (t.d,), _mean_stat, alpha=alpha, n_resamples=n_resamples, seed=seed, notes=c.notes
        )
        tci = _quiet(lambda: sps.ttest_rel(t.a, t.b).confidence_interval(1 - alpha))
    else:
        c.ci_low, c.ci_high = _bootstrap_ci(
            (t.a, t.b), _diff_stat, alpha=alpha, n_resamples=n_resamples, seed=seed, notes=c.notes
        )
        tci = _quiet(lambda: sps.ttest_ind(t.a, t.b, equal_var=False).confidence_interval(1 - alpha))
    if tci is not None:
        c.t_ci_low, c.t_ci_high = _f(tci.low), _f(tci.high)
    return c, True


def _one_sided_p(t: _Two, alternative: str, rank: bool = True) -> tuple[float | None, float | None]:
    """(t-test p, rank-test p or None) for A vs B with the given alternative."""
    if t.paired:
        p = _quiet(lambda: sps.ttest_rel(t.a, t.b, alternative=alternative).pvalue)
        pn = _quiet(lambda: sps.wilcoxon(t.a, t.b, alternative=alternative).pvalue) if rank else None
    else:
        p = _quiet(lambda: sps.ttest_ind(t.a, t.b, equal_var=False, alternative=alternative).pvalue)
        pn = _quiet(lambda: sps.mannwhitneyu(t.a, t.b, alternative=alternative).pvalue) if rank else None
    return _f(p), _f(pn)


def compare_superiority(
    a: Arm | None,
    b: Arm | None,
    *,
    alpha: float = 0.05,
    effect_of_interest: float | None = None,
    n_resamples: int = 9999,
    seed: int = 0,
) -> Comparison:
    """Test H1: A > B (one-sided). `seed` fixes the bootstrap so reports are reproducible."""
    t = _prepare(a, b)
    c, testable = _base("superiority", t, alpha, n_resamples, seed)
    if c.n_a >= 2 and c.n_b >= 2:
        # The rank test still says something when the t-test is degenerate (constant nonzero diffs).
        p, c.p_nonparam = _one_sided_p(t, "greater")
        c.p_value = p if testable else None
    if not testable:
        return c
    c.p_reverse = _one_sided_p(t, "less", rank=False)[0]
    effect = abs(effect_of_interest) if effect_of_interest is not None else abs(c.diff)
    c.effect_of_interest = effect
    c.seeds_needed = _seeds_superiority(effect, _spread(t), t.paired, alpha)
    if c.seeds_needed is None:
        c.notes.append(f"seeds needed not computable (effect {effect:.3g})")
    return c


def compare_equivalence(
    a: Arm | None,
    b: Arm | None,
    *,
    margin: float,
    alpha: float = 0.05,
    n_resamples: int = 9999,
    seed: int = 0,
) -> Comparison:
    """TOST of |mean(A) - mean(B)| < margin; p_value is the TOST p (max of the two one-sided p)."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}")
    t = _prepare(a, b)
    c, testable = _base("equivalence", t, alpha, n_resamples, seed)
    c.margin = float(margin)
    if not testable:
        return c
    if t.paired:
        c.p_value = _f(_quiet(lambda: ttost_paired(t.a, t.b, -margin, margin)[0]))
        # Non-parametric TOST: two one-sided signed-rank tests against the shifted bounds.
        lo = _quiet(lambda: sps.wilcoxon(t.d + margin, alternative="greater").pvalue)
        hi = _quiet(lambda: sps.wilcoxon(t.d - margin, alternative="less").pvalue)
    else:
        c.p_value = _f(_quiet(lambda: ttost_ind(t.a, t.b, -margin, margin, usevar="unequal")[0]))
        lo = _quiet(lambda: sps.mannwhitneyu(t.a + margin, t.b, alternative="greater").pvalue)
        hi = _quiet(lambda: sps.mannwhitneyu(t.a - margin, t.b, alternative="less").pvalue)
    if _f(lo) is not None and _f(hi) is not None:
        c.p_nonparam = max(float(lo), float(hi))
    c.seeds_needed = _seeds_tost(c.diff, margin, _spread(t), t.paired, alpha)
    if c.seeds_needed is None:
        c.notes.append("seeds needed not computable (|diff| >= margin or spread 0)")
    return c


def compare_reported(
    a: Arm | None,
    reported: float,
    *,
    alpha: float = 0.05,
    n_resamples: int = 9999,
    seed: int = 0,
) -> Comparison:
    """Is the paper's number inside our (1-alpha) bootstrap interval of arm A's mean?

    p_value: two-sided one-sample t-test of A against `reported`; the t-interval is
    kept in t_ci_low/t_ci_high (and a note) next to the primary bootstrap interval.
    seeds_needed: seeds for 80% power of that two-sided t-test at the observed difference.
    """
    notes: list[str] = []
    x = np.array(list(_clean(a, "A", notes).values()))
    nan = float("nan")
    c = Comparison(
        kind="reported_value",
        n_a=int(x.size),
        n_b=0,
        paired=False,
        mean_a=_mean(x),
        mean_b=float(reported),
        diff=_mean(x) - float(reported),
        ci_low=nan,
        ci_high=nan,
        p_value=None,
        p_nonparam=None,
        effect_size=None,
        prob_superiority=float(np.mean((x > reported) + 0.5 * (x == reported))) if x.size else None,
        seeds_needed=None,
        notes=notes,
        reported=float(reported),
    )
    problem = _n_problem(c.n_a, None)
    if problem:
        c.notes.append(problem)
        return c
    sd = float(np.std(x, ddof=1))
    if _constant(sd, float(np.max(np.abs(x)))):
        c.zero_variance = True
        c.ci_low = c.ci_high = c.mean_a
        c.notes.append("zero variance: no t-test, exact value used")
        return c
    c.effect_size = c.diff / sd
    c.ci_low, c.ci_high = _bootstrap_ci(
        (x,), _mean_stat, alpha=alpha, n_resamples=n_resamples, seed=seed, notes=c.notes
    )
    res = _quiet(lambda: sps.ttest_1samp(x, reported))
    if res is not None:
        c.p_value = _f(res.pvalue)
        tci = res.confidence_interval(1 - alpha)
        c.t_ci_low, c.t_ci_high = _f(tci.low), _f(tci.high)
        c.notes.append(f"t-interval of the mean: [{tci.low:.4g}, {tci.high:.4g}]")
    c.p_nonparam = _f(_quiet(lambda: sps.wilcoxon(x - reported).pvalue))
    es = abs(c.diff) / sd
    c.effect_of_interest = abs(c.diff)
    if es > 0:
        c.seeds_needed = _seeds_for_power(
            lambda n: float(TTestPower().power(es, n, alpha, alternative="two-sided")),
            lambda: TTestPower().solve_power(effect_size=es, alpha=alpha, power=POWER),
        )
    return c


def compare_ordering(
    arms: list[Arm | None], *, alpha: float = 0.05, n_resamples: int = 9999, seed: int = 0
) -> tuple[list[Comparison], float | None]:
    """Claim arms[0] < arms[1] < ...: one superiority test per consecutive step.

    Returns the steps and the intersection-union p = max step p (the ordering holds
    iff every step does). Zero-variance steps have no p and are decided exactly by
    `verdict`, so they do not enter the max; any other step without a p makes it None.
    """
    steps = [
        compare_superiority(arms[i + 1], arms[i], alpha=alpha, n_resamples=n_resamples, seed=seed)
        for i in range(len(arms) - 1)
    ]
    for s in steps:
        s.kind = "ordering"
    tested = [s for s in steps if not s.zero_variance]
    if not tested or any(s.p_value is None for s in tested):
        return steps, None
    return steps, max(s.p_value for s in tested)  # type: ignore[type-var]


def mcnemar_paired(
    pred_a: np.ndarray, pred_b: np.ndarray, y: np.ndarray
) -> tuple[float | None, np.ndarray]:
    """McNemar test on per-example correctness of A vs B (same examples, same order).

    Table [[both right, A right B wrong], [A wrong B right, both wrong]]. Exact binomial
    when fewer than 25 discordant examples, else chi-square with continuity correction.
    No discordant examples -> p = 1.0 (the models agree on every example); no examples -> None.
    """
    pred_a, pred_b, y = np.asarray(pred_a), np.asarray(pred_b), np.asarray(y)
    if not (pred_a.shape == pred_b.shape == y.shape):
        raise ValueError(f"shape mismatch: {pred_a.shape}, {pred_b.shape}, {y.shape}")
    ra, rb = pred_a == y, pred_b == y
    table = np.array(
        [[np.sum(ra & rb), np.sum(ra & ~rb)], [np.sum(~ra & rb), np.sum(~ra & ~rb)]], dtype=int
    )
    if y.size == 0:
        return None, table
    discordant = int(table[0, 1] + table[1, 0])
    if discordant == 0:
        return 1.0, table
    exact = discordant < 25
    res = mcnemar(table, exact=exact, correction=True)
    return _f(res.pvalue), table


def combine_mcnemar(pvalues: list[float | None]) -> float | None:
    """Fisher's combination of per-seed McNemar p-values (None entries skipped).

    McNemar is two-sided, so the combined p says "A and B differ on some seeds",
    not which one is better: read the direction off the tables or the mean difference.
    """
    ps = [float(p) for p in pvalues if _f(p) is not None]
    if not ps:
        return None
    if len(ps) == 1:
        return ps[0]
    return _f(_quiet(lambda: sps.combine_pvalues(ps, method="fisher").pvalue))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values over the non-None entries; None (and NaN) stay None."""
    idx = [i for i, p in enumerate(pvalues) if _f(p) is not None]
    out: list[float | None] = [None] * len(pvalues)
    if idx:
        adj = multipletests([float(pvalues[i]) for i in idx], method="holm")[1]  # type: ignore[arg-type]
        for i, p in zip(idx, adj):
            out[i] = float(p)
    return out


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _n_text(c: Comparison) -> str:
    return f"n={c.n_a}" if c.n_a == c.n_b or c.kind == "reported_value" else f"n={c.n_a}/{c.n_b}"


def _power_text(c: Comparison) -> str:
    if c.seeds_needed is None:
        return ""
    at = f" at effect {_fmt(c.effect_of_interest)}" if c.effect_of_interest is not None else ""
    return f"; ~{c.seeds_needed} seeds needed for 80% power{at}"


def verdict(
    c: Comparison, *, alpha: float, p_adjusted: float | None, min_seeds: int = 2
) -> tuple[str, str]:
    """Apply the module's verdict rule; returns (verdict, reason).

    `p_adjusted` is the claim's Holm-adjusted p; None means "not adjusted" and the
    raw p_value is used.
    """
    n_b = None if c.kind == "reported_value" else c.n_b
    problem = _n_problem(c.n_a, n_b)
    if problem:
        return "inconclusive", problem
    n_min = c.n_a if n_b is None else min(c.n_a, n_b)
    if n_min < min_seeds:
        return "inconclusive", f"only {n_min} seeds (< {min_seeds}): no test possible"

    if c.zero_variance:
        return _zero_variance_verdict(c)

    p = p_adjusted if p_adjusted is not None else c.p_value
    p_name = "p_adj" if p_adjusted is not None else "p"
    ci = f"[{_fmt(c.ci_low)}, {_fmt(c.ci_high)}]"
    if p is None or not (math.isfinite(c.ci_low) and math.isfinite(c.ci_high)):
        return "inconclusive", "no test possible (" + "; ".join(c.notes or ["p-value missing"]) + ")"
    stat = f"diff {_fmt(c.diff, '+.3g')}, {100 * (1 - alpha):.0f}% CI {ci}, {p_name}={_fmt(p)}"
    size = f"{_n_text(c)} per arm"

    if c.kind in ("superiority", "ordering"):
        if p < alpha and c.ci_low > 0:
            return "supported", f"A > B: {stat}"
        if c.ci_high < 0 and c.p_reverse is not None and c.p_reverse < alpha:
            return "contradicted", f"B > A: {stat}, reverse p={_fmt(c.p_reverse)}"
        return "inconclusive", f"{stat}; {size}{_power_text(c)}"

    if c.kind == "equivalence":
        m = c.margin if c.margin is not None else float("nan")
        if p < alpha:
            return "supported", f"equivalent within +-{_fmt(m)}: TOST {stat}"
        if c.ci_low >= m or c.ci_high <= -m:
            return "contradicted", f"interval outside +-{_fmt(m)}: {stat}"
        return "inconclusive", f"TOST {stat}; {size}{_power_text(c)}"

    if c.kind == "reported_value":
        r = c.reported if c.reported is not None else c.mean_b
        stat = f"reported {_fmt(r, '.4g')}, ours {_fmt(c.mean_a, '.4g')} {ci}, {p_name}={_fmt(p)}"
        if c.ci_low <= r <= c.ci_high:
            return "supported", f"reported value inside our interval: {stat}"
        if p < alpha:
            return "contradicted", f"reported value outside our interval: {stat}"
        return "inconclusive", f"outside the bootstrap interval but t-test not significant: {stat}; {size}{_power_text(c)}"

    raise ValueError(f"unknown comparison kind {c.kind!r}")


def _zero_variance_verdict(c: Comparison) -> tuple[str, str]:
    """Decide from the exact difference when every seed gives the same difference."""
    base = f"zero variance ({_n_text(c)}): exact diff {_fmt(c.diff, '+.4g')}"
    if c.kind in ("superiority", "ordering"):
        if c.diff > 1e-9 * max(1.0, abs(c.mean_a), abs(c.mean_b)):  # tolerance: float rounding
            return "supported", base + ", A > B on every seed"
        return "contradicted", base + ", A is not better than B on any seed"
    if c.kind == "equivalence":
        m = c.margin if c.margin is not None else float("nan")
        if abs(c.diff) < m:
            return "supported", f"{base}, within +-{_fmt(m)}"
        return "contradicted", f"{base}, not within +-{_fmt(m)}"
    if c.kind == "reported_value":
        if abs(c.diff) <= 1e-9 * max(1.0, abs(c.mean_b)):  # tolerance: float rounding
            return "supported", base + ", equals the reported value"
        return "contradicted", base + " from the reported value"
    raise ValueError(f"unknown comparison kind {c.kind!r}")


def verdict_ordering(
    steps: list[Comparison], *, alpha: float, p_adjusted: float | None, min_seeds: int = 2
) -> tuple[str, str]:
    """Ordering verdict (intersection-union): supported iff every step is supported,
    contradicted if any step is contradicted, else inconclusive. `p_adjusted` is the
    adjusted max step p from compare_ordering; it is at least every step's own p."""
    if not steps:
        return "inconclusive", "fewer than 2 arms"
    results = [
        verdict(s, alpha=alpha, p_adjusted=p_adjusted if not s.zero_variance else None, min_seeds=min_seeds)
        for s in steps
    ]
    for i, (v, r) in enumerate(results):
        if v == "contradicted":
            return "contradicted", f"step {i + 1}: {r}"
    for i, (v, r) in enumerate(results):
        if v != "supported":
            return "inconclusive", f"step {i + 1}: {r}"
    return "supported", "; ".join(f"step {i + 1}: {r}" for i, (_, r) in enumerate(results))

"""Statistics for checking a paper's claims against runs over several seeds.

An *arm* is a dict ``seed -> metric`` (e.g. test accuracy in %). Arms pair on the seeds both
have: every two-arm test works on the per-seed differences of those seeds (the others are named
in a note); only when fewer than 2 seeds are shared do Welch tests on all values replace them.
Non-finite values (diverged runs) are dropped and named.

Each comparison carries two raw p-values: ``p_value`` for the test that would *support* the
claim and ``p_contra`` for the test that would *contradict* it. :mod:`l2l.claims` Holm-adjusts
each of the two within the claim's family and passes both to :func:`verdict`, which applies
:data:`VERDICT_RULE` (printed in every report). All tests are t-tests from SciPy; power comes
from statsmodels (``TTestPower``) or, for TOST, from the exact integral over the sample sd.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import integrate
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.power import TTestPower

Arm = Mapping[Any, float]

POWER = 0.8
MAX_SEEDS = 1000  # beyond this a "seeds needed" figure means "not feasible"
MIN_ZERO_VARIANCE_N = 3  # constant differences on 2 seeds happen by accident (0.01-point steps)

VERDICT_RULE = """\
Every claim gets supported, contradicted or inconclusive, with a reason. alpha (params stats.alpha) is the error rate per family.
Families: each claim record names a family (default: its paper) and a role; primary claims of a family form one family, its sensitivity claims (other readings of an ambiguous method) a second one, "<family>/sensitivity". Holm's correction runs within a family, separately for the supporting and for the contradicting test of each claim; McNemar is descriptive and in no family.
Runs pair on the seeds both arms have (the others are named); with fewer than 2 shared seeds Welch tests are used. Diverged (non-finite) runs are dropped and named in the reason. Fewer than min_seeds (at least 3) values in an arm: inconclusive.
Intervals: the 95% (1 - alpha) t-interval of the mean (difference), and the family-adjusted t-interval whose each bound is at the family's first Holm level alpha/m (two-sided 1 - 2 alpha/m: a one-sided test at alpha/m rejects exactly when its bound excludes the null); no bootstrap.
Superiority A > B (effect of interest min_effect): supported if the one-sided paired t-test of diff > 0 has Holm p < alpha; contradicted if the one-sided test of diff < min_effect (diff < 0 without a min_effect) has Holm p < alpha, i.e. the family-adjusted upper bound lies below min_effect: no meaningful effect is a finding; contradiction wins when both hold.
Ordering A1 < A2 < ...: every step a superiority test at the same adjusted level; supported if every step is (intersection-union: p = the largest step p); contradicted if any step is (p = the smallest step p times the number of steps).
Equivalence |A - B| < margin: supported if the TOST p (both one-sided tests against -+margin) has Holm p < alpha; contradicted if the difference is shown outside the margin (p = twice the smaller one-sided p of diff > margin, diff < -margin), i.e. each side at alpha/2.
Reported value (the paper's number r, tolerance tol): supported if TOST shows |mean - r| < tol (Holm p < alpha); contradicted if the two-sided one-sample t-test of mean = r has Holm p < alpha and TOST does not support; otherwise inconclusive. Not excluded is never supported.
Saturation (P2): supported if end-to-end beats layerwise at full depth (superiority, min_effect) AND the paired one-sided test shows the layerwise gain over the last `window` units (default 1) below the threshold (p = the larger p); contradicted if either part is contradicted, a gain shown >= threshold included (p = twice the smaller p). The critical unit (the first within the threshold of the full-depth accuracy) is reported per seed with an order-statistics interval for its median (coverage guaranteed for any distribution, stated at the seeds used); it decides nothing.
Rise then plateau (P4's strict line): supported if generation `peak` beats generation `start` (superiority, min_effect) AND the paired one-sided test shows the gain from `peak` to `end` below the threshold (a plateau or a decline; p = the larger p); contradicted if either part is contradicted: no rise worth min_effect, or a gain shown >= threshold (still rising; p = twice the smaller p).
Cost equivalence (P5): supported if the accuracy TOST (|A - B| < margin) AND every measured cost ratio of A to B (FLOPs, latency per batch size) shows its per-seed mean below its maximum (one-sided t-test; a ratio equal on every seed, as FLOPs are, decided exactly with >= 3 seeds) are supported (p = the largest p); contradicted if the difference is shown outside the margin or any ratio is shown above its maximum (p = the smallest p times the number of parts); no cost ratio measured: inconclusive.
Zero variance (every seed gives the same difference) with at least 3 seeds: the exact difference decides (it must clear 0 and min_effect, lie inside the margin or tolerance); with fewer: inconclusive.
Inconclusive reasons give the seeds per arm the full rule needs for 80% power at the effect of interest at the family's first Holm level alpha/m (analytic: statsmodels TTestPower; TOST by the exact integral over the sample sd)."""


@dataclass
class Comparison:
    kind: str  # "superiority" | "equivalence" | "reported_value" | "ordering" | a custom kind
    n_a: int
    n_b: int
    paired: bool
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float  # (1 - alpha) t-interval of diff (of mean_a for a reported value)
    ci_high: float
    p_value: float | None  # raw p of the supporting test
    p_nonparam: float | None  # Wilcoxon / Mann-Whitney of the supporting direction: descriptive
    effect_size: float | None
    prob_superiority: float | None
    seeds_needed: int | None = None
    mcnemar_p: float | None = None  # descriptive only: never in a verdict or a family
    notes: list[str] = field(default_factory=list)
    p_contra: float | None = None  # raw p of the contradicting test
    contra_test: str = ""  # what p_contra tests, in words
    sd: float | None = None  # sd of the per-seed differences (pooled sd when unpaired; of A for a value)
    se: float | None = None  # standard error of diff
    df: float | None = None  # degrees of freedom of the t-tests
    margin: float | None = None  # equivalence margin
    reported: float | None = None  # the paper's number (reported_value)
    tolerance: float | None = None  # reported_value: |ours - paper's| that still reproduces it
    min_effect: float | None = None  # superiority: the smallest effect that matters
    effect_of_interest: float | None = None  # raw effect used for power
    zero_variance: bool = False
    dropped: list[str] = field(default_factory=list)  # runs left out: "arm a seed 3 (non-finite)"
    family_size: int | None = None  # m of its family (set by l2l.claims)
    adj_ci_low: float | None = None  # t-interval with each bound at alpha/m
    adj_ci_high: float | None = None
    power: float | None = None  # power of the full rule at the effect of interest, these seeds

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


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run a library call; its warnings and failures become None (the caller adds a note)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn()
        except (ValueError, ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError):
            return None


def _clean(arm: Arm | None, name: str, dropped: list[str]) -> dict[Any, float]:
    """Keep finite values only; a diverged (NaN) run is named, not averaged."""
    out = {}
    for k, v in (arm or {}).items():
        if v is not None and math.isfinite(float(v)):
            out[k] = float(v)
        else:
            dropped.append(f"arm {name} seed {k} (non-finite)")
    return out


def _constant(sd: float, scale: float) -> bool:
    """Zero variance up to float rounding (93.4 - 93.3 and 93.5 - 93.4 differ in the last bits)."""
    return sd <= 1e-12 * max(1.0, scale)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


def _p_t(stat: float, df: float, alternative: str) -> float:
    """p of a t statistic: 'greater' (H1: mean > null), 'less', 'two-sided'."""
    if alternative == "greater":
        return float(sps.t.sf(stat, df))
    if alternative == "less":
        return float(sps.t.cdf(stat, df))
    return float(min(1.0, 2 * sps.t.sf(abs(stat), df)))


def t_interval(est: float, se: float, df: float, level: float) -> tuple[float, float]:
    """Two-sided `level` t-interval est +- t_{(1+level)/2, df} * se."""
    q = float(sps.t.ppf(0.5 + level / 2, df))
    return est - q * se, est + q * se


@dataclass
class _Two:
    """Two arms after cleaning and pairing."""

    a: np.ndarray
    b: np.ndarray
    paired: bool
    notes: list[str]
    dropped: list[str]

    @property
    def d(self) -> np.ndarray:  # per-seed differences (paired only)
        return self.a - self.b


def _prepare(a: Arm | None, b: Arm | None) -> _Two:
    notes: list[str] = []
    dropped: list[str] = []
    ca, cb = _clean(a, "a", dropped), _clean(b, "b", dropped)
    shared = sorted(set(ca) & set(cb), key=repr)  # any consistent order; keys may be int or str
    if len(shared) >= 2:
        for name, arm in (("a", ca), ("b", cb)):
            dropped += [f"arm {name} seed {s} (no pair)" for s in sorted(set(arm) - set(shared), key=repr)]
        return _Two(np.array([ca[s] for s in shared]), np.array([cb[s] for s in shared]), True, notes, dropped)
    if ca and cb:
        notes.append(f"only {len(shared)} shared seed(s) of {len(ca)}/{len(cb)}: unpaired (Welch) tests")
    return _Two(np.array(list(ca.values())), np.array(list(cb.values())), False, notes, dropped)


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


def _spread(t: _Two) -> tuple[float, float, float]:
    """(sd, se, df) of the difference: paired d_z scale, or Welch's se/df with the pooled sd."""
    if t.paired:
        sd = float(np.std(t.d, ddof=1))
        return sd, sd / math.sqrt(t.d.size), float(t.d.size - 1)
    na, nb = t.a.size, t.b.size
    va, vb = np.var(t.a, ddof=1), np.var(t.b, ddof=1)
    pooled = float(np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2)))
    se2 = va / na + vb / nb
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if se2 > 0 else float(na + nb - 2)
    return pooled, float(math.sqrt(se2)), float(df)


def _base(kind: str, t: _Two, alpha: float) -> tuple[Comparison, bool]:
    """Fields shared by the two-arm kinds; returns (comparison, t-tests possible)."""
    nan = float("nan")
    c = Comparison(kind=kind, n_a=int(t.a.size), n_b=int(t.b.size), paired=t.paired, mean_a=_mean(t.a),
                   mean_b=_mean(t.b), diff=_mean(t.a) - _mean(t.b), ci_low=nan, ci_high=nan, p_value=None,
                   p_nonparam=None, effect_size=None, prob_superiority=_prob_superiority(t),
                   notes=list(t.notes), dropped=list(t.dropped))
    problem = _n_problem(c.n_a, c.n_b)
    if problem:
        c.notes.append(problem)
        return c, False
    sd, se, df = _spread(t)
    c.sd, c.se, c.df = sd, se, df
    scale = max(np.max(np.abs(t.a)), np.max(np.abs(t.b)))
    if _constant(sd if t.paired else se, scale):  # paired: constant differences; unpaired: both arms constant
        c.zero_variance = True
        c.ci_low = c.ci_high = c.diff
        c.notes.append("zero variance: no t-test, exact difference used")
        return c, False
    c.effect_size = c.diff / sd
    c.ci_low, c.ci_high = t_interval(c.diff, se, df, 1 - alpha)
    return c, True


def _t(c: Comparison, null: float, alternative: str) -> float:
    """p of the t-test of diff against `null` with the comparison's se and df."""
    return _p_t((c.diff - null) / c.se, c.df, alternative)  # type: ignore[operator]


def _rank_p(t: _Two, alternative: str) -> float | None:
    if t.paired:
        return _f(_quiet(lambda: sps.wilcoxon(t.a, t.b, alternative=alternative).pvalue))
    return _f(_quiet(lambda: sps.mannwhitneyu(t.a, t.b, alternative=alternative).pvalue))


def compare_superiority(a: Arm | None, b: Arm | None, *, alpha: float = 0.05, min_effect: float | None = None,
                        effect_of_interest: float | None = None, rank_test: bool = True) -> Comparison:
    """H1: A > B (one-sided). Contradicting test: diff < min_effect (diff < 0 without one)."""
    t = _prepare(a, b)
    c, testable = _base("superiority", t, alpha)
    c.min_effect = min_effect
    eoi = effect_of_interest if effect_of_interest is not None else min_effect
    c.effect_of_interest = abs(eoi) if eoi is not None else None
    bound = min_effect if min_effect is not None else 0.0
    c.contra_test = f"diff < {bound:g}"
    if rank_test and c.n_a >= 2 and c.n_b >= 2:  # descriptive; scipy's exact Wilcoxon against a constant is slow
        c.p_nonparam = _rank_p(t, "greater")
    if testable:
        c.p_value = _t(c, 0.0, "greater")
        c.p_contra = _t(c, bound, "less")
    return c


def compare_equivalence(a: Arm | None, b: Arm | None, *, margin: float, alpha: float = 0.05) -> Comparison:
    """TOST of |mean(A) - mean(B)| < margin; contradicting test: |diff| > margin, each side at alpha/2."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}")
    t = _prepare(a, b)
    c, testable = _base("equivalence", t, alpha)
    c.margin = float(margin)
    c.effect_of_interest = 0.0
    c.contra_test = f"|diff| > {margin:g}"
    if testable:
        c.p_value = max(_t(c, -margin, "greater"), _t(c, margin, "less"))
        c.p_contra = min(1.0, 2 * min(_t(c, margin, "greater"), _t(c, -margin, "less")))
    return c


def compare_reported(a: Arm | None, reported: float, *, tolerance: float, alpha: float = 0.05) -> Comparison:
    """Is arm A's mean within +-tolerance of the paper's number (TOST)? Contradicting test: the
    two-sided one-sample t-test of mean = reported."""
    if not tolerance > 0:
        raise ValueError(f"reported-value tolerance must be > 0, got {tolerance}")
    dropped: list[str] = []
    x = np.array(list(_clean(a, "a", dropped).values()))
    nan = float("nan")
    c = Comparison(kind="reported_value", n_a=int(x.size), n_b=0, paired=False, mean_a=_mean(x),
                   mean_b=float(reported), diff=_mean(x) - float(reported), ci_low=nan, ci_high=nan, p_value=None,
                   p_nonparam=None, effect_size=None,
                   prob_superiority=float(np.mean((x > reported) + 0.5 * (x == reported))) if x.size else None,
                   reported=float(reported), tolerance=float(tolerance), effect_of_interest=0.0,
                   contra_test=f"mean != {reported:g}", dropped=dropped)
    problem = _n_problem(c.n_a, None)
    if problem:
        c.notes.append(problem)
        return c
    c.sd = float(np.std(x, ddof=1))
    c.se, c.df = c.sd / math.sqrt(x.size), float(x.size - 1)
    if _constant(c.sd, float(np.max(np.abs(x)))):
        c.zero_variance = True
        c.ci_low = c.ci_high = c.mean_a
        c.notes.append("zero variance: no t-test, exact value used")
        return c
    c.effect_size = c.diff / c.sd
    c.ci_low, c.ci_high = t_interval(c.mean_a, c.se, c.df, 1 - alpha)
    c.p_value = max(_t(c, -tolerance, "greater"), _t(c, tolerance, "less"))
    c.p_contra = _t(c, 0.0, "two-sided")
    c.p_nonparam = _f(_quiet(lambda: sps.wilcoxon(x - reported).pvalue))
    return c


def intersection_union(kind: str, parts: Sequence[Comparison], shown: Comparison) -> Comparison:
    """A claim that holds iff every part holds: p = the largest supporting p (intersection-union),
    contradicting p = the smallest part's times the number of parts (Bonferroni), None when a part
    has none. `shown` carries the numbers the report shows for the whole."""
    c = shown
    c.kind = kind
    ps, cs = [], []
    for p in parts:  # a zero-variance part (>= 3 seeds) is decided exactly: p 0 or 1
        exact = _zero_variance_verdict(p, min(p.n_a, p.n_b))[0] if p.zero_variance else None
        ps.append(p.p_value if exact is None else 0.0 if exact == "supported" else 1.0)
        cs.append(p.p_contra if exact is None else 0.0 if exact == "contradicted" else 1.0)
    c.zero_variance = False  # decided through the parts' p-values above
    c.p_value = None if any(p is None for p in ps) else max(ps)  # type: ignore[type-var]
    known = [p for p in cs if p is not None]
    c.p_contra = min(1.0, len(parts) * min(known)) if known else None
    c.contra_test = "; ".join(f"part {i + 1}: {p.contra_test}" for i, p in enumerate(parts))
    c.dropped = sorted({d for p in parts for d in p.dropped})
    c.notes = list(dict.fromkeys(n for p in [shown, *parts] for n in p.notes))
    return c


def compare_ordering(arms: list[Arm | None], *, alpha: float = 0.05,
                     min_effect: float | None = None) -> tuple[Comparison, list[Comparison]]:
    """Claim arms[0] < arms[1] < ...: one superiority test per consecutive step, combined by
    :func:`intersection_union`; the whole shows the last minus the first arm."""
    steps = [compare_superiority(arms[i + 1], arms[i], alpha=alpha, min_effect=min_effect)
             for i in range(len(arms) - 1)]
    whole = compare_superiority(arms[-1], arms[0], alpha=alpha, min_effect=min_effect)
    whole.notes = []
    c = intersection_union("ordering", steps, whole)
    c.min_effect, c.effect_of_interest = min_effect, min_effect
    return c, steps


def gain_below(gains: Arm, threshold: float, *, alpha: float = 0.05) -> Comparison:
    """Per-seed gains (e.g. the last stage's accuracy minus the one before): supporting test
    mean gain < threshold (one-sided), contradicting test mean gain > threshold."""
    dropped: list[str] = []
    g = _clean(gains, "gain", dropped)
    c = compare_superiority({s: threshold for s in g}, g, alpha=alpha, rank_test=False)  # a part: never shown
    c.kind, c.dropped = "gain_below", dropped
    c.contra_test = f"gain > {threshold:g}"
    c.notes.append(f"mean gain {_fmt(-c.diff + threshold, '+.3g')} vs threshold {threshold:g}")
    return c


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Distribution-free interval for the median of the population the values come from (e.g. a
    critical layer per seed): order statistics [x_(k), x_(n+1-k)] with the largest k whose coverage
    1 - 2 P(Binomial(n, 1/2) <= k - 1) is still >= level. That coverage holds for any distribution,
    discrete ones included (there it is a lower bound). With too few values for `level` (n <= 5 at
    95%) k = 1, the range, and its coverage (93.75% at n = 5) is what is returned: no interval
    claims more than its seeds give. -> (median, low, high, coverage); NaNs without values."""
    x = np.sort([float(v) for v in values if v is not None and math.isfinite(float(v))])
    n = x.size
    if n == 0:
        return (float("nan"),) * 4  # type: ignore[return-value]

    def coverage(k: int) -> float:
        return float(1 - 2 * sps.binom.cdf(k - 1, n, 0.5))

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return float(np.median(x)), float(x[k - 1]), float(x[n - k]), coverage(k)


def compare_saturation(end_to_end_full: Arm, layerwise_full: Arm, last_gain: Arm, *, threshold: float,
                       min_effect: float | None, alpha: float = 0.05) -> Comparison:
    """P2's saturation claim: end-to-end beats layerwise at full depth (superiority, min_effect)
    AND the layerwise curve's gain over its last units (per seed; the claim's ``window``, default
    the last unit) is below `threshold` (:func:`gain_below`),
    combined by :func:`intersection_union`; the numbers shown are the full-depth comparison's."""
    gap = compare_superiority(end_to_end_full, layerwise_full, alpha=alpha, min_effect=min_effect, rank_test=False)
    gain = gain_below(last_gain, threshold, alpha=alpha)
    shown = compare_superiority(end_to_end_full, layerwise_full, alpha=alpha, min_effect=min_effect)
    c = intersection_union("saturation", [gap, gain], shown)
    c.min_effect, c.effect_of_interest = min_effect, min_effect
    return c


def compare_rise_then_plateau(start: Arm, peak: Arm, end: Arm, *, threshold: float, min_effect: float | None,
                              alpha: float = 0.05) -> Comparison:
    """A curve over generations that rises, then saturates or declines: `peak` beats `start`
    (superiority, min_effect) AND the per-seed gain end - peak is below `threshold` (:func:`gain_below`),
    combined as :func:`compare_saturation` combines its two parts; the numbers shown are peak vs start."""
    gains = {s: float(end[s]) - float(peak[s]) for s in set(peak) & set(end)}
    c = compare_saturation(peak, start, gains, threshold=threshold, min_effect=min_effect, alpha=alpha)
    c.kind = "rise_then_plateau"
    return c


def compare_cost_equivalence(a: Arm, b: Arm, ratios: Mapping[str, Arm], ratio_max: Mapping[str, float], *,
                             margin: float, alpha: float = 0.05) -> Comparison:
    """About the same accuracy (TOST within +-margin) AND each cost ratio of A to B (name -> per-seed
    values, e.g. flops_ratio, latency_ratio_b1) below its maximum (ratio_max[name], :func:`gain_below`
    on the ratio), combined by :func:`intersection_union`; the numbers shown are the accuracy TOST's.
    No ratio at all: the cost side is unmeasured, and an empty part keeps the claim inconclusive."""
    parts = [compare_equivalence(a, b, margin=margin, alpha=alpha)]
    for name, values in (ratios.items() if ratios else [("cost ratios", {})]):
        bound = float(ratio_max.get(name, float("nan")))
        part = gain_below(values, bound, alpha=alpha)
        part.contra_test = f"{name} > {bound:g}"
        part.notes = [f"{name}: mean {_fmt(-part.diff + bound, '.3g')} vs max {bound:g}"] if values else \
            [f"{name}: not measured"]
        parts.append(part)
    c = intersection_union("cost_equivalence", parts, compare_equivalence(a, b, margin=margin, alpha=alpha))
    c.margin, c.effect_of_interest = float(margin), 0.0
    return c


def mcnemar_paired(pred_a: np.ndarray, pred_b: np.ndarray, y: np.ndarray) -> tuple[float | None, np.ndarray]:
    """McNemar test on per-example correctness of A vs B (same examples, same order).

    Table [[both right, A right B wrong], [A wrong B right, both wrong]]. Exact binomial
    when fewer than 25 discordant examples, else chi-square with continuity correction.
    No discordant examples -> p = 1.0 (the models agree on every example); no examples -> None.
    It tests two trained networks, not two methods: descriptive only, never in a verdict.
    """
    pred_a, pred_b, y = np.asarray(pred_a), np.asarray(pred_b), np.asarray(y)
    if not (pred_a.shape == pred_b.shape == y.shape):
        raise ValueError(f"shape mismatch: {pred_a.shape}, {pred_b.shape}, {y.shape}")
    ra, rb = pred_a == y, pred_b == y
    table = np.array([[np.sum(ra & rb), np.sum(ra & ~rb)], [np.sum(~ra & rb), np.sum(~ra & ~rb)]], dtype=int)
    if y.size == 0:
        return None, table
    discordant = int(table[0, 1] + table[1, 0])
    if discordant == 0:
        return 1.0, table
    res = mcnemar(table, exact=discordant < 25, correction=True)
    return _f(res.pvalue), table


def combine_mcnemar(pvalues: list[float | None]) -> float | None:
    """Fisher's combination of per-seed McNemar p-values (None entries skipped): descriptive."""
    ps = [float(p) for p in pvalues if _f(p) is not None]
    if not ps:
        return None
    if len(ps) == 1:
        return ps[0]
    return _f(_quiet(lambda: sps.combine_pvalues(ps, method="fisher").pvalue))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values over the non-None entries; None (and NaN) stay None."""
    # Not statsmodels' multipletests: its Holm branch runs gc.collect() on every call (18 ms a call
    # measured here, 2026-12-01), which the calibration benchmark would pay thousands of times; tests
    # check both agree.
    idx = [i for i, p in enumerate(pvalues) if _f(p) is not None]
    out: list[float | None] = [None] * len(pvalues)
    if idx:
        p = np.array([float(pvalues[i]) for i in idx])  # type: ignore[arg-type]
        order = np.argsort(p, kind="stable")
        adj = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
        for k, j in enumerate(order):
            out[idx[j]] = float(adj[k])
    return out


# --- power of the rule ----------------------------------------------------------------------

def tost_power(delta: float, bound: float, sd: float, n: int, alpha: float) -> float:
    """Exact power of the one-sample (paired) TOST of |mean| < bound at true mean `delta`.

    Given the sample sd s, TOST rejects iff -bound + c s/sqrt(n) < mean < bound - c s/sqrt(n)
    (c = t_{1-alpha, n-1}); the mean is N(delta, sd^2/n) independent of s, and
    s^2 (n-1)/sd^2 is chi-square(n-1): integrate the normal probability over it.
    """
    if n < 2 or sd <= 0:
        return float("nan")
    c = float(sps.t.ppf(1 - alpha, n - 1))
    rn, k = math.sqrt(n), n - 1
    u_max = k * n * bound**2 / (c * sd) ** 2  # beyond it the acceptance region is empty

    def inside(u: float) -> float:
        half = bound - c * sd * math.sqrt(u / k) / rn
        return (sps.norm.cdf((half - delta) * rn / sd) - sps.norm.cdf((-half - delta) * rn / sd)) * sps.chi2.pdf(u, k)

    return float(min(1.0, max(0.0, integrate.quad(inside, 0, u_max, limit=200)[0])))


def _sup_power(effect: float, sd: float, n: int, alpha: float) -> float:
    return float(TTestPower().power(effect / sd, n, alpha, alternative="larger"))


def rule_power(kind: str, n: int, sd: float, alpha_step: float, *, effect: float | None = None,
               bound: float | None = None, parts: int = 1) -> tuple[float | None, str]:
    """Power of the full rule at the effect of interest with n paired seeds, sd of a per-seed
    difference (of one arm for a reported value), each test at alpha_step (the family's first Holm
    level alpha/m: Holm rejects at least as often). -> (power, how: "exact" | "lower bound").

    superiority / early_overfit: one-sided t-test at true diff `effect` (exact, TTestPower).
    ordering (`parts` steps), saturation and rise_then_plateau (2 parts): every part must reject:
    Bonferroni lower bound 1 - sum(1 - power of a part). equivalence / reported_value: exact TOST
    power at true diff 0 against `bound` (margin / tolerance); cost_equivalence: the same, an upper
    bound (its cost parts must hold too).
    """
    if n < 2 or not sd > 0:
        return None, ""
    if kind in ("equivalence", "reported_value"):
        return tost_power(0.0, float(bound), sd, n, alpha_step), "exact"  # type: ignore[arg-type]
    if kind == "cost_equivalence":  # the accuracy part's; the cost parts can only lower it
        return tost_power(0.0, float(bound), sd, n, alpha_step), "upper bound (accuracy part)"  # type: ignore[arg-type]
    if effect is None or not effect > 0:
        return None, ""
    p = _sup_power(effect, sd, n, alpha_step)
    if kind in ("saturation", "rise_then_plateau"):  # part 2: gain below threshold at a true gain of 0
        p2 = _sup_power(float(bound), sd, n, alpha_step) if bound else 0.0
        return max(0.0, p + p2 - 1), "lower bound"
    if parts > 1:
        return max(0.0, 1 - parts * (1 - p)), "lower bound"
    return p, "exact"


def seeds_for_power(power_at: Callable[[int], float | None], target: float = POWER, start: int = 3) -> int | None:
    """Smallest n >= start with power_at(n) >= target (power rises with n): bracket, then bisect."""
    hi = start
    while (power_at(hi) or 0.0) < target:
        if hi > MAX_SEEDS:
            return None
        hi *= 2
    lo = max(start, hi // 2)
    if (power_at(lo) or 0.0) >= target:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if (power_at(mid) or 0.0) >= target else (mid, hi)
    return hi


# --- the verdict ----------------------------------------------------------------------------

def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _n_text(c: Comparison) -> str:
    return f"n={c.n_a}" if c.n_a == c.n_b or c.kind == "reported_value" else f"n={c.n_a}/{c.n_b}"


def _tail(c: Comparison) -> str:
    """What an inconclusive reason adds: the seeds the full rule needs, and dropped runs."""
    out = ""
    if c.seeds_needed is not None:
        out += f"; ~{c.seeds_needed} seeds per arm needed for 80% power at effect {_fmt(c.effect_of_interest)}"
    return out


def _dropped_text(c: Comparison) -> str:
    return f" [dropped: {', '.join(c.dropped)}]" if c.dropped else ""


def verdict(c: Comparison, *, alpha: float, p_adjusted: float | None, p_contra_adjusted: float | None,
            min_seeds: int = 3) -> tuple[str, str]:
    """Apply VERDICT_RULE to one comparison with its family-adjusted (Holm) p-values."""
    v, r = _verdict(c, alpha, p_adjusted, p_contra_adjusted, max(min_seeds, 2))
    return v, r + _dropped_text(c)


def _verdict(c: Comparison, alpha: float, p: float | None, pc: float | None, min_seeds: int) -> tuple[str, str]:
    n_b = None if c.kind == "reported_value" else c.n_b
    problem = _n_problem(c.n_a, n_b)
    if problem:
        return "inconclusive", problem
    n_min = c.n_a if n_b is None else min(c.n_a, n_b)
    if n_min < min_seeds:
        return "inconclusive", f"only {n_min} seeds (< {min_seeds}): no test possible"
    if c.zero_variance:
        return _zero_variance_verdict(c, n_min)
    if p is None and pc is None:
        return "inconclusive", "no test possible (" + "; ".join(c.notes or ["p-value missing"]) + ")"
    ci = f"[{_fmt(c.ci_low)}, {_fmt(c.ci_high)}]"
    adj = f"family-adjusted [{_fmt(c.adj_ci_low)}, {_fmt(c.adj_ci_high)}]" if c.adj_ci_low is not None else ""
    ps = f"Holm p={_fmt(p)}, contradicting test ({c.contra_test}) Holm p={_fmt(pc)}"
    size = f"{_n_text(c)}"
    sup = p is not None and p < alpha
    con = pc is not None and pc < alpha
    if c.kind == "reported_value":
        stat = f"reported {_fmt(c.reported, '.4g')} +-{_fmt(c.tolerance)}, ours {_fmt(c.mean_a, '.4g')} " \
               f"95% CI {ci} {adj}, {ps}, {size}"
        if sup:
            return "supported", f"within +-{_fmt(c.tolerance)} of the paper's number (TOST): {stat}"
        if con:
            return "contradicted", f"the paper's number is rejected: {stat}"
        return "inconclusive", f"neither within tolerance nor rejected: {stat}{_tail(c)}"
    stat = f"diff {_fmt(c.diff, '+.3g')}, 95% CI {ci} {adj}, {ps}, {size}"
    if c.kind == "cost_equivalence":
        cost = "; ".join(n for n in c.notes if " vs max " in n or n.endswith("not measured"))
        if sup:
            return "supported", f"equivalent within +-{_fmt(c.margin)} (TOST) and every cost ratio below its " \
                                f"maximum ({cost}): {stat}"
        if con:
            return "contradicted", f"difference shown outside +-{_fmt(c.margin)} or a cost ratio shown above " \
                                   f"its maximum ({cost}): {stat}"
        return "inconclusive", f"accuracy TOST or a cost ratio not shown ({cost}): {stat}{_tail(c)}"
    if c.kind == "equivalence":
        if sup:
            return "supported", f"equivalent within +-{_fmt(c.margin)} (TOST): {stat}"
        if con:
            return "contradicted", f"difference shown outside +-{_fmt(c.margin)}: {stat}"
        return "inconclusive", f"TOST not significant: {stat}{_tail(c)}"
    # superiority, ordering and the intersection-union kinds (saturation, ...)
    if con:
        why = "A is worse than B" if c.ci_high < 0 else \
            f"effect shown below what matters (min_effect {_fmt(c.min_effect)}, the contradicting test)"
        return "contradicted", f"{why}: {stat}"
    if sup:
        what = "rises (peak > start), then the gain after the peak is shown below the threshold" \
            if c.kind == "rise_then_plateau" else "A > B"
        return "supported", f"{what}: {stat}"
    return "inconclusive", f"{stat}{_tail(c)}"


def _zero_variance_verdict(c: Comparison, n: int) -> tuple[str, str]:
    """Decide from the exact difference when every seed gives the same difference (n >= 3 only)."""
    base = f"zero variance ({_n_text(c)}): exact diff {_fmt(c.diff, '+.4g')}"
    if n < MIN_ZERO_VARIANCE_N:
        return "inconclusive", base + f"; fewer than {MIN_ZERO_VARIANCE_N} seeds: can be chance"
    tol = 1e-9 * max(1.0, abs(c.mean_a), abs(c.mean_b))  # tolerance: float rounding
    if c.kind == "equivalence":
        ok = abs(c.diff) < c.margin  # type: ignore[operator]
        return ("supported" if ok else "contradicted"), f"{base}, {'' if ok else 'not '}within +-{_fmt(c.margin)}"
    if c.kind == "reported_value":
        ok = abs(c.diff) < c.tolerance  # type: ignore[operator]
        return ("supported" if ok else "contradicted"), f"{base} from the paper's number, " \
            f"{'' if ok else 'not '}within +-{_fmt(c.tolerance)}"
    bound = c.min_effect if c.min_effect is not None else 0.0
    if c.diff > tol and c.diff >= bound - tol:
        return "supported", base + ", A > B on every seed"
    return "contradicted", base + f", below {_fmt(bound)} on every seed"


def adjust(c: Comparison, m: int, alpha: float) -> None:
    """Set the family size and the family-adjusted interval: each bound at alpha/m (two-sided 1 - 2 alpha/m)."""
    c.family_size = m
    if c.se is not None and c.df is not None and c.se > 0:
        est = c.mean_a if c.kind == "reported_value" else c.diff
        c.adj_ci_low, c.adj_ci_high = t_interval(est, c.se, c.df, 1 - 2 * alpha / m)

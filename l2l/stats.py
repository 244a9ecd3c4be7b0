"""Statistics for checking a paper's claims against runs over several seeds: the verdict rule.

An *arm* is a dict ``seed -> metric`` (e.g. test accuracy in %). Arms pair on the seeds both
have: every two-arm test works on the per-seed differences of those seeds (the others are named
in a note); only when fewer than 2 shared seeds remain do Welch tests on all values replace them.
Non-finite values are dropped and named. Runs that failed by the pre-registered rule never reach
this module: :mod:`l2l.claims` removes them first and names them.

Every claim kind is a set of one-sided t-tests of *quantities* (a per-seed difference, our mean
minus the paper's number, a gain, a cost ratio) against bounds (:class:`Tests`): the supporting
test rejects when all its one-sided tests do (intersection-union), the contradicting test when any
of its K does at a K-th of its level (Bonferroni). Seeds come in looks (:class:`Design`): at each
look a claim's tests get the level its family's error-spending allows (:func:`run_family`: Holm's
sharing across the family's claims, Lan-DeMets spending across looks, futility), and a claim stops
when it is decided. :data:`VERDICT_RULE` (printed in every report) states all of it. The
computations are vectorised over a leading axis of replicates, so that `l2l plan` and
benchmarks/calibration.py simulate the very functions the claims stage runs. The t distribution
comes from SciPy (``scipy.special.stdtr``/``stdtrit``: what ``scipy.stats.t`` calls, without its
per-call overhead); power from statsmodels (``TTestPower``) or, for TOST, the exact integral.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import integrate, special
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.power import TTestPower

Arm = Mapping[Any, float]

POWER = 0.8
MAX_SEEDS = 1000  # beyond this a "seeds needed" figure means "not feasible"
CONFIDENCE = 0.95  # the reported interval: a repeated confidence interval over the looks (one look: the usual one)
SPENDING = ("obrien_fleming", "pocock")
ZERO = 1e-9  # an se below ZERO x max(1, |estimate|) is zero variance (float rounding of equal per-seed values)

VERDICT_RULE = """\
Every claim gets supported, contradicted or inconclusive, with a reason. alpha (params stats.alpha) bounds the family-wise error, over every look: the probability that any claim of a family is wrongly supported is at most alpha, and so is the probability that any is wrongly contradicted.
Families: each claim record names a family (default: its paper) and a role; primary claims of a family form one family, its sensitivity claims (other readings of an ambiguous method) a second one, "<family>/sensitivity". McNemar is descriptive and in no family.
Failed runs (stats.failed_run, fixed before any accuracy is seen): a run failed if its final training loss is not finite or its final training accuracy (the last epoch's, on the training images) is below the floor of its dataset (about chance plus a margin). A failed run is excluded, named in the reason and counted per arm; more than max_per_arm failed runs in an arm make the claim inconclusive (MLPerf's rule: failures count and are reported). No outlier test touches test accuracy; a non-finite test metric is dropped and named.
Runs pair on the seeds both arms have (the others are named); with fewer than 2 shared seeds Welch tests are used. Fewer than min_seeds (at least 3) values in an arm: no test at that look.
Tests: every kind is a set of one-sided t-tests of quantities against bounds. The supporting test rejects when every one of its one-sided tests rejects at the support level (intersection-union: p = the largest); the contradicting test rejects when any of its K one-sided tests rejects at the contra level / K (Bonferroni: p = K x the smallest). Not rejected is never supported; not equal is never outside a tolerance.
Superiority A > B (min_effect): supporting diff > 0; contradicting diff < min_effect (diff < 0 without one): no meaningful effect is a finding; contradiction wins when both hold.
Ordering A1 < A2 < ...: supporting every step > 0; contradicting any step < min_effect (0 without one).
Equivalence |A - B| < margin: supporting diff > -margin and diff < margin (TOST); contradicting diff > margin or diff < -margin.
Reported value (the paper's number r, tolerance tol): the quantity is our mean - r; supporting -tol < ours - r < tol (TOST); contradicting ours - r > tol or ours - r < -tol: the difference shown outside the tolerance. Rejecting "ours = r" contradicts nothing.
Saturation (P2): supporting end-to-end - layerwise at full depth > 0 AND the layerwise gain over the last `window` units (per seed, default 1) < threshold; contradicting the gap < min_effect OR the gain > threshold (a curve that keeps improving). The critical unit (the first within the threshold of the full-depth accuracy) is reported per seed with an order-statistics interval for its median (coverage guaranteed for any distribution, stated at the seeds used); it decides nothing.
Rise then plateau (P4's strict line): supporting generation `peak` - `start` > 0 AND the gain from `peak` to `end` < threshold; contradicting the rise < min_effect OR the gain > threshold (still rising).
Cost equivalence (P5): supporting the accuracy TOST (|A - B| < margin) AND every measured cost ratio of A to B (FLOPs, latency per batch size) below its maximum; contradicting the difference outside the margin OR any ratio above its maximum; no cost ratio measured: not supported.
Zero variance (every seed gives the same value of a quantity): the same one-sided tests in their limit (se 0: p = 0 when the estimate lies beyond the bound, else 1), with at least min_seeds seeds, in the claim's family like any other claim.
Looks (the group-sequential design, params stats.sequential): seeds come in looks of n_1 < n_2 < ... < n_K seeds per arm (n_K: the cap); a look adds the same new seeds to every arm of the claims that continue, so pairing by seed stays. At look k a one-sided test of a claim rejects when its exact t-test p is at most f(t_k; a) - f(t_(k-1); a): the share of the claim's level a that a Lan-DeMets spending function f gives to information fraction t_k = n_k / n_K (O'Brien-Fleming-like f = 2 - 2 Phi(z_(1-a/2) / sqrt t), the default, spends little early; Pocock-like f = a ln(1 + (e - 1) t) evenly). Looks below min_seeds test and spend nothing. Within a family the level is shared as Holm shares it, separately for the supporting and the contradicting direction: a = alpha / (the family's claims not yet rejected in that direction), recomputed after every rejection, so a decided claim passes its share on (graphical Holm for group-sequential tests, Maurer & Bretz 2013). The union of all these tests over looks and claims has probability at most alpha under any truth and any correlation between claims or looks (Bonferroni over looks, Holm over claims): the family-wise error over all looks is at most alpha, with the exact t distribution at every look (no normal approximation at 3-5 seeds). With one look (the fixed plan, run.yaml seeds: profile) this is Holm's procedure at alpha.
Stopping: a claim stops at the first look where it is supported or contradicted; when futility is shown (the predictive probability of deciding by the cap: the cap's mean predicted from today's estimate and sd, the truth unknown around the estimate (flat prior), t with the look's degrees of freedom, all the level left spent at the cap, is below stats.sequential.futility); when an arm has more failed runs than allowed; or at the cap (inconclusive). Futility rejects nothing, so it cannot raise an error rate (non-binding). A stopped claim's arms get no more seeds unless a claim that continues needs them, and its verdict is that of its stopping look whatever seeds its arms gain later.
Intervals: the interval printed beside a verdict is the decision interval, the t-interval whose bounds the decision compared with the claim's bounds: supported, both bounds at the support level (its lower bound above 0 for a superiority); contradicted, the contradicting quantity's at the contra level / K; inconclusive, the shown quantity's at the smaller of the two levels (it then lies neither inside the supporting region nor beyond the contradicting bound). The 95% interval reported at a look is a repeated confidence interval, each bound at (f(t_k; 0.05) - f(t_(k-1); 0.05)) / 2, which holds the true value with probability at least 95% at whatever look the claim stops (one look: the usual 95% t-interval). No bootstrap."""


# --- the t distribution, vectorised ------------------------------------------------------------

def t_sf(x: Any, df: Any) -> np.ndarray:
    """P(T_df > x) elementwise."""
    return special.stdtr(df, -np.asarray(x, dtype=float))


def t_quantile(q: Any, df: Any) -> np.ndarray:
    """The t_df quantile of q (P(T_df <= t) = q) elementwise."""
    return special.stdtrit(df, q)


def sample_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean, se, df, n) of one-sample t-tests over the last axis; NaN entries are missing values.
    Vectorised over the leading axes (replicates): the simulation and the claims stage share it."""
    x = np.asarray(x, dtype=float)
    ok = np.isfinite(x)
    n = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0.0).sum(-1) / n
        var = np.where(ok, (x - mean[..., None]) ** 2, 0.0).sum(-1) / (n - 1)
        se = np.sqrt(var / n)
    return mean, np.where(n >= 2, se, np.nan), (n - 1).astype(float), n


# --- what a kind tests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Side:
    """One one-sided t-test: H1 quantity[q] > null (greater) or < null."""

    q: int
    null: float
    greater: bool

    def text(self, labels: Sequence[str]) -> str:
        return f"{labels[self.q]} {'>' if self.greater else '<'} {self.null:g}"


@dataclass(frozen=True)
class Tests:
    """A claim kind's tests on its quantities: every supporting side must reject (intersection-union),
    any contradicting side rejects at the contra level / K. `shown`: the quantity the report shows."""

    labels: tuple[str, ...]
    support: tuple[Side, ...]
    contra: tuple[Side, ...]
    shown: int = 0

    def contra_text(self) -> str:
        return " or ".join(s.text(self.labels) for s in self.contra)

    def support_text(self) -> str:
        return " and ".join(s.text(self.labels) for s in self.support)


def superiority_tests(min_effect: float | None, label: str = "diff") -> Tests:
    return Tests((label,), (Side(0, 0.0, True),), (Side(0, float(min_effect or 0.0), False),))


def within_tests(bound: float, label: str = "diff") -> Tests:
    """|quantity| < bound (TOST), contradicted by |quantity| > bound: equivalence and reported values."""
    b = float(bound)
    return Tests((label,), (Side(0, -b, True), Side(0, b, False)), (Side(0, b, True), Side(0, -b, False)))


def ordering_tests(steps: int, min_effect: float | None) -> Tests:
    """Every step > 0, contradicted by any step < min_effect; shows last - first (no test of its own)."""
    labels = tuple(f"step {i + 1}" for i in range(steps)) + ("last - first",)
    me = float(min_effect or 0.0)
    return Tests(labels, tuple(Side(i, 0.0, True) for i in range(steps)),
                 tuple(Side(i, me, False) for i in range(steps)), shown=steps)


def rise_then_gain_tests(labels: tuple[str, str], min_effect: float | None, threshold: float) -> Tests:
    """Saturation and rise-then-plateau: quantity 0 > 0 AND quantity 1 (a gain) < threshold;
    contradicted by quantity 0 < min_effect OR the gain > threshold."""
    t = float(threshold)
    return Tests(labels, (Side(0, 0.0, True), Side(1, t, False)), (Side(0, float(min_effect or 0.0), False),
                                                                   Side(1, t, True)))


def saturation_tests(min_effect: float | None, threshold: float, keeps_improving: bool) -> Tests:
    """Saturation's two parts (rise_then_gain_tests: the gap, the layerwise gain); with P2's other reading of
    its end-to-end side (keeps_improving) a third: the end-to-end probes' gain over the same units > 0,
    contradicted when shown below `threshold`."""
    two = rise_then_gain_tests(("gap", "gain"), min_effect, threshold)
    if not keeps_improving:
        return two
    return Tests(two.labels + ("probe gain",), two.support + (Side(2, 0.0, True),),
                 two.contra + (Side(2, float(threshold), False),))


def cost_tests(margin: float, maxima: Sequence[tuple[str, float]]) -> Tests:
    """Accuracy within +-margin AND every cost ratio below its maximum; contradicted by either side shown."""
    m = float(margin)
    labels = ("diff",) + tuple(name for name, _ in maxima)
    ratios = [(i + 1, float(mx)) for i, (_, mx) in enumerate(maxima)]
    return Tests(labels, (Side(0, -m, True), Side(0, m, False), *(Side(i, mx, False) for i, mx in ratios)),
                 (Side(0, m, True), Side(0, -m, False), *(Side(i, mx, True) for i, mx in ratios)))


def side_p(side: Side, est: np.ndarray, se: np.ndarray, df: np.ndarray) -> np.ndarray:
    """p of one side; zero variance decides in the limit (p 0 beyond the bound, else 1); NaN: no test."""
    est, se, df = (np.asarray(v, dtype=float)[..., side.q] for v in (est, se, df))
    d = est - side.null if side.greater else side.null - est
    scale = ZERO * np.maximum(1.0, np.abs(est))
    zero = se <= scale
    with np.errstate(invalid="ignore", divide="ignore"):
        p = t_sf(d / np.where(zero, 1.0, se), df)
    p = np.where(zero, np.where(d > scale, 0.0, 1.0), p)
    return np.where(np.isfinite(est) & np.isfinite(se) & (df >= 1), p, np.nan)


def p_values(tests: Tests, est: np.ndarray, se: np.ndarray, df: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(supporting p, contradicting p) over replicates: the largest supporting side's p (NaN when one
    has no test), K x the smallest known contradicting p (NaN when none is known)."""
    ps = np.stack([side_p(s, est, se, df) for s in tests.support], -1)
    pc = np.stack([side_p(s, est, se, df) for s in tests.contra], -1)
    known = np.isfinite(pc)
    contra = np.minimum(1.0, len(tests.contra) * np.min(np.where(known, pc, np.inf), -1))
    return np.max(ps, -1), np.where(known.any(-1), contra, np.nan)


def bounds(est: Any, se: Any, df: Any, level: Any) -> tuple[np.ndarray, np.ndarray]:
    """The t-interval whose each bound is a one-sided test at `level` (two-sided 1 - 2 level)."""
    est, se, level = np.asarray(est, dtype=float), np.asarray(se, dtype=float), np.asarray(level, dtype=float)
    with np.errstate(invalid="ignore"):
        q = np.where(level > 0, -t_quantile(np.where(level > 0, level, 0.5), df), np.inf)  # level 0: no bound
        half = np.where(se > ZERO * np.maximum(1.0, np.abs(est)), q * se, np.where(level > 0, 0.0, np.inf))
    return est - half, est + half


# --- comparisons (one claim, one look) -----------------------------------------------------------

@dataclass
class Comparison:
    kind: str  # "superiority" | "equivalence" | "reported_value" | "ordering" | a custom kind
    n_a: int
    n_b: int
    paired: bool
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float  # 95% interval of diff (of mean_a for a reported value); a repeated one at a look of a design
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
    adj_ci_low: float | None = None  # the decision interval of the shown estimate (of mean_a for a value)
    adj_ci_high: float | None = None
    power: float | None = None  # power of the fixed one-look rule at the effect of interest, these seeds
    quantities: list[dict] = field(default_factory=list)  # per tested quantity: label, est, se, df, n
    tests: Tests | None = None
    decision: dict | None = None  # the decision interval: quantity, low, high, level (one-sided, each bound)
    level_support: float | None = None  # the levels the stopping look gave the two tests
    level_contra: float | None = None

    def to_dict(self) -> dict:
        """JSON-safe dict: numpy scalars become Python ones, NaN/inf become None."""
        return json_safe(asdict(self))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(est, se, df) of the quantities, shaped (1, Q): one replicate for run_family."""
        q = self.quantities
        return tuple(np.array([[np.nan if x[k] is None else x[k] for x in q]], dtype=float)
                     for k in ("est", "se", "df"))  # type: ignore[return-value]

    @property
    def n(self) -> int:
        """Seeds per arm behind the tests (the fewest of the arms)."""
        return self.n_a if self.kind == "reported_value" or not self.n_b else min(self.n_a, self.n_b)


def json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
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
    """Keep finite values only; a non-finite metric is named, not averaged."""
    out = {}
    for k, v in (arm or {}).items():
        if v is not None and math.isfinite(float(v)):
            out[k] = float(v)
        else:
            dropped.append(f"arm {name} seed {k} (non-finite)")
    return out


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


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


def _zero(se: float | None, est: float) -> bool:
    return se is not None and se <= ZERO * max(1.0, abs(est))


def _quantity(label: str, est: float, se: float | None, df: float | None, n: int) -> dict:
    return {"label": label, "est": est, "se": se, "df": df, "n": n}


def _base(kind: str, t: _Two, alpha: float) -> Comparison:
    """Fields shared by the two-arm kinds: means, the difference, its sd/se/df and 95% interval."""
    nan = float("nan")
    c = Comparison(kind=kind, n_a=int(t.a.size), n_b=int(t.b.size), paired=t.paired, mean_a=_mean(t.a),
                   mean_b=_mean(t.b), diff=_mean(t.a) - _mean(t.b), ci_low=nan, ci_high=nan, p_value=None,
                   p_nonparam=None, effect_size=None, prob_superiority=_prob_superiority(t),
                   notes=list(t.notes), dropped=list(t.dropped))
    problem = _n_problem(c.n_a, c.n_b)
    if problem:
        c.notes.append(problem)
        return c
    c.sd, c.se, c.df = _spread(t)
    if _zero(c.se, c.diff):  # paired: constant differences; unpaired: both arms constant
        c.zero_variance = True
        c.notes.append("zero variance: the tests' limit decides (p 0 beyond a bound, else 1)")
    else:
        c.effect_size = c.diff / c.sd
    lo, hi = bounds(c.diff, c.se, c.df, alpha / 2)  # the (1 - alpha) interval: 95% at alpha 0.05
    c.ci_low, c.ci_high = float(lo), float(hi)
    return c


def _apply(c: Comparison, tests: Tests, quantities: list[dict]) -> Comparison:
    """Set the comparison's tests, quantities and raw p-values (None where a quantity has no test)."""
    c.tests, c.quantities = tests, quantities
    c.contra_test = tests.contra_text()
    ps, pc = p_values(tests, *c.arrays())
    c.p_value, c.p_contra = _f(ps[0]), _f(pc[0])
    c.zero_variance = c.zero_variance or any(_zero(q["se"], q["est"]) for q in quantities if q["n"] >= 2)
    return c


def _rank_p(t: _Two, alternative: str) -> float | None:
    if t.paired:
        return _f(_quiet(lambda: sps.wilcoxon(t.a, t.b, alternative=alternative).pvalue))
    return _f(_quiet(lambda: sps.mannwhitneyu(t.a, t.b, alternative=alternative).pvalue))


def _diff_quantity(c: Comparison, label: str = "diff") -> dict:
    return _quantity(label, c.diff, c.se, c.df, c.n)


def compare_superiority(a: Arm | None, b: Arm | None, *, alpha: float = 0.05, min_effect: float | None = None,
                        effect_of_interest: float | None = None, rank_test: bool = True) -> Comparison:
    """H1: A > B (one-sided). Contradicting test: diff < min_effect (diff < 0 without one)."""
    t = _prepare(a, b)
    c = _base("superiority", t, alpha)
    c.min_effect = min_effect
    eoi = effect_of_interest if effect_of_interest is not None else min_effect
    c.effect_of_interest = abs(eoi) if eoi is not None else None
    if rank_test and c.n_a >= 2 and c.n_b >= 2:  # descriptive; scipy's exact Wilcoxon against a constant is slow
        c.p_nonparam = _rank_p(t, "greater")
    return _apply(c, superiority_tests(min_effect), [_diff_quantity(c)])


def compare_equivalence(a: Arm | None, b: Arm | None, *, margin: float, alpha: float = 0.05) -> Comparison:
    """TOST of |mean(A) - mean(B)| < margin; contradicting test: |diff| > margin (each side at a half)."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}")
    c = _base("equivalence", _prepare(a, b), alpha)
    c.margin, c.effect_of_interest = float(margin), 0.0
    return _apply(c, within_tests(margin), [_diff_quantity(c)])


def compare_reported(a: Arm | None, reported: float, *, tolerance: float, alpha: float = 0.05) -> Comparison:
    """Is arm A's mean within +-tolerance of the paper's number (TOST)? Contradicting test: our mean
    shown more than the tolerance from it (one-sided tests against +-tolerance, each at a half)."""
    if not tolerance > 0:
        raise ValueError(f"reported-value tolerance must be > 0, got {tolerance}")
    dropped: list[str] = []
    x = np.array(list(_clean(a, "a", dropped).values()))
    nan = float("nan")
    c = Comparison(kind="reported_value", n_a=int(x.size), n_b=0, paired=False, mean_a=_mean(x),
                   mean_b=float(reported), diff=_mean(x) - float(reported), ci_low=nan, ci_high=nan, p_value=None,
                   p_nonparam=None, effect_size=None,
                   prob_superiority=float(np.mean((x > reported) + 0.5 * (x == reported))) if x.size else None,
                   reported=float(reported), tolerance=float(tolerance), effect_of_interest=0.0, dropped=dropped)
    problem = _n_problem(c.n_a, None)
    if problem:
        c.notes.append(problem)
    else:
        c.sd = float(np.std(x, ddof=1))
        c.se, c.df = c.sd / math.sqrt(x.size), float(x.size - 1)
        lo, hi = bounds(c.mean_a, c.se, c.df, alpha / 2)
        c.ci_low, c.ci_high = float(lo), float(hi)
        if _zero(c.se, c.mean_a):
            c.notes.append("zero variance: the tests' limit decides (p 0 beyond a bound, else 1)")
        else:
            c.effect_size = c.diff / c.sd
            c.p_nonparam = _f(_quiet(lambda: sps.wilcoxon(x - reported).pvalue))
    return _apply(c, within_tests(tolerance, "ours - paper"), [_diff_quantity(c, "ours - paper")])


def _one_sample(values: Arm, label: str) -> tuple[dict, list[str]]:
    """A per-seed quantity tested against a constant (a gain, a cost ratio): its t-test statistics."""
    dropped: list[str] = []
    x = np.array(list(_clean(values, label, dropped).values()))
    mean, se, df, n = (float(v) for v in sample_stats(x))
    return _quantity(label, mean, None if not math.isfinite(se) else se, df if n >= 2 else None, int(n)), dropped


def _combined(kind: str, shown: Comparison, tests: Tests, quantities: list[dict], parts: Sequence[Comparison] = (),
              dropped: Sequence[str] = ()) -> Comparison:
    """A claim of several quantities: `shown` carries the numbers the report shows for the whole."""
    c = shown
    c.kind = kind
    c.dropped = sorted({*c.dropped, *dropped, *(d for p in parts for d in p.dropped)})
    c.notes = list(dict.fromkeys(n for p in [shown, *parts] for n in p.notes))
    return _apply(c, tests, quantities)


def compare_ordering(arms: list[Arm | None], *, alpha: float = 0.05,
                     min_effect: float | None = None) -> tuple[Comparison, list[Comparison]]:
    """Claim arms[0] < arms[1] < ...: each consecutive step a superiority test, all of which must
    support (intersection-union), any of which contradicts; the whole shows the last minus the first arm."""
    steps = [compare_superiority(arms[i + 1], arms[i], alpha=alpha, min_effect=min_effect)
             for i in range(len(arms) - 1)]
    whole = compare_superiority(arms[-1], arms[0], alpha=alpha, min_effect=min_effect)
    whole.notes = []
    quantities = [_diff_quantity(s, f"step {i + 1}") for i, s in enumerate(steps)] + [_diff_quantity(whole,
                                                                                                   "last - first")]
    c = _combined("ordering", whole, ordering_tests(len(steps), min_effect), quantities, steps)
    c.min_effect, c.effect_of_interest = min_effect, min_effect
    return c, steps


def _two_part(kind: str, labels: tuple[str, str], better: Arm, worse: Arm, gains: Arm, threshold: float,
              min_effect: float | None, alpha: float, probe_gain: Arm | None = None) -> Comparison:
    """better - worse > 0 (contradicted below min_effect) AND the per-seed gains below `threshold`
    (contradicted above it); the numbers shown are better vs worse's. `probe_gain` (saturation's
    keeps_improving reading): a third part, saturation_tests'."""
    shown = compare_superiority(better, worse, alpha=alpha, min_effect=min_effect)
    gain, dropped = _one_sample(gains, labels[1])
    quantities, tests = [_diff_quantity(shown, labels[0]), gain], rise_then_gain_tests(labels, min_effect, threshold)
    if probe_gain is not None:
        probe, more = _one_sample(probe_gain, "probe gain")
        quantities, dropped = quantities + [probe], dropped + more
        tests = saturation_tests(min_effect, threshold, keeps_improving=True)
    c = _combined(kind, shown, tests, quantities, dropped=dropped)
    c.notes.append(f"mean gain {_fmt(gain['est'], '+.3g')} vs threshold {threshold:g}")
    c.min_effect, c.effect_of_interest = min_effect, min_effect
    return c


def compare_saturation(end_to_end_full: Arm, layerwise_full: Arm, last_gain: Arm, *, threshold: float,
                       min_effect: float | None, alpha: float = 0.05, probe_gain: Arm | None = None) -> Comparison:
    """P2's saturation claim: end-to-end beats layerwise at full depth (the gap > 0, contradicted below
    min_effect) AND the layerwise curve's gain over its last units (per seed; the claim's ``window``,
    default the last unit) is below `threshold` (contradicted above it); the numbers shown are the
    full-depth comparison's. `probe_gain` (per seed: the end-to-end network's last-unit probe minus the
    probe `window` units before) adds the keeps_improving reading's third part (saturation_tests)."""
    return _two_part("saturation", ("gap", "gain"), end_to_end_full, layerwise_full, last_gain, threshold,
                     min_effect, alpha, probe_gain)


def compare_rise_then_plateau(start: Arm, peak: Arm, end: Arm, *, threshold: float, min_effect: float | None,
                              alpha: float = 0.05) -> Comparison:
    """A curve over generations that rises, then saturates or declines: `peak` beats `start`
    (superiority, min_effect) AND the per-seed gain end - peak is below `threshold`, tested as
    :func:`compare_saturation` tests its two parts; the numbers shown are peak vs start."""
    gains = {s: float(end[s]) - float(peak[s]) for s in set(peak) & set(end)}
    return _two_part("rise_then_plateau", ("rise", "gain"), peak, start, gains, threshold, min_effect, alpha)


def compare_cost_equivalence(a: Arm, b: Arm, ratios: Mapping[str, Arm], ratio_max: Mapping[str, float], *,
                             margin: float, alpha: float = 0.05) -> Comparison:
    """About the same accuracy (TOST within +-margin) AND each cost ratio of A to B (name -> per-seed
    values, e.g. flops_ratio, latency_ratio_b1) below its maximum (ratio_max[name]); the numbers shown
    are the accuracy TOST's. No ratio at all: the cost side is unmeasured, and the claim is not supported."""
    shown = compare_equivalence(a, b, margin=margin, alpha=alpha)
    named = dict(ratios) if ratios else {"cost ratios": {}}
    quantities, dropped, notes = [_diff_quantity(shown)], [], []
    for name, values in named.items():
        q, d = _one_sample(values, name)
        quantities.append(q)
        dropped += d
        notes.append(f"{name}: mean {_fmt(q['est'], '.3g')} vs max {float(ratio_max[name]):g}" if values
                     else f"{name}: not measured")
    maxima = [(name, float(ratio_max.get(name, float("nan")))) for name in named]
    c = _combined("cost_equivalence", shown, cost_tests(margin, maxima), quantities, dropped=dropped)
    c.notes += notes
    c.margin, c.effect_of_interest = float(margin), 0.0
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




# --- the group-sequential design -----------------------------------------------------------------

@dataclass(frozen=True)
class Design:
    """Seeds in looks (params stats.sequential): `looks` seeds per arm at each look, the last the cap;
    None: one look at the seeds there are (the fixed plan). `spending`: SPENDING; `futility`: stop a
    claim whose chance of a decision by the cap is below it (0: never)."""

    looks: tuple[int, ...] | None = None
    spending: str = "obrien_fleming"
    futility: float = 0.1
    min_seeds: int = 3

    def __post_init__(self) -> None:
        if self.spending not in SPENDING:
            raise ValueError(f"spending must be one of {', '.join(SPENDING)}, got {self.spending!r}")
        if self.looks is not None and (not self.looks or list(self.looks) != sorted(set(self.looks))):
            raise ValueError(f"looks must be increasing seed counts, got {self.looks!r}")

    @property
    def count(self) -> int:
        return 1 if self.looks is None else len(self.looks)

    @property
    def cap(self) -> int | None:
        return None if self.looks is None else self.looks[-1]

    def fraction(self, k: int) -> float | None:
        """Information fraction of look k (0-based); None for a look that tests nothing (below min_seeds)."""
        if self.looks is None:
            return 1.0
        return self.looks[k] / self.looks[-1] if self.looks[k] >= self.min_seeds else None

    def spent(self, t: Any, level: Any) -> np.ndarray:
        """f(t; level): the one-sided level spent by information fraction t (0 at t = 0, level at 1)."""
        t, level = np.asarray(t, dtype=float), np.asarray(level, dtype=float)
        with np.errstate(divide="ignore"):
            if self.spending == "obrien_fleming":
                f = 2 * special.ndtr(special.ndtri(level / 2) / np.sqrt(t))  # = 2 - 2 Phi(z_(1-a/2) / sqrt t)
            else:
                f = level * np.log1p((math.e - 1) * t)
        return np.where(t > 0, f, 0.0)

    def increment(self, k: int, level: Any) -> np.ndarray:
        """The nominal one-sided level of look k for a test of level `level`: f(t_k) - f(t_prev), t_prev
        the fraction of the last look before k that tested (0 if none); 0 at a look that tests nothing."""
        t = self.fraction(k)
        if t is None:
            return np.zeros_like(np.asarray(level, dtype=float))
        prev = max([f for f in (self.fraction(j) for j in range(k)) if f is not None], default=0.0)
        return self.spent(t, level) - self.spent(prev, level)

    def left_after(self, k: int, level: Any) -> np.ndarray:
        """The level not yet spent after look k: what the cap could use at most (futility's optimism)."""
        t = max([f for f in (self.fraction(j) for j in range(k + 1)) if f is not None], default=0.0)
        return np.asarray(level, dtype=float) - self.spent(t, level)

    def ci_level(self, k: int) -> float:
        """Each bound's one-sided level of the repeated 95% interval at look k."""
        return float(self.increment(k, 1 - CONFIDENCE)) / 2

    def text(self) -> str:
        if self.looks is None:
            return "one look at the planned seeds (the fixed plan)"
        return (f"looks at {', '.join(map(str, self.looks))} seeds per arm (cap {self.cap}), "
                f"{self.spending.replace('_', '-')}-like Lan-DeMets spending, futility below "
                f"{100 * self.futility:g}% chance of a decision by the cap")


# decision codes of run_family
CONTINUE, SUPPORTED, CONTRADICTED, AT_CAP, FUTILE, HALTED = range(6)
OUTCOMES = {CONTINUE: "continue", SUPPORTED: "supported", CONTRADICTED: "contradicted",
            AT_CAP: "inconclusive at the cap", FUTILE: "futility", HALTED: "failed runs"}


@dataclass
class LookStats:
    """One claim's statistics at one look, over R replicates (R = 1 in the claims stage): its kind's
    tests, its quantities' (est, se, df) shaped (R, Q), the seeds per arm behind them, and `halt`
    (R,): stop inconclusive now (more failed runs in an arm than allowed)."""

    tests: Tests
    est: np.ndarray
    se: np.ndarray
    df: np.ndarray
    n: np.ndarray
    halt: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.p_support, self.p_contra = p_values(self.tests, self.est, self.se, self.df)
        if self.halt is None:
            self.halt = np.zeros(self.est.shape[0], dtype=bool)

    @classmethod
    def of(cls, c: Comparison, halt: bool = False) -> "LookStats":
        assert c.tests is not None, f"{c.kind}: comparison without tests"
        est, se, df = c.arrays()
        return cls(c.tests, est, se, df, np.array([c.n]), np.array([halt]))


@dataclass
class FamilyOutcome:
    """run_family's result, arrays shaped (R, C): the decision code, the look it stopped at (-1: it
    continues), the last look it had, the support and contra levels of that look, and the chance of a
    decision by the cap where futility was assessed."""

    code: np.ndarray
    stop: np.ndarray
    last: np.ndarray
    level_support: np.ndarray
    level_contra: np.ndarray
    chance: np.ndarray


def run_family(looks: Sequence[Sequence[LookStats | None]], design: Design, alpha: float) -> FamilyOutcome:
    """The sequential procedure for one family: looks[c][k] is claim c's statistics at look k (None:
    not available yet). At each look, Holm's sharing of alpha among the family's claims not yet
    rejected (per direction, recomputed after each rejection) times the look's spending increment
    is each test's level; decided claims stop; at a look that is not the cap an undecided claim whose
    chance of a decision by the cap is below design.futility stops too; at the cap the rest stop
    inconclusive. Claims whose last available look is not the cap and that are undecided continue."""
    C = len(looks)
    R = next(ls.est.shape[0] for row in looks for ls in row if ls is not None)
    code = np.full((R, C), CONTINUE)
    stop, last = np.full((R, C), -1), np.full((R, C), -1)
    lev_s, lev_c, chance = (np.full((R, C), np.nan) for _ in range(3))
    rej_s, rej_c = np.zeros((R, C), bool), np.zeros((R, C), bool)
    for k in range(design.count):
        here = [c for c in range(C) if k < len(looks[c]) and looks[c][k] is not None]
        if not here:
            continue
        active = np.zeros((R, C), bool)
        active[:, here] = code[:, here] == CONTINUE
        last[active] = k
        ps, pc = np.full((R, C), np.nan), np.full((R, C), np.nan)
        halt = np.zeros((R, C), bool)
        for c in here:
            ls = looks[c][k]
            halt[:, c] = ls.halt
            ok = (ls.n >= design.min_seeds) & ~ls.halt  # a claim with too many failed runs is not tested
            ps[:, c], pc[:, c] = np.where(ok, ls.p_support, np.nan), np.where(ok, ls.p_contra, np.nan)
        for _ in range(C + 1):  # Holm: each rejection raises the others' level; stop when none is added
            a_s = design.increment(k, alpha / (C - rej_s.sum(1)).clip(1))[:, None]
            a_c = design.increment(k, alpha / (C - rej_c.sum(1)).clip(1))[:, None]
            new_s, new_c = active & ~rej_s & (ps < a_s), active & ~rej_c & (pc < a_c)  # a level 0 rejects nothing
            if not (new_s.any() or new_c.any()):
                break
            rej_s |= new_s
            rej_c |= new_c
        lev_s = np.where(active, a_s, lev_s)
        lev_c = np.where(active, a_c, lev_c)
        code[active & rej_c] = CONTRADICTED
        code[active & rej_s & ~rej_c] = SUPPORTED
        code[active & halt] = HALTED
        open_ = active & (code == CONTINUE)
        if k == design.count - 1:
            code[open_] = AT_CAP
        elif design.futility > 0:
            left_s = design.left_after(k, alpha / (C - rej_s.sum(1)).clip(1))
            left_c = design.left_after(k, alpha / (C - rej_c.sum(1)).clip(1))
            for c in here:
                rows = open_[:, c] & (looks[c][k].n >= design.min_seeds)
                if rows.any():
                    chance[rows, c] = decide_chance(looks[c][k], design.cap, left_s, left_c)[rows]
            futile = open_ & (chance < design.futility)
            code[futile] = FUTILE
        stop[active & (code != CONTINUE)] = k
    return FamilyOutcome(code, stop, last, lev_s, lev_c, chance)


def decide_chance(ls: LookStats, cap: int, level_support: np.ndarray, level_contra: np.ndarray) -> np.ndarray:
    """The predictive probability that a claim is decided at the cap: the cap's mean predicted from the
    seeds so far (the true value unknown around today's estimate, flat prior; t with the look's degrees of
    freedom for the unknown sd), each one-sided test at the cap at the whole level left (optimistic).
    Supporting: the smallest of its sides' chances (an upper bound of their intersection); contradicting:
    the sum over its sides at a K-th of the level."""
    n = np.maximum(ls.n.astype(float), 2.0)
    rest = np.maximum(cap - n, 0.0)
    sd = ls.se * np.sqrt(n)[:, None]

    def chance(side: Side, level: np.ndarray) -> np.ndarray:
        est, s, df = ls.est[:, side.q], sd[:, side.q], ls.df[:, side.q]
        margin = est - side.null if side.greater else side.null - est
        crit = -t_quantile(level, cap - 1) * s / math.sqrt(cap)
        spread = s * np.sqrt(rest / (cap * n))  # sd of the cap's mean given today's mean, the truth unknown
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(spread > 0, (margin - crit) / spread, np.where(margin - crit > 0, np.inf, -np.inf))
        return np.where(np.isfinite(est), special.stdtr(np.where(np.isfinite(df), df, 1.0), z), 0.0)

    s = np.min(np.stack([chance(x, level_support) for x in ls.tests.support]), 0)
    k = len(ls.tests.contra)
    c = np.minimum(1.0, np.sum(np.stack([chance(x, level_contra / k) for x in ls.tests.contra]), 0))
    return np.minimum(1.0, s + c)


def decision_interval(ls: LookStats, code: np.ndarray, level_support: np.ndarray, level_contra: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The interval the decision used, per replicate -> (quantity index, low, high, one-sided level of
    each bound): supported, the shown quantity at the support level; contradicted, the quantity of the
    contradicting side with the smallest p at the contra level / K; otherwise the shown quantity at the
    smaller of the two levels."""
    tests, k = ls.tests, len(ls.tests.contra)
    R = ls.est.shape[0]
    pc = np.stack([side_p(s, ls.est, ls.se, ls.df) for s in tests.contra], -1)
    deciding = np.array([tests.contra[i].q for i in np.argmin(np.where(np.isfinite(pc), pc, np.inf), -1)])
    q = np.where(code == CONTRADICTED, deciding, tests.shown)
    level = np.where(code == SUPPORTED, level_support,
                     np.where(code == CONTRADICTED, level_contra / k, np.minimum(level_support, level_contra / k)))
    rows = np.arange(R)
    lo, hi = bounds(ls.est[rows, q], ls.se[rows, q], ls.df[rows, q], level)
    return q, lo, hi, level


def shown_interval(ls: LookStats, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The shown quantity's interval with each bound at one-sided `level` (the repeated 95% interval)."""
    s = ls.tests.shown
    return bounds(ls.est[:, s], ls.se[:, s], ls.df[:, s], level)


# --- the verdict of one claim ----------------------------------------------------------------------

def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _n_text(c: Comparison) -> str:
    return f"n={c.n_a}" if c.n_a == c.n_b or c.kind == "reported_value" else f"n={c.n_a}/{c.n_b}"


def _tail(c: Comparison) -> str:
    """What an inconclusive reason adds: the seeds the fixed rule needs."""
    if c.seeds_needed is not None:
        return f"; ~{c.seeds_needed} seeds per arm needed for 80% power at effect {_fmt(c.effect_of_interest)}"
    return ""


def _dropped_text(c: Comparison) -> str:
    return f" [dropped: {', '.join(c.dropped)}]" if c.dropped else ""


def _cost_text(c: Comparison) -> str:
    return "; ".join(n for n in c.notes if " vs max " in n or n.endswith("not measured"))


def _supported_what(c: Comparison) -> str:
    return {"equivalence": f"equivalent within +-{_fmt(c.margin)} (TOST)",
            "reported_value": f"within +-{_fmt(c.tolerance)} of the paper's number (TOST)",
            "ordering": "every step shown > 0",
            "saturation": "end-to-end beats layerwise at full depth and the last gain is shown below the threshold",
            "rise_then_plateau": "rises (peak > start), then the gain after the peak is shown below the threshold",
            "cost_equivalence": f"equivalent within +-{_fmt(c.margin)} (TOST) and every cost ratio below its "
                                f"maximum ({_cost_text(c)})"}.get(c.kind, "A > B")


def _contradicted_what(c: Comparison, side: str, hi: float) -> str:
    if c.kind in ("superiority", "early_overfit"):
        what = "A is worse than B" if hi < 0 else \
            f"effect shown below what matters (min_effect {_fmt(c.min_effect)}, the contradicting test)"
    else:
        what = {"equivalence": f"difference shown outside +-{_fmt(c.margin)}",
                "reported_value": f"our mean shown more than {_fmt(c.tolerance)} from the paper's number",
                "ordering": "a step shown below what matters",
                "cost_equivalence": f"difference shown outside +-{_fmt(c.margin)} or a cost ratio shown above its "
                                    f"maximum ({_cost_text(c)})"}.get(c.kind, "the contradicting test")
    return f"{what} ({side} shown)"


def _undecided_what(c: Comparison) -> str:
    return {"reported_value": "neither within the tolerance nor shown outside it",
            "equivalence": "TOST not significant and the difference not shown outside the margin",
            "cost_equivalence": f"accuracy TOST or a cost ratio not shown ({_cost_text(c)})"
            }.get(c.kind, "neither test decides")


def describe(c: Comparison, code: int, look: int, design: Design, level_support: float, level_contra: float,
             chance: float | None = None, halted: str = "") -> tuple[str, str]:
    """The verdict and its reason for a claim whose run_family outcome is `code` at look `look`; sets the
    comparison's decision interval (adj_ci_*, decision), levels and repeated 95% interval."""
    tests = c.tests
    assert tests is not None, f"{c.kind}: comparison without tests"
    ls = LookStats.of(c)
    shift = float(c.reported) if c.kind == "reported_value" else 0.0  # its shown quantity is ours - paper
    lo, hi = (float(v[0]) for v in shown_interval(ls, design.ci_level(look)))
    if math.isfinite(lo):
        c.ci_low, c.ci_high = lo + shift, hi + shift
    c.level_support, c.level_contra = _f(level_support), _f(level_contra)
    looks = "" if design.looks is None else f"; look {look + 1} of {design.count}"
    goes_on = "" if design.looks is None or look + 1 >= design.count else \
        f"continues to {design.looks[look + 1]} seeds per arm"
    if code == HALTED:
        return "inconclusive", f"more failed runs in an arm than the rule allows ({halted}){looks}" + _dropped_text(c)
    n = c.n
    problem = _n_problem(c.n_a, None if c.kind == "reported_value" else c.n_b)
    if problem or n < design.min_seeds or (c.p_value is None and c.p_contra is None):
        why = problem or (f"only {n} seeds (< {design.min_seeds}): no test possible" if n < design.min_seeds
                          else "no test possible (" + "; ".join(c.notes or ["p-value missing"]) + ")")
        return "inconclusive", why + (f"{looks}: {goes_on}" if code == CONTINUE else "") + _dropped_text(c)
    q, dlo, dhi, dlev = (float(v[0]) for v in decision_interval(ls, np.array([code]), np.array([level_support]),
                                                               np.array([level_contra])))
    label, shown = tests.labels[int(q)], int(q) == tests.shown
    c.decision = {"quantity": label, "low": dlo, "high": dhi, "level": dlev, "shown": shown}
    if shown:
        c.adj_ci_low, c.adj_ci_high = dlo + shift, dhi + shift
    stat = (f"{label} {_fmt(float(ls.est[0, int(q)]), '+.3g')}, decision interval [{_fmt(dlo)}, {_fmt(dhi)}] "
            f"(each bound one-sided at {_fmt(dlev, '.2g')}); supporting test ({tests.support_text()}) "
            f"p={_fmt(c.p_value, '.2g')} vs level {_fmt(level_support, '.2g')}, contradicting test "
            f"({c.contra_test}) p={_fmt(c.p_contra, '.2g')} vs level {_fmt(level_contra, '.2g')}, {_n_text(c)}"
            + looks + ("; zero variance: the tests' limit" if c.zero_variance else "") + _dropped_text(c))
    if code == SUPPORTED:
        return "supported", f"{_supported_what(c)}: {stat}"
    if code == CONTRADICTED:
        pc = np.array([side_p(x, *c.arrays()) for x in tests.contra])[:, 0]
        side = tests.contra[int(np.argmin(np.where(np.isfinite(pc), pc, np.inf)))]
        return "contradicted", f"{_contradicted_what(c, side.text(tests.labels), dhi)}: {stat}"
    if code == FUTILE:
        return "inconclusive", (f"futility: a decision by the cap ({design.cap} seeds per arm) has a "
                                f"{_fmt(100 * (chance or 0.0), '.0f')}% predictive chance from today's estimate and sd (below "
                                f"{_fmt(100 * design.futility, 'g')}%); {_undecided_what(c)}: {stat}")
    if code == CONTINUE:
        return "inconclusive", f"not decided yet, {goes_on} ({_undecided_what(c)}): {stat}"
    cap = "" if design.looks is None else f" by the cap ({design.cap} seeds per arm)"
    return "inconclusive", f"{_undecided_what(c)}{cap}: {stat}{_tail(c)}"


def decide_alone(c: Comparison, level: float, min_seeds: int = 3) -> tuple[str, str]:
    """The verdict of a claim alone at one look with both tests at `level` (a family of m at its first
    Holm step: alpha / m)."""
    design = Design(None, min_seeds=min_seeds)
    if c.tests is None:
        return "inconclusive", "; ".join(c.notes) or "no test possible"
    out = run_family([[LookStats.of(c)]], design, level)
    return describe(c, int(out.code[0, 0]), 0, design, float(out.level_support[0, 0]),
                    float(out.level_contra[0, 0]))

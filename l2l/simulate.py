"""The verdict rule simulated on a profile's claims: `l2l plan`'s expected seeds and power of the
sequential design, and benchmarks/calibration.py's error rates.

Per-seed values are drawn for each claim's arms (normal, or t with 3 degrees of freedom, between-seed
sd `sd` per run), optionally with one failed run (seed 0 of the claim's first arm: a finite value 5
points low whose training accuracy is below the floor), then go through the code the claims stage
runs: l2l.claims.failed_mask (the failed-run rule), l2l.stats.sample_stats (each look's t-test
statistics on the look's seeds), the kind's l2l.stats.Tests (what its compare_* function builds:
tests/test_sequential.py checks that they agree with the claims stage's comparisons on the same
data), l2l.stats.run_family (spending over looks, Holm over the family, futility) and
l2l.stats.decision_interval / shown_interval. Vectorised over replicates: thousands per second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from l2l import stats
from l2l.claims import Claim, effect_of_interest, failed_mask, failed_rule, profile_claims
from l2l.config import Config

SCENARIOS = ("null", "true", "effect")
FAILED_OFFSET = -5.0  # a failed run's test value: 5 points low, finite (what the issue measured)


@dataclass
class Member:
    """A claim of a simulated family: its seeds in the fixed plan and its truth (None: the scenario's)."""

    claim: Claim
    n: int
    truth: dict | None = None


def claim_tests(claim: Claim) -> stats.Tests:
    """The tests the claims stage's comparison of this claim runs (l2l.claims.compare_values and the
    custom kinds build the same through l2l.stats.compare_*). One exception: a saturation claim read
    `end_to_end: keeps_improving` is simulated with its first two parts only (its third, the end-to-end
    probes' gain, can only remove support: the simulated false-supported rate bounds the real one)."""
    k = claim.kind
    if k in ("superiority", "early_overfit"):
        return stats.superiority_tests(claim.min_effect)
    if k == "equivalence":
        return stats.within_tests(claim.margin)  # type: ignore[arg-type]
    if k == "reported_value":
        return stats.within_tests(claim.tolerance, "ours - paper")  # type: ignore[arg-type]
    if k == "ordering":
        return stats.ordering_tests(len(claim.arms) - 1, claim.min_effect)
    if k in ("saturation", "rise_then_plateau"):
        labels = ("gap", "gain") if k == "saturation" else ("rise", "gain")
        return stats.rise_then_gain_tests(labels, claim.min_effect, float(claim.extra["threshold"]))
    if k == "cost_equivalence":
        maxima = [("flops_ratio", claim.extra["flops_ratio_max"]), ("latency_ratio_b1", claim.extra["latency_ratio_max"])]
        return stats.cost_tests(float(claim.margin), maxima)  # type: ignore[arg-type]
    raise ValueError(f"{claim.id}: no simulation of kind {k!r}")


def truth(claim: Claim, scenario: str) -> dict:
    """The simulated truth at a scenario: `diff` (per step of an ordering; ours - the paper's number for a
    reported value) and, for the two-part kinds, the `gain`.

    null: the claim false at its supporting boundary (no effect; the difference at the margin; ours off
    by the tolerance; the gap at min_effect with the gain at the threshold); true: the claim true at its
    contradicting boundary (the effect at min_effect; the difference at the margin; ours off by the
    tolerance; gap at min_effect, gain at the threshold); effect: the effect of interest (the paper's
    difference or min_effect; equal; ours on the paper's number; gain 0)."""
    eoi = effect_of_interest(claim)
    edge = claim.min_effect if claim.min_effect is not None else eoi
    k = claim.kind
    if k in ("equivalence", "cost_equivalence"):
        return {"diff": 0.0 if scenario == "effect" else float(claim.margin)}  # type: ignore[arg-type]
    if k == "reported_value":
        return {"diff": 0.0 if scenario == "effect" else float(claim.tolerance)}  # type: ignore[arg-type]
    if k in ("saturation", "rise_then_plateau"):
        return {"diff": float(claim.min_effect or 0.0),
                "gain": 0.0 if scenario == "effect" else float(claim.extra["threshold"])}
    return {"diff": 0.0 if scenario == "null" else float(edge or 0.0) if scenario == "true" else float(eoi or 0.0)}


def strong(claim: Claim, direction: str) -> dict:
    """A truth far beyond the claim's bounds (50 planning sds): decided at the first look that can,
    passing its share of alpha to the rest of its family (the worst case for another claim)."""
    t, far = truth(claim, "effect"), 50.0
    if claim.kind in ("equivalence", "cost_equivalence", "reported_value"):
        return {"diff": t["diff"] if direction == "supported" else far}
    if claim.kind in ("saturation", "rise_then_plateau"):
        return {"diff": far, "gain": -far} if direction == "supported" else {"diff": -far, "gain": far}
    return {"diff": far if direction == "supported" else -far}


def _noise(rng: np.random.Generator, shape: tuple, sd: float, noise: str) -> np.ndarray:
    if noise == "t3":  # unit variance: t3 has variance 3
        return sd * rng.standard_t(3, shape) / math.sqrt(3)
    return rng.normal(0.0, sd, shape)


def draw(claim: Claim, t: dict, R: int, N: int, sd: float, rng: np.random.Generator, noise: str = "normal",
         failed: str = "", floor: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-seed quantities of a claim, (R, N, Q) with NaN for runs the failed-run rule excludes, the failed
    runs per arm (R, N) of the arm that has them, and the true value of the shown quantity.
    failed: "" none; "rule": seed 0 of the first arm failed (excluded by the rule); "kept": the same run
    with no rule (its low value tested like any other). floor: the rule's training-accuracy floor (None: the
    profile has none, and the failed run's training loss is not finite instead)."""
    d = float(t["diff"])
    e = lambda s=sd: _noise(rng, (R, N), s, noise)  # noqa: E731
    first_low = np.zeros((R, N))
    bad = np.zeros((R, N), bool)
    if failed:
        first_low[:, 0] = FAILED_OFFSET
        acc, loss = np.full((R, N), 90.0), np.zeros((R, N))
        if floor is None:
            loss[:, 0] = np.nan
        else:
            acc[:, 0] = floor - 1.0  # its training accuracy: below the floor (near chance)
        bad = failed_mask(loss, acc, -np.inf if floor is None else floor) if failed == "rule" else bad
    k = claim.kind
    if k == "reported_value":
        a = d + e() + first_low
        q, shown = [a], d
    elif k == "ordering":
        arms = [i * d + e() for i in range(len(claim.arms))]
        arms[0] = arms[0] + first_low
        q = [arms[i + 1] - arms[i] for i in range(len(arms) - 1)] + [arms[-1] - arms[0]]
        shown = d * (len(claim.arms) - 1)
    elif k == "saturation":  # arms a = end-to-end, b = layerwise; the gain: the layerwise run's last step
        a, b = d + e() + first_low, e()
        q, shown = [a - b, t["gain"] + e(sd * math.sqrt(2))], d
    elif k == "rise_then_plateau":  # one run per seed: generations start, peak, end
        start = e(sd / math.sqrt(2)) + first_low
        peak = start + d + e()
        end = peak + t["gain"] + e()
        q, shown = [peak - start, end - peak], d
    elif k == "cost_equivalence":  # FLOPs ratio equal on every seed, latency noisy: both at half their maximum
        a, b = d + e() + first_low, e()
        flops = np.full((R, N), claim.extra["flops_ratio_max"] / 2)
        latency = claim.extra["latency_ratio_max"] / 2 + _noise(rng, (R, N), 0.05, noise)
        q, shown = [a - b, flops, latency], d
    else:  # superiority, early_overfit, equivalence: arms a, b
        a, b = d + e() + first_low, e()
        q, shown = [a - b], d
    out = np.stack(q, -1)
    out[bad] = np.nan  # the rule's exclusion: the run leaves every quantity it is part of
    return out, bad, shown


@dataclass
class Outcome:
    """A simulated family (arrays (R, C)): decision code, seeds per arm at the stop, whether the reported
    95% interval held the truth, whether the decision interval agrees with the verdict."""

    code: np.ndarray
    seeds: np.ndarray
    covered: np.ndarray
    agrees: np.ndarray


def interval_agrees(tests: stats.Tests, q: np.ndarray, lo: np.ndarray, hi: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Whether the decision interval shows what the verdict says: supported, every supporting side on its
    quantity beyond its bound; contradicted, a contradicting side on it beyond its bound; otherwise no
    contradicting side beyond its bound (nor, for a single-quantity claim, every supporting side)."""
    def beyond(sides: tuple[stats.Side, ...], any_: bool) -> np.ndarray:
        hits = [np.where(q == s.q, (lo > s.null) if s.greater else (hi < s.null), not any_) for s in sides]
        return np.any(hits, 0) if any_ else np.all(hits, 0)

    single = len(tests.labels) == 1
    sup, con = beyond(tests.support, False), beyond(tests.contra, True)
    return np.where(code == stats.SUPPORTED, sup, np.where(code == stats.CONTRADICTED, con,
                                                           ~con & (~sup if single else True)))


def simulate(members: list[Member], design: stats.Design, alpha: float, sd: float, scenario: str, R: int,
             rng: np.random.Generator, noise: str = "normal", failed: str = "",
             rule: dict | None = None, intervals: bool = True) -> Outcome:
    """One family through the rule: R replicates of every member's truth (its own, else the scenario's).
    design: the sequential design, or Design(None) for the fixed plan (each member at its own seeds);
    rule: the failed-run rule (l2l.claims.failed_rule); intervals: False skips coverage and agreement."""
    rule = rule or {"train_acc_floor": {}, "max_per_arm": 1}
    looks = list(design.looks) if design.looks is not None else None
    grid, shown = [], []
    for m in members:
        N = looks[-1] if looks else m.n
        x, bad, s = draw(m.claim, m.truth or truth(m.claim, scenario), R, N, sd, rng, noise, failed,
                         rule["train_acc_floor"].get(m.claim.dataset))
        tests = claim_tests(m.claim)
        row = []
        for n in (looks or [m.n]):
            est, se, df, cnt = stats.sample_stats(np.moveaxis(x[:, :n], 2, 1))
            halt = bad[:, :n].sum(1) > rule["max_per_arm"]
            row.append(stats.LookStats(tests, est, se, df, cnt[:, 0], halt))
        grid.append(row)
        shown.append(s)
    out = stats.run_family(grid, design, alpha)
    C = len(members)
    seeds = np.zeros((R, C))
    covered = np.zeros((R, C), bool)
    agrees = np.ones((R, C), bool)
    for c, m in enumerate(members):
        stop = out.stop[:, c]
        for k, ls in enumerate(grid[c]):
            at = stop == k
            if not at.any():
                continue
            seeds[at, c] = (looks or [m.n])[k]
            if not intervals:
                continue
            lo, hi = stats.shown_interval(ls, design.ci_level(k))
            covered[at, c] = ((lo <= shown[c]) & (shown[c] <= hi))[at]
            q, dlo, dhi, _ = stats.decision_interval(ls, out.code[:, c], out.level_support[:, c],
                                                     out.level_contra[:, c])
            agrees[at, c] = interval_agrees(ls.tests, q, dlo, dhi, out.code[:, c])[at]
    return Outcome(out.code, seeds, covered, agrees)



def families(config: Config, claims: list[Claim]) -> dict[str, list[Member]]:
    """The profile's checked claims by family, each with its fixed plan's seeds per arm."""
    out: dict[str, list[Member]] = {}
    for c, n, _ in profile_claims(config.profile, claims):
        out.setdefault(c.family_key, []).append(Member(c, n))
    return out


def expected(config: Config, claims: list[Claim], design: stats.Design, sds: list[float], replicates: int = 200,
             seed: int = 0) -> dict[str, dict]:
    """`l2l plan`'s figures of the sequential design and of the fixed plan at each between-seed sd per run,
    at every claim's effect of interest, the real rule simulated: claim id -> {"family", "fixed_seeds",
    sd -> {"power", "seeds" (mean per arm at the stop), "fixed_power", "draws" (seeds at the stop per
    replicate: replicates pair across a family's claims, so a group's seeds are the most any of its claims
    took)}}."""
    alpha, rule = config.stats["alpha"], failed_rule(config)
    rng = np.random.default_rng(seed)
    fixed = stats.Design(None, design.spending, 0.0, design.min_seeds)
    out: dict[str, dict] = {}
    for fam, members in families(config, claims).items():
        for m in members:
            out[m.claim.id] = {"family": fam, "family_tests": len(members), "fixed_seeds": m.n}
        for sd in sds:
            seq = simulate(members, design, alpha, sd, "effect", replicates, rng, rule=rule, intervals=False)
            fix = simulate(members, fixed, alpha, sd, "effect", replicates, rng, rule=rule, intervals=False)
            for c, m in enumerate(members):
                out[m.claim.id][sd] = {"power": float(np.mean(seq.code[:, c] == stats.SUPPORTED)),
                                       "seeds": float(seq.seeds[:, c].mean()), "draws": seq.seeds[:, c],
                                       "fixed_power": float(np.mean(fix.code[:, c] == stats.SUPPORTED))}
    return out

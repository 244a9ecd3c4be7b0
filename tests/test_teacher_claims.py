"""The teacher-student claim kinds (l2l/claims.py): P5's cost_equivalence (accuracy equivalence AND
measured FLOPs / latency ratios below their maxima) and P4's rise_then_plateau (the strict line over
generations), each verdict way planted through claims.check; their simulated false-supported rate and
power at the seeds the paper profile uses; the records' provenance and the smoke stand-in."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from l2l import stats
from l2l.claims import Arm, Claim, check, claim_power, load_claims, profile_claims
from l2l.config import load_config

ALPHA = 0.05
SEEDS = list(range(10))


def cost_claim(**extra) -> Claim:
    return Claim("P5-X", "P5", "Zhou", "about the teacher's accuracy, far cheaper", "cost_equivalence",
                 "final_test_acc", "cifar100", [Arm("a", "p5_distill", "nd"), Arm("b", "p5_teacher", "t")],
                 "not public", "", margin=1.0,
                 extra={"cost_phase": "student", "flops_ratio_max": 0.5, "latency_ratio_max": 0.5, **extra})


def distill_tables(diff: float, flops: float, latency: dict[int, float], seeds=SEEDS, sd: float = 0.3,
                   rng_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """runs.csv (teacher and student) and phases.csv (the student's cost ratios) for a planted truth:
    student - teacher accuracy `diff`, a FLOPs ratio equal on every seed, latency ratio per batch size
    (mean; per-seed noise sd 0.02)."""
    rng = np.random.default_rng(rng_seed)
    teacher = 70 + rng.normal(0, sd, len(seeds))
    runs = pd.DataFrame([{"run": f"{e}{s}", "experiment": e, "model": m, "dataset": "cifar100", "seed": s,
                          "final_test_acc": acc}
                         for s, t in zip(seeds, teacher)
                         for e, m, acc in (("p5_teacher", "t", t), ("p5_distill", "nd", t + diff + rng.normal(0, sd)))])
    rows = []
    for s in seeds:
        ratios = {"flops_ratio": flops, "params_ratio": 0.2,
                  **{f"latency_ratio_b{b}": m + rng.normal(0, 0.02) for b, m in latency.items()}}
        rows += [{"run": f"p5_distill{s}", "experiment": "p5_distill", "method": "distill", "model": "nd",
                  "dataset": "cifar100", "seed": s, "phase": "student", "metric": k, "value": v}
                 for k, v in ratios.items()]
    return runs, pd.DataFrame(rows)


def verdict_of(claim: Claim, runs: pd.DataFrame, phases: pd.DataFrame) -> dict:
    return check([claim], runs, phases, None, "paper", alpha=ALPHA, min_seeds=3)[0]


@pytest.mark.parametrize("diff, flops, latency, expected", [
    (0.0, 0.13, {1: 0.3, 256: 0.2}, "supported"),            # equivalent and far cheaper
    (3.0, 0.13, {1: 0.3, 256: 0.2}, "contradicted"),         # cheaper, but the accuracy is shown 3 points off
    (0.0, 0.13, {1: 0.9, 256: 0.2}, "contradicted"),         # batch-1 latency shown above its maximum
    (0.0, 0.7, {1: 0.3, 256: 0.2}, "contradicted"),          # FLOPs ratio above 0.5 on every seed (exact)
    (0.0, 0.13, {1: 0.5, 256: 0.2}, "inconclusive"),         # a latency ratio at its maximum: not shown below
    (1.0, 0.13, {1: 0.3, 256: 0.2}, "inconclusive"),         # accuracy at the margin: TOST not shown
    (0.0, 0.13, {}, "inconclusive"),                         # no latency measured: the cost side is unknown
])
def test_cost_equivalence_each_way(diff, flops, latency, expected):
    rec = verdict_of(cost_claim(), *distill_tables(diff, flops, latency))
    assert rec["verdict"] == expected, rec["reason"]
    # what a one-line summary needs: the accuracy difference with its interval, each ratio with its own
    c = rec["comparison"]
    assert c["kind"] == "cost_equivalence" and c["ci_low"] <= c["diff"] <= c["ci_high"]
    for name, r in rec["cost"].items():
        assert r["max"] == 0.5 and (r["ci_low"] is None or r["ci_low"] <= r["mean"] <= r["ci_high"])
    assert set(rec["cost"]) == ({"flops_ratio", *(f"latency_ratio_b{b}" for b in latency)} if latency else set())
    assert rec["params_ratio"] and all(v == 0.2 for v in rec["params_ratio"].values())


@pytest.mark.parametrize("gated, expected", [
    ([256], "supported"),      # P5-C1: the launch-bound batch-1 ratio (0.9) does not decide
    ([1], "contradicted"),     # P5-C1/b1: it does
    ([64], "inconclusive"),    # a gated batch that was not measured: the cost side is unknown
])
def test_latency_batches_name_the_ratios_that_decide(gated, expected):
    runs, phases = distill_tables(0.0, 0.13, {1: 0.9, 256: 0.2})
    eager = phases[phases.metric == "latency_ratio_b1"].assign(metric="latency_eager_ratio_b1")  # never gates
    rec = verdict_of(cost_claim(latency_batches=gated), runs, pd.concat([phases, eager.assign(value=5.0)]))
    assert rec["verdict"] == expected, rec["reason"]
    assert "latency_eager_ratio_b1" not in rec["cost"]
    gated_here = {f"latency_ratio_b{b}" for b in gated} & {"latency_ratio_b1", "latency_ratio_b256"}
    assert set(rec["cost"]) == ({"flops_ratio"} | gated_here if gated_here else set())
    assert set(rec["ungated_ratios"]) == {"latency_ratio_b1", "latency_ratio_b256"} - gated_here


def test_cost_ratios_of_two_seeds_cannot_decide():
    rec = verdict_of(cost_claim(), *distill_tables(0.0, 0.13, {1: 0.3}, seeds=[0, 1]))
    assert rec["verdict"] == "inconclusive"


def strict_line(gen1_gain: float, plateau_gain: float, seeds=range(5), sd: float = 0.3,
                rng_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A strict line: gen0 ~ 70, gen1 = gen0 + gen1_gain, the last generation (runs.csv) = gen1 + plateau_gain."""
    rng = np.random.default_rng(rng_seed)
    rows, runs = [], []
    for s in seeds:
        g0 = 70 + rng.normal(0, sd)
        g1 = g0 + gen1_gain + rng.normal(0, sd)
        last = g1 + plateau_gain + rng.normal(0, sd)
        rows += [{"run": f"r{s}", "experiment": "p4_strict", "method": "generations", "model": "r",
                  "dataset": "cifar100", "seed": s, "phase": p, "metric": "final_test_acc", "value": v}
                 for p, v in (("gen0", g0), ("gen1", g1), ("gen4", last))]
        runs.append({"run": f"r{s}", "experiment": "p4_strict", "model": "r", "dataset": "cifar100", "seed": s,
                     "final_test_acc": last})
    return pd.DataFrame(runs), pd.DataFrame(rows)


def shape_claim() -> Claim:
    arms = [Arm("start", "p4_strict", "r", "gen0"), Arm("peak", "p4_strict", "r", "gen1"), Arm("end", "p4_strict", "r")]
    return Claim("P4-X", "P4", "Yang", "rise then plateau", "rise_then_plateau", "final_test_acc", "cifar100", arms,
                 "not public", "", min_effect=0.3, extra={"threshold": 0.3})


@pytest.mark.parametrize("rise, plateau, expected", [
    (2.0, -0.5, "supported"),      # rises 2 points, then declines
    (2.0, 0.0, "supported"),       # rises, then flat
    (2.0, 2.0, "contradicted"),    # still rising: the gain after gen1 is shown >= 0.3
    (-1.0, 0.0, "contradicted"),   # no rise: gen1 shown below gen0 + 0.3
    (0.5, 0.3, "inconclusive"),    # a small rise, a gain at the threshold: neither shown
])
def test_rise_then_plateau_each_way(rise, plateau, expected):
    rec = verdict_of(shape_claim(), *strict_line(rise, plateau))
    assert rec["verdict"] == expected, rec["reason"]
    c = rec["comparison"]  # shown: gen1 - gen0 with its interval; the plateau gain per seed beside it
    assert c["kind"] == "rise_then_plateau" and c["diff"] == pytest.approx(np.mean(
        [rec["arms"]["peak"]["values"][s] - rec["arms"]["start"]["values"][s] for s in range(5)]))
    assert len(rec["plateau_gain"]) == 5 and set(rec["mean_curve"]) == {"start", "peak", "end"}


# ------------------------------------------------------------- simulated error rates at the seeds used

def _supported(c: stats.Comparison, level: float) -> bool:
    """Supported by the rule at a test level (alpha / m: the first Holm level of a family of m)."""
    return stats.decide_alone(c, level)[0] == "supported"


def _rate(events: list[bool]) -> tuple[float, float]:
    p = float(np.mean(events))
    return p, float(np.sqrt(max(p * (1 - p), 1e-4) / len(events)))


REPS = 1000  # Monte Carlo se of a 5% rate: 0.7 points
SD = 0.6 * np.sqrt(2)  # params stats.planning_sd per run; a difference of two runs x sqrt 2


def test_rise_then_plateau_false_supported_and_power_at_5_seeds():
    """P4-C6 at the paper profile's 5 seeds: at either boundary of the claim (no rise; a gain exactly at the
    threshold) it is supported at most alpha of the time; its power at the planning sd matches the rule's
    planned lower bound (l2l.claims.claim_power). Figures: printed (pytest -s)."""
    rng = np.random.default_rng(1)
    n, claim = 5, shape_claim()

    def draw(rise: float, gain: float) -> stats.Comparison:
        s = range(n)
        start = dict(zip(s, rng.normal(0, 0.6, n)))
        peak = {k: start[k] + rise + rng.normal(0, SD) for k in s}
        end = {k: peak[k] + gain + rng.normal(0, SD) for k in s}
        return stats.compare_rise_then_plateau(start, peak, end, threshold=0.3, min_effect=0.3, alpha=ALPHA)

    no_rise, _ = _rate([_supported(draw(0.0, 0.0), ALPHA) for _ in range(REPS)])
    still_rising, _ = _rate([_supported(draw(3.0, 0.3), ALPHA) for _ in range(REPS)])
    se = np.sqrt(ALPHA * (1 - ALPHA) / REPS)
    assert no_rise <= ALPHA + 3 * se and still_rising <= ALPHA + 3 * se
    # power at a clear shape (rise 2 points, flat after) and at the claim's own effect (rise 0.3, flat)
    strong, strong_se = _rate([_supported(draw(2.0, 0.0), ALPHA / 3) for _ in range(REPS)])
    at_effect, eff_se = _rate([_supported(draw(0.3, 0.0), ALPHA / 3) for _ in range(REPS)])
    planned = claim_power(claim, n, SD, ALPHA, 3)[0]  # family P4/sensitivity: 3 tests
    assert at_effect >= planned - 3 * eff_se  # the planned figure is a lower bound
    print(f"\nP4-C6 rise_then_plateau, n={n}: false supported {no_rise:.3f} (no rise), {still_rising:.3f} "
          f"(gain at threshold); power at alpha/3: {strong:.3f} +- {strong_se:.3f} (rise 2, flat), "
          f"{at_effect:.3f} (rise 0.3, flat; planned lower bound {planned:.3f})")


def test_cost_equivalence_false_supported_and_power_at_10_seeds():
    """P5-C1 at the paper profile's 10 seeds: supported at most alpha of the time at each boundary
    (accuracy off by the margin; a latency ratio at its maximum); its power never exceeds the planned
    figure, the accuracy TOST's alone (an upper bound)."""
    rng = np.random.default_rng(2)
    n = 10

    def draw(diff: float, latency: float) -> stats.Comparison:
        s = range(n)
        a, b = dict(zip(s, diff + rng.normal(0, SD, n))), dict(zip(s, np.zeros(n)))
        ratios = {"flops_ratio": dict.fromkeys(s, 0.13), "latency_ratio_b1": dict(zip(s, latency + rng.normal(0, 0.05, n)))}
        return stats.compare_cost_equivalence(a, b, ratios, {"flops_ratio": 0.5, "latency_ratio_b1": 0.5}, margin=1.0,
                                              alpha=ALPHA)

    off_margin, _ = _rate([_supported(draw(1.0, 0.3), ALPHA) for _ in range(REPS)])
    at_max, _ = _rate([_supported(draw(0.0, 0.5), ALPHA) for _ in range(REPS)])
    se = np.sqrt(ALPHA * (1 - ALPHA) / REPS)
    assert off_margin <= ALPHA + 3 * se and at_max <= ALPHA + 3 * se
    power, power_se = _rate([_supported(draw(0.0, 0.3), ALPHA / 2) for _ in range(REPS)])
    planned = stats.rule_power("cost_equivalence", n, SD, ALPHA / 2, bound=1.0)[0]
    assert power <= planned + 3 * power_se
    print(f"\nP5-C1 cost_equivalence, n={n}: false supported {off_margin:.3f} (diff = margin), {at_max:.3f} "
          f"(latency ratio = max); power at alpha/2: {power:.3f} +- {power_se:.3f} (planned upper bound {planned:.3f})")


# ------------------------------------------------------------- the records

def test_teacher_student_records_say_where_the_paper_states_them():
    config = load_config("params.yaml", "paper")
    claims = {c.id: c for c in load_claims(config) if c.paper in ("P4", "P5")}
    for cid in ("P4-C4a", "P4-C4b", "P5-C3", "P5-C2/p5_narrow_deep"):
        assert claims[cid].stated_in.startswith("unconfirmed") and claims[cid].role == "sensitivity"
        assert claims[cid].role_reason
    # read only through a third-party transcription of the text: stated there, still a sensitivity claim
    assert claims["P4-C6"].stated_in.startswith("text") and "transcription" in claims["P4-C6"].stated_in
    assert claims["P4-C6"].role == "sensitivity"
    # the other readings of named parameters are sensitivity claims (l2l/fidelity.py lists them)
    for cid in ("P4-C1/label", "P4-C2a/label", "P4-C1/logits", "P4-C2a/logits", "P5-C1/b1"):
        assert claims[cid].role == "sensitivity" and claims[cid].role_reason
    # P5-C1's latency: batch 256 of CUDA-graph replays gates the verdict, batch 1 is its sensitivity record
    assert claims["P5-C1"].extra["latency_batches"] == [256] and claims["P5-C1/b1"].extra["latency_batches"] == [1]
    assert "CUDA graph" in claims["P5-C1"].protocol and "launch" in claims["P5-C1"].protocol
    for cid in ("P4-C1", "P4-C2a", "P4-C2b", "P4-C3", "P4-C5", "P5-C1", "P5-C1/voc2007"):
        assert claims[cid].stated_in.startswith("abstract") and claims[cid].role == "primary"
    assert all(c.harness_choices for c in claims.values())
    assert claims["P5-C1"].kind == claims["P5-C1/voc2007"].kind == "cost_equivalence"


def test_smoke_checks_the_cifar100_claims_on_its_stand_in():
    """At smoke scale (CIFAR-10 only) the P4 and P5 CIFAR-100 claims are planned on cifar10, saying so."""
    smoke = load_config("params.yaml", "smoke")
    planned = {c.id: c for c, _, _ in profile_claims(smoke.profile, load_claims(smoke))}
    for cid in ("P4-C1", "P4-C3", "P4-C5", "P4-C6", "P5-C1", "P5-C2/p5_narrow_deep", "P5-C3"):
        assert planned[cid].dataset == "cifar10" and planned[cid].stand_in_for == "cifar100"
    assert "P5-C1/voc2007" not in planned  # no stand-in: not run at smoke scale
    paper = {c.id: c for c in load_claims(load_config("params.yaml", "paper"))}
    assert paper["P4-C6"].dataset == "cifar100" and paper["P4-C6"].stand_in_for == ""

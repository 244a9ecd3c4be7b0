"""Claims as data (claims.yaml), checked against results/ with l2l.stats.

A claim names its arms (an experiment of params.yaml, a model, the claim's dataset); the runs
of each arm pair by seed. Every claim of the registry appears in the output: checked, or
"not run" with the reason (its arms are not in the active profile). Each claim belongs to a family
(`family`, default its paper; `role: sensitivity` puts it in "<family>/sensitivity"); Holm's
correction runs within a family (l2l.stats.VERDICT_RULE).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from l2l import stats
from l2l.checks import ConfigError, config_error
from l2l.config import Config, Profile
from l2l.layerwise_analysis import early_overfit_check, saturation_check
from l2l.methods import METHODS
from l2l.results import RUN_METRICS, mean_interval

CLAIMS_FILE = Path("claims.yaml")
TWO_ARM_KINDS = ("superiority", "equivalence")
BUILTIN_KINDS = ("superiority", "equivalence", "ordering", "reported_value")
REQUIRED = ("id", "paper", "claim", "kind", "metric", "dataset", "arms", "reported", "protocol")
# The fields a record may hold, closed per kind (a misspelt field, or one its kind does not read, is an error
# naming the record before any training): REQUIRED and COMMON for every kind, and the kind's own fields
# here, the one table to extend (a new field: add it to its kinds' rows and read it in the kind's check).
COMMON = ("family", "role", "role_reason", "stated_in", "harness_choices", "stand_in")
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "superiority": ("min_effect",),
    "equivalence": ("margin",),
    "ordering": ("min_effect",),
    "reported_value": ("tolerance",),
    "saturation": ("min_effect", "threshold", "window", "unit", "end_to_end"),  # layerwise_analysis.saturation_check
    "early_overfit": ("min_effect", "early_stages", "unit"),  # l2l.layerwise_analysis.early_overfit_check
    "rise_then_plateau": ("min_effect", "threshold"),
    "cost_equivalence": ("margin", "flops_ratio_max", "latency_ratio_max", "cost_phase", "latency_batches"),
}
ATTRIBUTES = ("margin", "min_effect", "tolerance")  # kind fields a Claim holds as attributes; the others: Claim.extra
# params.yaml's per-claim overrides: stats.<key> -> the record field it overrides (on the kinds that have it)
OVERRIDES = {"margins": "margin", "tolerances": "tolerance"}
# Kinds whose power is at a true difference 0 against a bound (margin or tolerance), not at an effect.
BOUND_KINDS = ("equivalence", "reported_value", "cost_equivalence")
# The custom kinds of this module: their arms and the positive numbers their records must give.
KIND_ARMS = {"rise_then_plateau": {"start", "peak", "end"}, "cost_equivalence": {"a", "b"}}
KIND_NUMBERS = {"rise_then_plateau": ("threshold",), "cost_equivalence": ("flops_ratio_max", "latency_ratio_max")}
ROLES = ("primary", "sensitivity")
# Where the paper states the claim (the first word of `stated_in`; the rest may say more, e.g. "table 2"):
# the harness tests sentences it can point to, and says so where it cannot ("unconfirmed").
STATED_IN = ("abstract", "summary", "text", "table", "figure", "code", "unconfirmed")
DIFF_SD_FACTOR = math.sqrt(2)  # planning: a difference of two independent runs has sqrt(2) x one run's sd


@dataclass
class Arm:
    name: str
    experiment: str
    model: str
    phase: str | None = None  # set: the metric of this phase of the runs, from results/phases.csv

    @property
    def label(self) -> str:
        return f"{self.experiment}/{self.model}" + (f"[{self.phase}]" if self.phase else "")


@dataclass
class Claim:
    id: str
    paper: str
    citation: str
    claim: str
    kind: str
    metric: str
    dataset: str
    arms: list[Arm]
    reported: dict | str  # {value | a, b: numbers, source} or "not public"
    protocol: str
    margin: float | None = None
    min_effect: float | None = None
    extra: dict = field(default_factory=dict)  # fields of custom kinds (e.g. a saturation threshold)
    tolerance: float | None = None  # reported_value: points from the paper's number that still reproduce it
    family: str = ""  # the multiplicity family (default: the paper)
    role: str = "primary"  # primary | sensitivity (another reading of what the paper left open)
    role_reason: str = ""
    stated_in: str = "unconfirmed"  # where the paper states it (STATED_IN)
    harness_choices: dict = field(default_factory=dict)  # what the harness chose, not the paper: dataset, budget, ...
    stand_in_for: str = ""  # the claim's own dataset when the active profile checks it on a stand-in (`stand_in`)

    @property
    def family_key(self) -> str:
        """Where Holm runs: the family, or its sensitivity family."""
        return self.family if self.role == "primary" else f"{self.family}/sensitivity"

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    @property
    def reported_text(self) -> str:
        r = self.reported
        if isinstance(r, str):
            return r
        if "value" in r:
            return f"{r['value']}"
        return " vs ".join(f"{r[a.name]}" for a in self.arms if a.name in r)


@dataclass
class Context:
    """What a kind's evaluator may read: results tables and the stats settings."""

    runs: pd.DataFrame
    phases: pd.DataFrame
    alpha: float


# A custom kind: (claim, ctx, arm values) -> (Comparison, its raw p for Holm, extra numbers for the report).
CustomKind = Callable[[Claim, Context], tuple[stats.Comparison, dict]]
CUSTOM_KINDS: dict[str, CustomKind] = {}


# P2's per-stage claims (measures in l2l/layerwise_analysis.py, read from results/phases.csv).
CUSTOM_KINDS.update(saturation=saturation_check, early_overfit=early_overfit_check)


def rise_then_plateau_check(claim: Claim, ctx: Context) -> tuple[stats.Comparison, dict]:
    """The ``rise_then_plateau`` kind (P4's strict line over generations): arms start, peak, end
    (usually phases gen0, gen1, genG of one run); l2l.stats.compare_rise_then_plateau with the
    record's threshold and min_effect. extra: the per-seed gain end - peak and the mean curve."""
    vals = {a.name: arm_values(ctx.runs, claim, a, ctx.phases) for a in claim.arms}
    comp = stats.compare_rise_then_plateau(vals["start"], vals["peak"], vals["end"],
                                           threshold=float(claim.extra["threshold"]), min_effect=claim.min_effect,
                                           alpha=ctx.alpha)
    gains = {s: vals["end"][s] - vals["peak"][s] for s in sorted(set(vals["peak"]) & set(vals["end"]))}
    mean = {n: float(np.mean(list(v.values()))) if v else None for n, v in vals.items()}
    return comp, {"plateau_gain": gains, "mean_curve": mean}


COST_METRICS = ("flops_ratio", "latency_ratio_b")  # A / B cost ratios in phases.csv (l2l.methods.distill)


def cost_equivalence_check(claim: Claim, ctx: Context) -> tuple[stats.Comparison, dict]:
    """The ``cost_equivalence`` kind (P5): arms a (student), b (teacher); accuracy TOST within the
    margin AND the student run's measured cost ratios (phase ``cost_phase`` of arm a in phases.csv:
    flops_ratio against flops_ratio_max, latency_ratio_b<N> against latency_ratio_max for every N of the
    record's ``latency_batches``, or every measured N without one) below their maxima
    (l2l.stats.compare_cost_equivalence). extra: ``cost``, per ratio its per-seed values, mean, 95% interval
    and maximum; params_ratio and the latency ratios the record does not gate on (descriptive)."""
    vals = {a.name: arm_values(ctx.runs, claim, a, ctx.phases) for a in claim.arms}
    a = claim.arm("a")
    p = ctx.phases
    rows = p[(p["experiment"] == a.experiment) & (p["model"] == a.model) & (p["dataset"] == claim.dataset)
             & (p["phase"] == claim.extra.get("cost_phase", "student"))]
    ratios: dict[str, dict[int, float]] = {}
    for metric, g in rows.groupby("metric"):
        if metric == "flops_ratio" or str(metric).startswith("latency_ratio_b") or metric == "params_ratio":
            ratios[str(metric)] = {int(s): float(v) for s, v in zip(g["seed"], g["value"])}
    params_ratio = ratios.pop("params_ratio", {})
    gated = claim.extra.get("latency_batches")
    descriptive = {m: ratios.pop(m) for m in list(ratios) if gated is not None and m.startswith("latency_ratio_b")
                   and int(m.removeprefix("latency_ratio_b")) not in gated}
    maxima = {m: float(claim.extra["flops_ratio_max"] if m == "flops_ratio" else claim.extra["latency_ratio_max"])
              for m in ratios}
    if "flops_ratio" not in ratios or len(ratios) < 2:  # both sides of the cost must be measured
        ratios = {}
    comp = stats.compare_cost_equivalence(vals["a"], vals["b"], ratios, maxima, margin=float(claim.margin),
                                          alpha=ctx.alpha)
    cost = {}
    for m, v in ratios.items():
        mean, _, lo, hi = mean_interval(pd.Series(list(v.values()), dtype=float))
        cost[m] = {"values": v, "mean": mean, "ci_low": lo, "ci_high": hi, "max": maxima[m]}
    return comp, {"cost": cost, "params_ratio": params_ratio, "ungated_ratios": descriptive}


CUSTOM_KINDS.update(rise_then_plateau=rise_then_plateau_check, cost_equivalence=cost_equivalence_check)


def _err(cid: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"claims.yaml: {cid}.{key}: {msg}")


def load_claims(config: Config, path: Path = CLAIMS_FILE) -> list[Claim]:
    """Read and validate the registry against the resolved params.yaml (every profile's experiments)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("claims"), list) or not isinstance(doc.get("papers"), dict):
        raise ConfigError(f"{path}: expected a mapping with 'papers' (id -> citation) and 'claims' (a list)")
    for inc in doc.get("include") or []:  # per-topic files of records, beside claims.yaml
        inc_path = Path(path).parent / inc
        try:
            records = yaml.safe_load(inc_path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: include {inc}: cannot read ({str(e).splitlines()[0]})") from None
        if not isinstance(records, list):
            raise ConfigError(f"{inc_path}: expected a list of claim records")
        doc["claims"] = doc["claims"] + records
    experiments, measures = {}, {}  # measures: (experiment, model) -> {phase: its measure names}
    for prof in config.profiles.values():
        for e, exp in prof.experiments.items():
            experiments.setdefault(e, set()).update(exp.models)
            for model in exp.models:
                for phase, names in METHODS[exp.method].phase_metrics(exp.options, prof.models[model]).items():
                    measures.setdefault((e, model), {}).setdefault(phase, set()).update(names)
    kinds = BUILTIN_KINDS + tuple(CUSTOM_KINDS)
    out, seen = [], set()
    for i, rec in enumerate(doc["claims"]):
        cid = rec.get("id", f"claims[{i}]") if isinstance(rec, dict) else f"claims[{i}]"
        if not isinstance(rec, dict):
            raise _err(cid, "", "expected a mapping")
        for key in REQUIRED:
            if key not in rec:
                raise _err(cid, key, "missing")
        if cid in seen:
            raise _err(cid, "id", "duplicate claim id")
        seen.add(cid)
        if rec["paper"] not in doc["papers"]:
            raise _err(cid, "paper", f"unknown paper {rec['paper']!r} (not in papers:)")
        if rec["kind"] not in kinds:
            raise _err(cid, "kind", f"expected one of {', '.join(kinds)}, got {rec['kind']!r}")
        _closed_fields(cid, rec)
        arms = _arms(cid, rec, experiments)
        _check_metric(cid, rec["metric"], arms, measures)
        st = config.stats
        margin = st["margins"].get(cid, rec.get("margin"))
        for key in KIND_NUMBERS.get(rec["kind"], ()):
            if not (isinstance(rec.get(key), (int, float)) and not isinstance(rec.get(key), bool) and rec[key] > 0):
                raise _err(cid, key, f"expected a positive number for a {rec['kind']} claim, got {rec.get(key)!r}")
        lb = rec.get("latency_batches")
        if lb is not None and not (isinstance(lb, list) and lb and all(  # a cost_equivalence field (KIND_FIELDS)
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lb)):
            raise _err(cid, "latency_batches", "expected a non-empty list of the batch sizes whose latency ratios "
                                               f"decide the claim, got {lb!r}")
        if rec["kind"] in ("equivalence", "cost_equivalence") and (not isinstance(margin, (int, float)) or margin <= 0):
            raise _err(cid, "margin", f"expected a positive number for an equivalence claim, got {margin!r}")
        tolerance = st["tolerances"].get(cid, rec.get("tolerance"))
        if rec["kind"] == "reported_value" and (not isinstance(tolerance, (int, float)) or tolerance <= 0):
            raise _err(cid, "tolerance", "expected a positive number (points from the paper's number that still "
                                         f"reproduce it) for a reported_value claim, got {tolerance!r}")
        if rec.get("min_effect") is not None and not (isinstance(rec["min_effect"], (int, float))
                                                      and rec["min_effect"] > 0):
            raise _err(cid, "min_effect", f"expected a positive number, got {rec['min_effect']!r}")
        role = rec.get("role", "primary")
        if role not in ROLES:
            raise _err(cid, "role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        family = rec.get("family", rec["paper"])
        if not isinstance(family, str) or not family:
            raise _err(cid, "family", f"expected a non-empty name, got {family!r}")
        reported = rec["reported"]
        if not (reported == "not public" or isinstance(reported, dict) and "source" in reported):
            raise _err(cid, "reported", "expected 'not public' or a mapping with value (or per-arm values) and source")
        if rec["kind"] == "reported_value" and not isinstance(reported, dict):
            raise _err(cid, "reported", "a reported_value claim needs the paper's value")
        stated_in = rec.get("stated_in", "unconfirmed")
        if not isinstance(stated_in, str) or stated_in.split(" ")[0] not in STATED_IN:
            raise _err(cid, "stated_in", f"expected a string starting with one of {', '.join(STATED_IN)}, "
                                         f"got {stated_in!r}")
        choices = rec.get("harness_choices", {})
        if not (isinstance(choices, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in choices.items())):
            raise _err(cid, "harness_choices", f"expected a mapping of aspect -> the harness's choice (strings), "
                                               f"got {choices!r}")
        stand_in = rec.get("stand_in", {})
        if not (isinstance(stand_in, dict) and all(isinstance(k, str) and isinstance(v, str) and k in config.profiles
                                                   for k, v in stand_in.items())):
            raise _err(cid, "stand_in", "expected a mapping profile -> the dataset that profile checks the claim on, "
                                        f"profiles {', '.join(config.profiles)}; got {stand_in!r}")
        dataset = stand_in.get(config.profile.name, rec["dataset"])
        known = set(REQUIRED) | set(COMMON) | set(ATTRIBUTES)
        out.append(Claim(cid, rec["paper"], doc["papers"][rec["paper"]], rec["claim"], rec["kind"], rec["metric"],
                         dataset, arms, reported, rec["protocol"], margin, rec.get("min_effect"),
                         {k: v for k, v in rec.items() if k not in known}, tolerance, family, role,
                         rec.get("role_reason", ""), stated_in, choices,
                         rec["dataset"] if dataset != rec["dataset"] else ""))
    _check_overrides(config.stats, out)
    return out


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _closed_fields(cid: str, rec: dict) -> None:
    """Every field of the record is one its kind takes (KIND_FIELDS)."""
    allowed = set(REQUIRED) | set(COMMON) | set(KIND_FIELDS[rec["kind"]])
    for key in rec:
        if key not in allowed:
            raise _err(cid, key, f"unknown field for a {rec['kind']} claim{_did_you_mean(key, allowed)}; expected "
                                 f"one of {', '.join(sorted(allowed))}")


def _check_metric(cid: str, metric: Any, arms: list[Arm], measures: dict[tuple[str, str], dict[str, set]]) -> None:
    """The claim's metric is a column the plan's results will have: of results/runs.csv for a run's
    arm, of the phase's measures (results/phases.csv, as its method declares them) for a phase's."""
    for arm in arms:
        if arm.phase is None:
            if metric not in RUN_METRICS:
                raise _err(cid, "metric", "expected a metric column of results/runs.csv"
                                          f"{_did_you_mean(metric, RUN_METRICS)} ({', '.join(RUN_METRICS)}), got {metric!r}")
            continue
        phases = measures.get((arm.experiment, arm.model), {})
        if arm.phase not in phases:
            raise _err(cid, f"arms.{arm.name}.phase", f"expected a phase of {arm.experiment}/{arm.model} whose "
                                                      f"measures results/phases.csv holds "
                                                      f"({', '.join(phases) or 'none'}), got {arm.phase!r}")
        if metric not in phases[arm.phase]:
            raise _err(cid, "metric", f"expected a measure of phase {arm.phase} of {arm.experiment} (arm {arm.name})"
                                      f"{_did_you_mean(metric, phases[arm.phase])}: "
                                      f"{', '.join(sorted(phases[arm.phase]))}; got {metric!r}")


def _check_overrides(stats_settings: dict, claims: list[Claim]) -> None:
    """stats.margins / stats.tolerances name claims of the registry whose kind has that field: an
    override of nothing is an error, not a no-op."""
    kind = {c.id: c.kind for c in claims}
    for key, fld in OVERRIDES.items():
        for cid in stats_settings[key]:
            if cid not in kind:
                raise config_error(f"stats.{key}.{cid}", f"a claim id of claims.yaml{_did_you_mean(cid, kind)}",
                                   problem="unknown claim id")
            if fld not in KIND_FIELDS[kind[cid]]:
                raise config_error(f"stats.{key}.{cid}", "claims of a kind with a " + fld + " ("
                                   + ", ".join(k for k, f in KIND_FIELDS.items() if fld in f) + ")",
                                   problem=f"{cid} is a {kind[cid]} claim, which has no {fld}")


def _arms(cid: str, rec: dict, experiments: dict[str, set]) -> list[Arm]:
    raw = rec["arms"]
    if rec["kind"] == "ordering":
        if not isinstance(raw, list) or len(raw) < 2:
            raise _err(cid, "arms", "an ordering needs a list of at least 2 arms, ascending")
        items = [(f"arm{i + 1}", a) for i, a in enumerate(raw)]
    else:
        if not isinstance(raw, dict):
            raise _err(cid, "arms", "expected a mapping of arm name -> {experiment, model}")
        need = {"a", "b"} if rec["kind"] in TWO_ARM_KINDS else {"a"} if rec["kind"] == "reported_value" else \
            KIND_ARMS.get(rec["kind"], set())
        if not need <= set(raw):
            raise _err(cid, "arms", f"expected arms {', '.join(sorted(need))}")
        items = list(raw.items())
    arms = []
    for name, a in items:
        if not isinstance(a, dict) or "experiment" not in a or "model" not in a:
            raise _err(cid, f"arms.{name}", "expected {experiment, model}")
        if a["experiment"] not in experiments:
            raise _err(cid, f"arms.{name}.experiment", f"unknown experiment {a['experiment']!r} (params.yaml)")
        if a["model"] not in experiments[a["experiment"]]:
            raise _err(cid, f"arms.{name}.model", f"model {a['model']!r} is not trained by {a['experiment']}")
        if not isinstance(a.get("phase", ""), str) or set(a) - {"experiment", "model", "phase"}:
            raise _err(cid, f"arms.{name}", "expected {experiment, model} and optionally phase (a phase name)")
        arms.append(Arm(name, a["experiment"], a["model"], a.get("phase")))
    return arms


# --- checking -----------------------------------------------------------------------------

def arm_values(runs: pd.DataFrame, claim: Claim, arm: Arm, phases: pd.DataFrame | None = None) -> dict[int, float]:
    """seed -> the claim's metric: a column of runs.csv, or for an arm with a phase, that phase's
    metric in phases.csv (e.g. generation 0 of a run that trains several)."""
    if arm.phase is not None:
        p = phases if phases is not None else pd.DataFrame(columns=["experiment", "model", "dataset", "phase", "metric"])
        rows = p[(p["experiment"] == arm.experiment) & (p["model"] == arm.model) & (p["dataset"] == claim.dataset)
                 & (p["phase"] == arm.phase) & (p["metric"] == claim.metric)]
        return {int(s): float(v) for s, v in zip(rows["seed"], rows["value"])}
    rows = runs[(runs["experiment"] == arm.experiment) & (runs["model"] == arm.model)
                & (runs["dataset"] == claim.dataset)]
    return {int(s): float(v) for s, v in zip(rows["seed"], rows[claim.metric])}


def arm_runs(runs: pd.DataFrame, claim: Claim, arm: Arm) -> dict[int, str]:
    rows = runs[(runs["experiment"] == arm.experiment) & (runs["model"] == arm.model)
                & (runs["dataset"] == claim.dataset)]
    return {int(s): r for s, r in zip(rows["seed"], rows["run"])}


def _mcnemar(claim: Claim, runs: pd.DataFrame, preds: Any) -> float | None:
    """Per-seed McNemar on the final test predictions of paired runs, combined across seeds."""
    if claim.kind not in TWO_ARM_KINDS or preds is None or claim.metric != "final_test_acc" \
            or any(a.phase for a in claim.arms):  # the saved predictions are of the final model, not a phase's
        return None
    y = preds.get(f"y_test__{claim.dataset}")
    if y is None or y.ndim != 1:  # multi-label (VOC): a prediction is a score per class, not right or wrong
        return None
    ra, rb = (arm_runs(runs, claim, claim.arm(n)) for n in ("a", "b"))
    ps = [stats.mcnemar_paired(preds[ra[s]], preds[rb[s]], y)[0] for s in sorted(set(ra) & set(rb))
          if ra[s] in preds and rb[s] in preds]
    return stats.combine_mcnemar(ps)


def effect_of_interest(claim: Claim) -> float | None:
    """The effect the rule's power is computed at: the paper's reported difference, else min_effect
    (0 for equivalence and reported values: power to show agreement when there is agreement)."""
    if claim.kind in BOUND_KINDS:
        return 0.0
    r = claim.reported
    if claim.kind == "superiority" and isinstance(r, dict) and "a" in r and "b" in r:
        return float(r["a"]) - float(r["b"])
    steps = [a.name for a in claim.arms]
    if claim.min_effect is None and claim.kind == "ordering" and isinstance(r, dict) and set(steps) <= set(r):
        return min(float(r[b]) - float(r[a]) for a, b in zip(steps, steps[1:]))  # the paper's smallest step
    return claim.min_effect


def power_bound(claim: Claim) -> float | None:
    """The bound a claim's second test is against: margin, tolerance or saturation threshold."""
    if claim.kind in ("equivalence", "cost_equivalence"):
        return claim.margin
    if claim.kind == "reported_value":
        return claim.tolerance
    return claim.extra.get("threshold") if claim.kind in ("saturation", "rise_then_plateau") else None


def claim_power(claim: Claim, n: int, sd: float, alpha: float, m: int) -> tuple[float | None, str]:
    """Power of the full rule for this claim with n seeds per arm, per-seed sd `sd` of the tested
    difference (of one arm for a reported value), in a family of m tests."""
    parts = len(claim.arms) - 1 if claim.kind == "ordering" else 1
    return stats.rule_power(claim.kind, n, sd, alpha / max(m, 1), effect=effect_of_interest(claim),
                            bound=power_bound(claim), parts=parts)


def seeds_needed(claim: Claim, sd: float, alpha: float, m: int, start: int = 3) -> int | None:
    return stats.seeds_for_power(lambda n: claim_power(claim, n, sd, alpha, m)[0], start=start)


def planning_sd(claim: Claim, run_sd: float) -> float:
    """The sd of the tested per-seed quantity from the between-seed sd of one run's metric."""
    return run_sd if claim.kind == "reported_value" else run_sd * DIFF_SD_FACTOR


def profile_claims(prof: Profile, claims: list[Claim]) -> list[tuple[Claim, int, int]]:
    """The claims whose arms the profile trains, each with its planned seeds per arm (the fewest
    of its arms' experiments) and the number of tests in its family in this profile."""
    seeds = {e: len(exp.seeds) for e, exp in prof.experiments.items()}
    trained = prof.trains()
    mine = [c for c in claims if all((a.experiment, a.model, c.dataset) in trained for a in c.arms)]
    sizes: dict[str, int] = {}
    for c in mine:
        sizes[c.family_key] = sizes.get(c.family_key, 0) + 1
    return [(c, min(seeds[a.experiment] for a in c.arms), sizes[c.family_key]) for c in mine]


def power_table(config: Config, claims: list[Claim], measured: dict[str, float] | None = None) -> list[dict]:
    """Per claim whose arms the profile trains: its family and size, planned seeds per arm (the
    fewest of its arms' experiments), the rule's power at the effect of interest with them, and the
    seeds per arm for 80%; sd = the measured sd of the claim's tested quantity (`measured`: claim id
    -> sd, from results/claims.json) where runs exist, else from stats.planning_sd."""
    st = config.stats
    rows = []
    for c, n, m in profile_claims(config.profile, claims):
        sd = (measured or {}).get(c.id) or planning_sd(c, st["planning_sd"])
        power, how = claim_power(c, n, sd, st["alpha"], m)
        rows.append({"claim": c.id, "kind": c.kind, "family": c.family_key, "family_tests": m, "seeds": n,
                     "sd_source": "measured" if (measured or {}).get(c.id) else "planning_sd",
                     "effect": effect_of_interest(c) if c.kind not in BOUND_KINDS
                     else power_bound(c), "sd": sd, "power": power, "power_how": how,
                     "seeds_for_80": seeds_needed(c, sd, st["alpha"], m, start=st["min_seeds"])})
    return rows


def compare_values(claim: Claim, vals: dict[str, dict], alpha: float) -> tuple[stats.Comparison, list]:
    """The built-in kinds' comparison from arm name -> {seed: value} -> (comparison, ordering steps)."""
    if claim.kind == "superiority":
        return stats.compare_superiority(vals["a"], vals["b"], alpha=alpha, min_effect=claim.min_effect,
                                         effect_of_interest=effect_of_interest(claim)), []
    if claim.kind == "equivalence":
        return stats.compare_equivalence(vals["a"], vals["b"], margin=claim.margin, alpha=alpha), []
    if claim.kind == "reported_value":
        return stats.compare_reported(vals["a"], float(claim.reported["value"]), tolerance=claim.tolerance,
                                      alpha=alpha), []
    if claim.kind == "ordering":
        return stats.compare_ordering([vals[a.name] for a in claim.arms], alpha=alpha, min_effect=claim.min_effect)
    raise ValueError(f"{claim.id}: kind {claim.kind!r} is not built in")


def _compare(claim: Claim, ctx: Context) -> tuple[stats.Comparison, list[stats.Comparison], dict]:
    """-> (comparison, ordering steps, extra numbers)."""
    if claim.kind in CUSTOM_KINDS:
        comp, extra = CUSTOM_KINDS[claim.kind](claim, ctx)
        return comp, [], extra
    vals = {a.name: arm_values(ctx.runs, claim, a, ctx.phases) for a in claim.arms}
    comp, steps = compare_values(claim, vals, ctx.alpha)
    return comp, steps, {}


# --- failed runs (pre-registered: decided by training figures, never by the tested metric) ---------

def failed_mask(train_loss: Any, train_acc: Any, floor: float) -> np.ndarray:
    """The failed-run rule, elementwise: a non-finite final training loss, or a final training accuracy
    below the floor (or not finite)."""
    loss, acc = np.asarray(train_loss, dtype=float), np.asarray(train_acc, dtype=float)
    return ~np.isfinite(loss) | ~(acc >= floor)


def failed_runs(runs: pd.DataFrame, rule: dict | None) -> dict[str, str]:
    """run hash -> why it failed by the rule (stats.failed_run): a non-finite final training loss, or a final
    training accuracy below its dataset's floor (train_acc_floor). Tables without those columns (hand-made
    ones) have no failed run."""
    if not rule or runs.empty or not {"train_loss", "train_acc"} <= set(runs.columns):
        return {}
    floors = rule.get("train_acc_floor") or {}
    floor = runs["dataset"].map(floors).fillna(-math.inf).to_numpy(dtype=float)
    bad = failed_mask(runs["train_loss"], runs["train_acc"], floor)
    return {run: ("final training loss not finite" if not math.isfinite(loss) else
                  f"final training accuracy {acc:.1f} below the floor {fl:g}")
            for run, loss, acc, fl, b in zip(runs["run"], runs["train_loss"].astype(float),
                                             runs["train_acc"].astype(float), floor, bad) if b}


def failed_rule(config: Config) -> dict:
    """The active profile's failed-run rule: {train_acc_floor: dataset -> floor, max_per_arm}."""
    rule = config.stats["failed_run"]
    return {"train_acc_floor": rule["train_acc_floor"].get(config.profile.name, {}), "max_per_arm": rule["max_per_arm"]}


def failed_text(rule: dict | None) -> str:
    floors = ", ".join(f"{ds} {v:g}" for ds, v in ((rule or {}).get("train_acc_floor") or {}).items())
    return (f"failed runs, excluded by the pre-registered rule (stats.failed_run: non-finite final training loss or "
            f"final training accuracy below {floors or 'no floor'}; at most {(rule or {}).get('max_per_arm', 1)} "
            "per arm)")


# --- checking: looks, families, verdicts -----------------------------------------------------------

@dataclass
class _Looks:
    """One claim's looks that its runs make available: per look its seeds, comparison (with an ordering's
    steps and a custom kind's numbers), failed runs per arm and whether they stop it."""

    seeds: list[list[int]] = field(default_factory=list)
    comps: list[stats.Comparison] = field(default_factory=list)
    steps: list[list[stats.Comparison]] = field(default_factory=list)  # an ordering's steps
    extra: list[dict] = field(default_factory=list)  # a custom kind's numbers for the report
    failed: list[dict[str, dict[int, str]]] = field(default_factory=list)
    halt: list[bool] = field(default_factory=list)


def _look_seeds(design: stats.Design, seeds: set[int]) -> list[list[int]]:
    """The seeds of each look: the design's first n_k seeds (0, 1, ...); one look at every seed without looks."""
    if design.looks is None:
        return [sorted(seeds)]
    return [list(range(n)) for n in design.looks]


def _claim_looks(claim: Claim, ctx: Context, design: stats.Design, failed: dict[str, str],
                 max_failed: int) -> _Looks:
    """Replay the looks of one claim on the runs there are: look k is available when every arm has each
    of its seeds (failed or not); failed runs are left out of what its comparison sees."""
    arm_runs_ = {a.name: arm_runs(ctx.runs, claim, a) for a in claim.arms}
    present = {a.name: set(arm_values(ctx.runs, claim, a, ctx.phases)) for a in claim.arms}
    every = set.union(*present.values()) if present else set()
    out = _Looks()
    for seeds in _look_seeds(design, every):
        if design.looks is not None and not all(set(seeds) <= present[a] for a in present):
            break
        keep = set(seeds)
        bad = {a: {s: failed[r] for s, r in arm_runs_[a].items() if s in keep and r in failed} for a in arm_runs_}
        drop = {arm_runs_[a][s] for a in bad for s in bad[a]}
        runs = ctx.runs[ctx.runs["seed"].isin(keep) & ~ctx.runs["run"].isin(drop)]
        phases = ctx.phases if ctx.phases.empty else ctx.phases[ctx.phases["seed"].isin(keep)
                                                                 & ~ctx.phases["run"].isin(drop)]
        comp, steps, extra = _compare(claim, Context(runs, phases, ctx.alpha))
        out.seeds.append(seeds)
        out.comps.append(comp)
        out.steps.append(steps)
        out.extra.append(extra)
        out.failed.append(bad)
        out.halt.append(any(len(v) > max_failed for v in bad.values()))
    return out


def decide(claims: list[Claim], looks: list[_Looks | None], alpha: float, design: stats.Design,
           power: bool = True) -> list[dict | None]:
    """The verdicts of checked claims (looks[i] None = not run): l2l.stats.run_family within each family;
    per claim its verdict, reason and the record of its looks (None for claims not run)."""
    out: list[dict | None] = [None] * len(claims)
    families: dict[str, list[int]] = {}
    for i, (cl, lk) in enumerate(zip(claims, looks)):
        if lk is not None:
            families.setdefault(cl.family_key, []).append(i)
    for fam, idx in families.items():
        m = len(idx)
        grid = [[stats.LookStats.of(c, h) if c.tests is not None else _untestable(h)
                 for c, h in zip(looks[i].comps, looks[i].halt)] for i in idx]  # type: ignore[union-attr]
        result = stats.run_family(grid, design, alpha)
        for j, i in enumerate(idx):
            cl, lk = claims[i], looks[i]
            assert lk is not None
            code, stop, last = int(result.code[0, j]), int(result.stop[0, j]), int(result.last[0, j])
            k = stop if stop >= 0 else max(last, 0)
            k = min(k, len(lk.comps) - 1)
            c = lk.comps[k]
            assert c is not None
            c.family_size = m
            n = c.n
            if power and c.sd is not None and c.sd > 0 and n >= 2:
                c.power = claim_power(cl, n, c.sd, alpha, m)[0]
                c.seeds_needed = seeds_needed(cl, c.sd, alpha, m, start=max(design.min_seeds, 2))
            failed_here = {a: v for a, v in lk.failed[k].items() if v}
            halted = "; ".join(f"arm {a}: {len(v)} failed" for a, v in failed_here.items())
            v, r = stats.describe(c, code, k, design, float(result.level_support[0, j]),
                                  float(result.level_contra[0, j]), _finite(result.chance[0, j]), halted)
            if failed_here:
                r += "; " + "; ".join(f"arm {a} seed {s}: {why}" for a, f in failed_here.items()
                                      for s, why in f.items())
            out[i] = {"verdict": v, "reason": r, "family": fam, "family_size": m, "look": k, "code": code,
                      "comparison": c, "steps": lk.steps[k], "extra": lk.extra[k], "seeds": lk.seeds[k],
                      "failed": failed_here,
                      "sequential": _sequential_record(design, lk, result, j, k, code)}
    return out


def _finite(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _untestable(halt: bool) -> stats.LookStats:
    """A look with no test (a kind that could not compare): it stays in its family, deciding nothing."""
    nan = np.full((1, 1), np.nan)
    return stats.LookStats(stats.superiority_tests(None), nan, nan, nan, np.array([0]), np.array([halt]))


def _sequential_record(design: stats.Design, lk: _Looks, result: stats.FamilyOutcome, j: int, k: int,
                       code: int) -> dict:
    """Per look taken: seeds per arm, p-values, the levels (the boundary) and what happened."""
    rows = []
    for i, (seeds, c) in enumerate(zip(lk.seeds, lk.comps)):
        if c is None or i > k:
            break
        rows.append({"look": i + 1, "seeds": len(seeds), "n": c.n,
                     "estimate": _finite(c.quantities[c.tests.shown]["est"]) if c.tests else None,
                     "p_support": c.p_value, "p_contra": c.p_contra,
                     "level_support": _finite(result.level_support[0, j]) if i == k else None,
                     "level_contra": _finite(result.level_contra[0, j]) if i == k else None,
                     "failed": sum(len(v) for v in lk.failed[i].values()),
                     "decision": stats.OUTCOMES[code] if i == k else "continue"})
    stopped = code != stats.CONTINUE
    nxt = None if stopped or design.looks is None else design.looks[min(k + 1, design.count - 1)]
    c = lk.comps[k]
    return {"design": design.text(), "looks": rows, "look": k + 1, "of": design.count, "status":
            "stopped" if stopped else "continue", "why": stats.OUTCOMES[code], "seeds_per_arm": len(lk.seeds[k]),
            "next_seeds": nxt, "decision_interval": c.decision, "ci95": [c.ci_low, c.ci_high]}


def check(claims: list[Claim], runs: pd.DataFrame, phases: pd.DataFrame, preds: Any, profile: str,
          alpha: float, min_seeds: int, design: stats.Design | None = None, failed_run: dict | None = None
          ) -> list[dict]:
    """Every claim -> a JSON-safe record with its looks, statistics and verdict. design: the sequential
    design (None: one look at the seeds there are, the fixed plan); failed_run: stats.failed_run."""
    design = design or stats.Design(None, min_seeds=min_seeds)
    ctx = Context(runs, phases, alpha)
    failed = failed_runs(runs, failed_run)
    max_failed = int((failed_run or {}).get("max_per_arm", 1))
    records, looks = [], []
    for claim in claims:
        rec = {"id": claim.id, "paper": claim.paper, "citation": claim.citation, "claim": claim.claim,
               "kind": claim.kind, "metric": claim.metric, "dataset": claim.dataset, "protocol": claim.protocol,
               "reported": claim.reported, "reported_text": claim.reported_text, "margin": claim.margin,
               "tolerance": claim.tolerance, "min_effect": claim.min_effect, "family": claim.family_key,
               "role": claim.role, "role_reason": claim.role_reason, "stated_in": claim.stated_in,
               "harness_choices": claim.harness_choices, "stand_in_for": claim.stand_in_for,
               "arms": {a.name: {"experiment": a.experiment, "model": a.model, "phase": a.phase,
                                 "values": arm_values(runs, claim, a, phases), "runs": arm_runs(runs, claim, a)}
                        for a in claim.arms}, **claim.extra}
        missing = [a for a in claim.arms if not rec["arms"][a.name]["values"]]
        lk = None if missing else _claim_looks(claim, ctx, design, failed, max_failed)
        if missing or not lk.comps:  # type: ignore[union-attr]
            why = f"its runs are not in profile {profile}" if missing else \
                f"fewer seeds than the design's first look ({design.looks[0] if design.looks else 1} per arm)"
            # why: the general cause, which the report folds not-run claims on; reason: the runs it lacks
            rec.update(status="not run", verdict="not run", why=why,
                       reason="; ".join(f"{a.label} on {claim.dataset} is not in profile {profile}" for a in missing)
                       if missing else why)
            lk = None
        records.append(rec)
        looks.append(lk)
    for rec, lk, d in zip(records, looks, decide(claims, looks, alpha, design)):
        if lk is None or d is None:
            continue
        comp, steps, extra = d.pop("comparison"), d.pop("steps"), d.pop("extra")
        keep = set(d.pop("seeds"))
        for name, arm in rec["arms"].items():  # what the verdict used: the stopping look's seeds, failed runs out
            bad = set(d["failed"].get(name, {}))
            arm["values"] = {s: v for s, v in arm["values"].items() if s in keep and s not in bad}
            arm["runs"] = {s: r for s, r in arm["runs"].items() if s in keep}
        comp.mcnemar_p = _mcnemar(claim_of(claims, rec["id"]), runs[runs["seed"].isin(keep)], preds)
        verdict, reason = d.pop("verdict"), d.pop("reason")
        rec.update(status="run", steps=[s.to_dict() for s in steps], **extra, **d)
        rec["sequential"] = stats.json_safe(rec["sequential"])
        rec["failed_rule"] = failed_text(failed_run) if failed_run else ""
        if profile == "smoke":  # smoke scale can support nothing: say what the numbers alone would give
            rec.update(verdict="inconclusive (smoke scale)", reason=f"smoke scale; the statistics alone: {verdict}"
                       f" ({reason})")
        else:
            rec.update(verdict=verdict, reason=reason)
        rec["comparison"] = comp.to_dict()
    return records


def claim_of(claims: list[Claim], cid: str) -> Claim:
    return next(c for c in claims if c.id == cid)


def load_predictions(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}

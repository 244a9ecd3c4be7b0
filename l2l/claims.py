"""Claims as data (claims.yaml), checked against results/ with l2l.stats.

A claim names its arms (an experiment of params.yaml, a model, the claim's dataset); the runs
of each arm pair by seed. Every claim of the registry appears in the output: checked, or
"not run" with the reason (its arms are not in the active profile). Holm's correction runs
across the family of all claims checked in one report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from l2l import stats
from l2l.checks import ConfigError
from l2l.config import Config
from l2l.layerwise_analysis import early_overfit_check, saturation_check

CLAIMS_FILE = Path("claims.yaml")
TWO_ARM_KINDS = ("superiority", "equivalence")
BUILTIN_KINDS = ("superiority", "equivalence", "ordering", "reported_value")
REQUIRED = ("id", "paper", "claim", "kind", "metric", "dataset", "arms", "reported", "protocol")


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
    n_resamples: int


# A custom kind: (claim, ctx, arm values) -> (Comparison, its raw p for Holm, extra numbers for the report).
CustomKind = Callable[[Claim, Context], tuple[stats.Comparison, dict]]
CUSTOM_KINDS: dict[str, CustomKind] = {}


# P2's per-stage claims (measures in l2l/layerwise_analysis.py, read from results/phases.csv).
CUSTOM_KINDS.update(saturation=saturation_check, early_overfit=early_overfit_check)


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
    experiments = {}
    for prof in config.profiles.values():
        for e, exp in prof.experiments.items():
            experiments.setdefault(e, set()).update(exp.models)
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
        arms = _arms(cid, rec, experiments)
        margin = rec.get("margin")
        margin = config.stats["margins"].get(cid, margin)
        if rec["kind"] == "equivalence" and (not isinstance(margin, (int, float)) or margin <= 0):
            raise _err(cid, "margin", f"expected a positive number for an equivalence claim, got {margin!r}")
        reported = rec["reported"]
        if not (reported == "not public" or isinstance(reported, dict) and "source" in reported):
            raise _err(cid, "reported", "expected 'not public' or a mapping with value (or per-arm values) and source")
        if rec["kind"] == "reported_value" and not isinstance(reported, dict):
            raise _err(cid, "reported", "a reported_value claim needs the paper's value")
        known = set(REQUIRED) | {"margin", "min_effect"}
        out.append(Claim(cid, rec["paper"], doc["papers"][rec["paper"]], rec["claim"], rec["kind"], rec["metric"],
                         rec["dataset"], arms, reported, rec["protocol"], margin, rec.get("min_effect"),
                         {k: v for k, v in rec.items() if k not in known}))
    return out


def _arms(cid: str, rec: dict, experiments: dict[str, set]) -> list[Arm]:
    raw = rec["arms"]
    if rec["kind"] == "ordering":
        if not isinstance(raw, list) or len(raw) < 2:
            raise _err(cid, "arms", "an ordering needs a list of at least 2 arms, ascending")
        items = [(f"arm{i + 1}", a) for i, a in enumerate(raw)]
    else:
        if not isinstance(raw, dict):
            raise _err(cid, "arms", "expected a mapping of arm name -> {experiment, model}")
        need = {"a", "b"} if rec["kind"] in TWO_ARM_KINDS else {"a"} if rec["kind"] == "reported_value" else set()
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


def _effect_of_interest(claim: Claim) -> float | None:
    r = claim.reported
    if isinstance(r, dict) and "a" in r and "b" in r:
        return float(r["a"]) - float(r["b"])
    return claim.min_effect


def _compare(claim: Claim, ctx: Context) -> tuple[stats.Comparison, list[stats.Comparison], dict]:
    """-> (comparison, ordering steps, extra numbers)."""
    vals = {a.name: arm_values(ctx.runs, claim, a, ctx.phases) for a in claim.arms}
    kw = {"alpha": ctx.alpha, "n_resamples": ctx.n_resamples}
    if claim.kind == "superiority":
        return stats.compare_superiority(vals["a"], vals["b"], effect_of_interest=_effect_of_interest(claim),
                                         **kw), [], {}
    if claim.kind == "equivalence":
        return stats.compare_equivalence(vals["a"], vals["b"], margin=claim.margin, **kw), [], {}
    if claim.kind == "reported_value":
        return stats.compare_reported(vals["a"], float(claim.reported["value"]), **kw), [], {}
    if claim.kind == "ordering":
        steps, p_max = stats.compare_ordering([vals[a.name] for a in claim.arms], **kw)
        # The ordering as a whole: the first and last arms' comparison carries the numbers shown.
        whole = stats.compare_superiority(vals[claim.arms[-1].name], vals[claim.arms[0].name], **kw)
        whole.p_value = p_max
        return whole, steps, {}
    comp, extra = CUSTOM_KINDS[claim.kind](claim, ctx)
    return comp, [], extra


def check(claims: list[Claim], runs: pd.DataFrame, phases: pd.DataFrame, preds: Any, profile: str,
          alpha: float, min_seeds: int, n_resamples: int) -> list[dict]:
    """Every claim -> a JSON-safe record with statistics, Holm-adjusted p and verdict."""
    ctx = Context(runs, phases, alpha, n_resamples)
    records, comps = [], []
    for claim in claims:
        rec = {"id": claim.id, "paper": claim.paper, "citation": claim.citation, "claim": claim.claim,
               "kind": claim.kind, "metric": claim.metric, "dataset": claim.dataset, "protocol": claim.protocol,
               "reported": claim.reported, "reported_text": claim.reported_text, "margin": claim.margin,
               "arms": {a.name: {"experiment": a.experiment, "model": a.model, "phase": a.phase,
                                 "values": arm_values(runs, claim, a, phases), "runs": arm_runs(runs, claim, a)}
                        for a in claim.arms}, **claim.extra}
        missing = [a for a in claim.arms if not rec["arms"][a.name]["values"]]
        if missing:
            rec.update(status="not run", verdict="not run",
                       reason="; ".join(f"{a.label} on {claim.dataset} is not in profile {profile}" for a in missing))
            comps.append(None)
        else:
            comp, steps, extra = _compare(claim, ctx)
            comp.mcnemar_p = _mcnemar(claim, runs, preds)
            rec.update(status="run", comparison=comp, steps=steps, **extra)
            comps.append(comp)
        records.append(rec)
    adjusted = stats.holm([c.p_value if c is not None else None for c in comps])
    for rec, comp, p_adj in zip(records, comps, adjusted):
        if comp is None:
            continue
        if rec["kind"] == "ordering":
            verdict, reason = stats.verdict_ordering(rec["steps"], alpha=alpha, p_adjusted=p_adj, min_seeds=min_seeds)
        else:
            verdict, reason = stats.verdict(comp, alpha=alpha, p_adjusted=p_adj, min_seeds=min_seeds)
        rec["p_holm"] = p_adj
        if profile == "smoke":  # smoke scale can support nothing: say what the numbers alone would give
            rec.update(verdict="inconclusive (smoke scale)", reason=f"smoke scale; the statistics alone: {verdict}"
                       f" ({reason})")
        else:
            rec.update(verdict=verdict, reason=reason)
        if isinstance(rec["reported"], dict) and "value" in rec["reported"] and rec["kind"] == "reported_value":
            lo, hi = comp.ci_low, comp.ci_high
            rec["reported_inside_interval"] = None if math.isnan(lo) else bool(lo <= rec["reported"]["value"] <= hi)
        rec["comparison"] = comp.to_dict()
        rec["steps"] = [s.to_dict() for s in rec["steps"]]
    return records


def load_predictions(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}

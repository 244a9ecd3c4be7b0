"""P2's per-stage measures, from results/phases.csv alone (pure functions over a DataFrame).

Input: the phases table (columns run, experiment, method, model, dataset, seed, phase, metric,
value) that the aggregate stage writes. Two sources of per-stage accuracy live in it:

- layerwise runs (method ``layerwise``): phase ``stage{s}`` (and ``stage{s}_pruned`` after
  pruning, which then supersedes it), metrics ``head_train_acc`` / ``head_test_acc`` of the
  stage's own auxiliary head;
- end-to-end runs with probes (method ``conventional``, option ``probe_epochs`` > 0): phase
  ``end_to_end``, metrics ``stage{s}_probe_train_acc`` / ``stage{s}_probe_test_acc`` of a
  linear probe on the frozen stage-s features, and ``model_test_acc`` (the network's own
  classifier).

Stages are numbered from 1 (stage s = the network up to its s-th stage). Train accuracies are on
the un-augmented training split; all accuracies in %. Every measure is returned per seed
(``{seed: value}``), so that :mod:`l2l.stats` can test it with runs paired by seed.

Measures:

- critical stage (:func:`critical_stage`): the first stage after which every further stage adds
  less than ``threshold`` points of test accuracy (= S when the last stage still gains);
- gap at full depth: end-to-end test accuracy minus the layerwise last head's;
- early-stage generalisation gap: train minus test accuracy, averaged over stages
  1..``early_stages``, for the layerwise heads and for the end-to-end probes.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from l2l import stats
from l2l.results import interval_shown, mean_interval

STAGE_PHASE = re.compile(r"^stage(\d+)(_pruned)?$")
PROBE_METRIC = re.compile(r"^stage(\d+)_probe_(train|test)_acc$")
HEAD_METRIC = re.compile(r"^head_(train|test)_acc$")
KEYS = ["run", "experiment", "method", "model", "dataset", "seed"]


def stage_table(phases: pd.DataFrame) -> pd.DataFrame:
    """Tidy per-stage accuracies: one row per (run, source, stage) with columns run, experiment,
    method, model, dataset, seed, source ("layerwise" | "probe"), stage, train_acc, test_acc,
    gap (train - test)."""
    cols = [*KEYS, "source", "stage", "train_acc", "test_acc", "gap"]
    phase = phases.phase.astype(str).str.extract(STAGE_PHASE.pattern)
    head = phases.metric.astype(str).str.extract(HEAD_METRIC.pattern)
    probe = phases.metric.astype(str).str.extract(PROBE_METRIC.pattern)
    is_head = phase[0].notna() & head[0].notna()
    lw = phases[is_head].assign(source="layerwise", stage=phase[0][is_head].astype(int), split=head[0][is_head],
                                pruned=phase[1][is_head].notna())
    # After pruning, the pruned stage's measure (stage{s}_pruned) supersedes the unpruned one.
    lw = lw.sort_values("pruned", kind="stable").drop_duplicates(["run", "stage", "split"], keep="last")
    is_probe = probe[0].notna()
    pr = phases[is_probe].assign(source="probe", stage=probe[0][is_probe].astype(int), split=probe[1][is_probe])
    long = pd.concat([lw.drop(columns="pruned"), pr], ignore_index=True)
    if long.empty:
        return pd.DataFrame(columns=cols)
    wide = long.pivot_table(index=[*KEYS, "source", "stage"], columns="split", values="value",
                            aggfunc="first").reset_index()
    wide.columns.name = None
    for c in ("train_acc", "test_acc"):
        wide[c] = wide[c.split("_")[0]] if c.split("_")[0] in wide else np.nan
    wide["gap"] = wide["train_acc"] - wide["test_acc"]
    return wide.sort_values(["experiment", "model", "dataset", "seed", "source", "stage"])[cols].reset_index(drop=True)


def critical_stage(test_acc: Sequence[float], threshold: float) -> int:
    """The first stage (1-based) after which every added stage gains less than ``threshold``
    points: the smallest s with acc[t] - acc[t-1] < threshold for all t > s. Equals
    len(test_acc) when the last stage still gains at least ``threshold``."""
    if not len(test_acc):
        raise ValueError("critical_stage: no stages")
    s = len(test_acc)
    while s > 1 and test_acc[s - 1] - test_acc[s - 2] < threshold:
        s -= 1
    return s


def _arm(table: pd.DataFrame, arm: Mapping[str, str], dataset: str, source: str) -> pd.DataFrame:
    t = table[(table.experiment == arm["experiment"]) & (table.model == arm["model"]) & (table.dataset == dataset)
              & (table.source == source)]
    return t.sort_values(["seed", "stage"])


def _by_seed(t: pd.DataFrame) -> dict[int, pd.DataFrame]:
    return {int(seed): g.sort_values("stage") for seed, g in t.groupby("seed")}


def _model_acc(phases: pd.DataFrame, arm: Mapping[str, str], dataset: str) -> dict[int, float]:
    t = phases[(phases.experiment == arm["experiment"]) & (phases.model == arm["model"])
               & (phases.dataset == dataset) & (phases.metric == "model_test_acc")]
    return {int(r.seed): float(r.value) for r in t.itertuples(index=False)}


def saturation(phases: pd.DataFrame, end_to_end: Mapping[str, str], layerwise: Mapping[str, str], dataset: str,
               threshold: float) -> dict:
    """P2-C1 (layerwise accuracy saturates after a critical stage; end-to-end keeps a gap).

    end_to_end / layerwise: the claim's arms, ``{"experiment": ..., "model": ...}`` (the
    end-to-end run must have probes). threshold: points of test accuracy per added stage below
    which a stage counts as no gain.

    Returns, each per seed ``{seed: value}``:
      ``end_to_end_full``  end-to-end test accuracy at full depth (its own classifier);
      ``layerwise_full``   test accuracy of the layerwise last head (= the final network);
      ``gap_full``         end_to_end_full - layerwise_full (seeds in both arms);
      ``critical_stage``   critical stage of the layerwise heads' test accuracy curve;
      ``probe_critical_stage`` the same for the end-to-end probes' curve;
    and ``n_stages`` (S, the number of stages; None if the arms disagree or are missing).
    The claim holds when end_to_end_full > layerwise_full (superiority, paired by seed) and
    the layerwise critical stage is < S.
    """
    table = stage_table(phases)
    lw = _by_seed(_arm(table, layerwise, dataset, "layerwise"))
    pr = _by_seed(_arm(table, end_to_end, dataset, "probe"))
    e2e = _model_acc(phases, end_to_end, dataset)
    lw_full = {s: float(g.test_acc.iloc[-1]) for s, g in lw.items()}
    stages = {len(g) for g in lw.values()} | {len(g) for g in pr.values()}
    return {
        "end_to_end_full": e2e,
        "layerwise_full": lw_full,
        "gap_full": {s: e2e[s] - lw_full[s] for s in sorted(set(e2e) & set(lw_full))},
        "critical_stage": {s: critical_stage(g.test_acc.tolist(), threshold) for s, g in lw.items()},
        "probe_critical_stage": {s: critical_stage(g.test_acc.tolist(), threshold) for s, g in pr.items()},
        "n_stages": stages.pop() if len(stages) == 1 else None,
    }


def early_overfit(phases: pd.DataFrame, layerwise: Mapping[str, str], end_to_end: Mapping[str, str], dataset: str,
                  early_stages: int | None = None) -> dict:
    """P2-C2 (early layerwise heads overfit: high train, much lower test accuracy).

    layerwise / end_to_end: the claim's arms (``{"experiment", "model"}``); early_stages: how
    many first stages count as early (default: half of the stages, at least 1).

    Returns ``layerwise_gap`` and ``probe_gap`` per seed (train - test accuracy, in points,
    averaged over stages 1..early_stages), plus ``early_stages`` used and ``n_stages``. The
    claim holds when layerwise_gap > probe_gap (superiority, paired by seed).
    """
    table = stage_table(phases)
    lw = _by_seed(_arm(table, layerwise, dataset, "layerwise"))
    pr = _by_seed(_arm(table, end_to_end, dataset, "probe"))
    stages = {len(g) for g in lw.values()} | {len(g) for g in pr.values()}
    n = stages.pop() if len(stages) == 1 else None
    e = early_stages if early_stages is not None else max(1, (n or 2) // 2)

    def gap(groups):
        return {s: float(g[g.stage <= e].gap.mean()) for s, g in groups.items()}

    return {"layerwise_gap": gap(lw), "probe_gap": gap(pr), "early_stages": e, "n_stages": n}


def _mean_curve(groups: dict[int, pd.DataFrame]) -> list[float]:
    """Test accuracy by stage, averaged over seeds."""
    t = pd.concat(groups.values())
    return t.groupby("stage").test_acc.mean().sort_index().tolist()


def last_gain(groups: dict[int, pd.DataFrame]) -> dict[int, float]:
    """Per seed: test accuracy of the last stage minus the one before (points)."""
    return {s: float(g.test_acc.iloc[-1] - g.test_acc.iloc[-2]) for s, g in groups.items() if len(g) >= 2}


def saturation_check(claim, ctx) -> tuple:
    """The ``saturation`` claim kind for :mod:`l2l.claims` (a CustomKind): (Comparison, extra).

    claim: arms a = end-to-end (with probes), b = layerwise; ``threshold`` (points per added
    stage); ``min_effect`` (points, effect of interest). ctx: ``phases``, ``alpha``. The
    comparison is :func:`l2l.stats.compare_saturation`: paired superiority end_to_end_full >
    layerwise_full AND a paired one-sided test that the layerwise last stage's gain (per seed)
    is below ``threshold``, so a curve that keeps improving contradicts the claim. extra: the
    per-seed measures of :func:`saturation`, ``last_gain``, ``mean_curve`` (layerwise test
    accuracy by stage, descriptive) and ``critical_stage_of_mean``.
    """
    threshold = claim.extra.get("threshold")
    if not isinstance(threshold, (int, float)) or threshold <= 0:
        raise ValueError(f"claims.yaml: {claim.id}.threshold: expected a positive number, got {threshold!r}")
    e2e, lw = (claim.arm(n) for n in ("a", "b"))
    r = saturation(ctx.phases, {"experiment": e2e.experiment, "model": e2e.model},
                   {"experiment": lw.experiment, "model": lw.model}, claim.dataset, float(threshold))
    groups = _by_seed(_arm(stage_table(ctx.phases), {"experiment": lw.experiment, "model": lw.model}, claim.dataset,
                           "layerwise"))
    gains = last_gain(groups)
    comp = stats.compare_saturation(r["end_to_end_full"], r["layerwise_full"], gains, threshold=float(threshold),
                                    min_effect=claim.min_effect, alpha=ctx.alpha)
    curve = _mean_curve(groups) if groups else []
    crit = critical_stage(curve, float(threshold)) if curve else None
    return comp, {**r, "last_gain": gains, "mean_curve": curve, "critical_stage_of_mean": crit}


def early_overfit_check(claim, ctx) -> tuple:
    """The ``early_overfit`` claim kind for :mod:`l2l.claims` (a CustomKind): (Comparison, extra).

    claim: arms a = layerwise, b = end-to-end (with probes); ``early_stages`` (null = half the
    stages); ``min_effect``. The comparison is the paired superiority layerwise_gap > probe_gap
    (train - test points over the early stages). extra: the measures of :func:`early_overfit`.
    """
    lw, e2e = (claim.arm(n) for n in ("a", "b"))
    r = early_overfit(ctx.phases, {"experiment": lw.experiment, "model": lw.model},
                      {"experiment": e2e.experiment, "model": e2e.model}, claim.dataset,
                      claim.extra.get("early_stages"))
    comp = stats.compare_superiority(r["layerwise_gap"], r["probe_gap"], alpha=ctx.alpha,
                                     min_effect=claim.min_effect)
    return comp, r


def stage_pairs(phases: pd.DataFrame) -> list[dict]:
    """Every (model, dataset) that has both layerwise heads and end-to-end probes, with the
    experiments that hold them: [{"model", "dataset", "layerwise", "end_to_end"}]."""
    t = stage_table(phases)
    out = []
    for (model, dataset), g in t.groupby(["model", "dataset"], sort=True):
        lw = sorted(g[g.source == "layerwise"].experiment.unique())
        pr = sorted(g[g.source == "probe"].experiment.unique())
        out += [{"model": model, "dataset": dataset, "layerwise": a, "end_to_end": b} for a in lw for b in pr]
    return out


def _band(values: pd.Series) -> tuple[float, float, float]:
    mean, _, lo, hi = mean_interval(values)
    return mean, lo, hi


def stage_figure(phases: pd.DataFrame, model: str, dataset: str, layerwise: str = "layerwise",
                 end_to_end: str = "layerwise_e2e"):
    """Per-stage curves of one architecture: test accuracy by stage (layerwise heads vs the
    end-to-end probes, with the end-to-end network's own accuracy at full depth) and the
    train - test gap by stage; mean across seeds, band = 95% t-interval. Returns a Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = stage_table(phases)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    series = ((layerwise, "layerwise", "layerwise head"), (end_to_end, "probe", "end-to-end, linear probe"))
    for experiment, source, label in series:
        t = _arm(table, {"experiment": experiment, "model": model}, dataset, source)
        if t.empty:
            continue
        n = t.seed.nunique()
        for ax, metric in zip(axes, ("test_acc", "gap")):
            stats = pd.DataFrame([(s, *_band(g[metric])) for s, g in t.groupby("stage")],
                                 columns=["stage", "mean", "lo", "hi"])
            line, = ax.plot(stats.stage, stats["mean"], marker="o", label=f"{label} (n={n})")
            if interval_shown(n, stats.lo.min(), stats.hi.max(), (0, 100) if metric == "test_acc" else (-100, 100)):
                ax.fill_between(stats.stage, stats.lo, stats.hi, alpha=0.2, color=line.get_color())
    full = _model_acc(phases, {"experiment": end_to_end, "model": model}, dataset)
    if full:
        s_max = int(table[(table.model == model) & (table.dataset == dataset)].stage.max())
        axes[0].errorbar([s_max], [np.mean(list(full.values()))], fmt="k*", markersize=10,
                         label="end-to-end network")
    for ax, title in zip(axes, ("test accuracy (%)", "train - test accuracy (points)")):
        ax.set_xlabel("stage")
        ax.set_title(f"{model} on {dataset}: {title}")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    return fig


def stage_figures(phases: pd.DataFrame) -> dict[str, object]:
    """One :func:`stage_figure` per architecture (model, dataset) with both sources, named
    ``stages_<model>_<dataset>`` (for the report and as MLflow artifacts)."""
    return {f"stages_{p['model']}_{p['dataset']}": stage_figure(phases, p["model"], p["dataset"], p["layerwise"],
                                                                 p["end_to_end"])
            for p in stage_pairs(phases)}


# Which arm of a per-stage claim record is the layerwise one and which the end-to-end one.
_ROLES = {"saturation": ("b", "a"), "early_overfit": ("a", "b")}


def record_stage_figure(rec: dict, phases: pd.DataFrame):
    """The per-stage figure of a checked saturation / early_overfit claim record of
    results/claims.json (its MLflow artifact); None for other kinds or claims not run."""
    roles = _ROLES.get(rec["kind"])
    if roles is None or rec.get("status") != "run":
        return None
    lw, e2e = (rec["arms"][r] for r in roles)
    return stage_figure(phases, lw["model"], rec["dataset"], lw["experiment"], e2e["experiment"])


def stage_means(phases: pd.DataFrame, pair: dict) -> pd.DataFrame:
    """Per stage of one architecture: mean (over seeds) test accuracy and train - test gap of the
    layerwise heads and of the end-to-end probes."""
    t = stage_table(phases)
    cols = {}
    for key, source in (("layerwise", "layerwise"), ("end_to_end", "probe")):
        g = _arm(t, {"experiment": pair[key], "model": pair["model"]}, pair["dataset"], source).groupby("stage")
        name = "layerwise head" if source == "layerwise" else "end-to-end probe"
        cols[f"{name}: test acc"] = g.test_acc.mean()
        cols[f"{name}: train - test"] = g.gap.mean()
        cols[f"{name}: n"] = g.seed.nunique()
    df = pd.DataFrame(cols).rename_axis("stage").reset_index()
    counts = ["stage"] + [c for c in df if c.endswith(": n")]
    df[counts] = df[counts].astype("Int64").astype(str)  # counts stay integers in the rendered table
    return df


def report_section(doc, results) -> None:
    """Report section "Per-stage analysis (P2, P3)": per architecture, a table of the per-stage
    means and :func:`stage_figure`. ``doc`` is l2l.report's Doc; reads results/phases.csv."""
    path = results / "phases.csv"
    phases = pd.read_csv(path) if path.exists() else pd.DataFrame()
    pairs = stage_pairs(phases) if not phases.empty else []
    if not pairs:
        return
    doc.h(2, "Per-stage analysis (P2, P3)")
    doc.p("Stage s = the network up to its s-th stage (P3 block, VGG pooling block, ResNet residual stage). "
          "Layerwise: the test and train accuracy of the auxiliary head trained with stage s. End-to-end: a linear "
          "probe (2x2 average pool, standardised, linear) on the frozen stage-s features of the network trained "
          "whole. Train accuracy on the un-augmented training split; means over seeds, in %.")
    for pair in pairs:
        doc.h(3, f"{pair['model']} on {pair['dataset']} ({pair['layerwise']} vs {pair['end_to_end']})")
        doc.table(stage_means(phases, pair))
        doc.figure(f"stages_{pair['model']}_{pair['dataset']}",
                   stage_figure(phases, pair["model"], pair["dataset"], pair["layerwise"], pair["end_to_end"]),
                   f"{pair['model']} on {pair['dataset']}: test accuracy and train - test gap by stage, layerwise "
                   "heads vs end-to-end linear probes (star: the end-to-end network); mean across seeds, band = 95% "
                   "t-interval")

"""P2's per-unit measures, from results/phases.csv alone (pure functions over a DataFrame).

Input: the phases table (columns run, experiment, method, model, dataset, seed, phase, metric,
value) that the aggregate stage writes. Two sources of per-stage accuracy live in it:

- layerwise runs (method ``layerwise``): phase ``<unit>{s}`` (and ``<unit>{s}_pruned`` after
  pruning, which then supersedes it), metrics ``head_train_acc`` / ``head_test_acc`` of the
  unit's own auxiliary head;
- probes (option ``probe_epochs`` > 0) of end-to-end runs (method ``conventional``, phase
  ``end_to_end``, with ``model_test_acc``: the network's own classifier) and of layerwise runs
  (their last phase): metrics ``<unit>{s}_probe_train_acc`` / ``<unit>{s}_probe_test_acc`` of a
  linear probe on the frozen unit-s features.

The unit (column ``unit``) is ``stage`` or ``layer`` (l2l.models.UNITS); units are numbered from 1
(unit s = the network up to its s-th unit); a claim's ``unit`` field (default stage) picks one. Train accuracies are on
the un-augmented training split; all accuracies in %. Every measure is returned per seed
(``{seed: value}``), so that :mod:`l2l.stats` can test it with runs paired by seed.

Measures:

- critical unit (:func:`critical_stage`): the first unit within ``threshold`` points of the
  full-depth test accuracy (= S when the last unit still gains that much), per seed,
  with a distribution-free interval for its median over seeds (:func:`l2l.stats.median_interval`);
- gap at full depth: end-to-end test accuracy minus the layerwise last head's;
- early-unit generalisation gap: train minus test accuracy, averaged over units
  1..``early_stages``, of probes on the layerwise-trained and on the end-to-end network (the same
  probe form and budget: like with like), and of the layerwise heads (descriptive).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from l2l import stats
from l2l.results import interval_shown, mean_interval

# = l2l.models.UNITS, not imported: the report stage reads results without loading the models
# (tests/test_layerwise.py checks that the two agree)
UNITS = ("stage", "layer")
STAGE_PHASE = re.compile(rf"^({'|'.join(UNITS)})(\d+)(_pruned)?$")
PROBE_METRIC = re.compile(rf"^({'|'.join(UNITS)})(\d+)_probe_(train|test)_acc$")
HEAD_METRIC = re.compile(r"^head_(train|test)_acc$")
KEYS = ["run", "experiment", "method", "model", "dataset", "seed"]


def stage_table(phases: pd.DataFrame) -> pd.DataFrame:
    """Tidy per-unit accuracies: one row per (run, source, unit, stage) with columns run, experiment,
    method, model, dataset, seed, source ("layerwise": the heads | "probe"), unit ("stage" |
    "layer"), stage (the unit's number), train_acc, test_acc, gap (train - test)."""
    cols = [*KEYS, "source", "unit", "stage", "train_acc", "test_acc", "gap"]
    phase = phases.phase.astype(str).str.extract(STAGE_PHASE.pattern)
    head = phases.metric.astype(str).str.extract(HEAD_METRIC.pattern)
    probe = phases.metric.astype(str).str.extract(PROBE_METRIC.pattern)
    is_head = phase[0].notna() & head[0].notna()
    lw = phases[is_head].assign(source="layerwise", unit=phase[0][is_head], stage=phase[1][is_head].astype(int),
                                split=head[0][is_head], pruned=phase[2][is_head].notna())
    # After pruning, the pruned stage's measure (stage{s}_pruned) supersedes the unpruned one.
    lw = lw.sort_values("pruned", kind="stable").drop_duplicates(["run", "unit", "stage", "split"], keep="last")
    is_probe = probe[0].notna()
    pr = phases[is_probe].assign(source="probe", unit=probe[0][is_probe], stage=probe[1][is_probe].astype(int),
                                 split=probe[2][is_probe])
    long = pd.concat([lw.drop(columns="pruned"), pr], ignore_index=True)
    if long.empty:
        return pd.DataFrame(columns=cols)
    wide = long.pivot_table(index=[*KEYS, "source", "unit", "stage"], columns="split", values="value",
                            aggfunc="first").reset_index()
    wide.columns.name = None
    for c in ("train_acc", "test_acc"):
        wide[c] = wide[c.split("_")[0]] if c.split("_")[0] in wide else np.nan
    wide["gap"] = wide["train_acc"] - wide["test_acc"]
    return wide.sort_values(["experiment", "model", "dataset", "seed", "source", "unit", "stage"])[cols].reset_index(
        drop=True)


def critical_stage(test_acc: Sequence[float], threshold: float) -> int:
    """The critical unit (1-based): the first unit within ``threshold`` points of the full-depth
    accuracy, i.e. the smallest s with acc[S] - acc[s] < threshold: all further units together add
    less than the threshold. Equals S = len(test_acc) when the last unit still gains at least
    ``threshold`` (acc[S] - acc[S-1] >= threshold).

    Why not "every further unit gains < threshold" (papers.md's wording; P2's own rule is not
    public): per layer the gains are small, so a curve rising 0.3 points a layer for ten layers
    would count as saturated at its first layer; this rule sees the 3 points. Why not "no later
    unit beats it by the threshold": the maximum over many later units is pushed up by seed noise
    (benchmarks/critical_layer_coverage.py), one difference to the full depth is not. A curve that
    falls at the end makes its early units critical: later units did not help."""
    if not len(test_acc):
        raise ValueError("critical_stage: no stages")
    acc = list(test_acc)
    return next(s for s in range(1, len(acc) + 1) if acc[-1] - acc[s - 1] < threshold)


def _arm(table: pd.DataFrame, arm: Mapping[str, str], dataset: str, source: str, unit: str = "stage"
         ) -> pd.DataFrame:
    t = table[(table.experiment == arm["experiment"]) & (table.model == arm["model"]) & (table.dataset == dataset)
              & (table.source == source) & (table.unit == unit)]
    return t.sort_values(["seed", "stage"])


def _by_seed(t: pd.DataFrame) -> dict[int, pd.DataFrame]:
    return {int(seed): g.sort_values("stage") for seed, g in t.groupby("seed")}


def _model_acc(phases: pd.DataFrame, arm: Mapping[str, str], dataset: str) -> dict[int, float]:
    t = phases[(phases.experiment == arm["experiment"]) & (phases.model == arm["model"])
               & (phases.dataset == dataset) & (phases.metric == "model_test_acc")]
    return {int(r.seed): float(r.value) for r in t.itertuples(index=False)}


def saturation(phases: pd.DataFrame, end_to_end: Mapping[str, str], layerwise: Mapping[str, str], dataset: str,
               threshold: float, unit: str = "stage", window: int = 1, level: float = 0.95) -> dict:
    """P2-C1 (layerwise accuracy saturates after a critical unit; end-to-end keeps a gap).

    end_to_end / layerwise: the claim's arms, ``{"experiment": ..., "model": ...}`` (the
    end-to-end run must have probes at ``unit``). threshold: points of test accuracy that the
    units after the critical one add less than; window: the last units whose gain the verdict
    tests (:func:`window_gain`); level: of the critical unit's interval.

    Returns, each per seed ``{seed: value}``:
      ``end_to_end_full``  end-to-end test accuracy at full depth (its own classifier);
      ``layerwise_full``   test accuracy of the layerwise last head (= the final network);
      ``gap_full``         end_to_end_full - layerwise_full (seeds in both arms);
      ``critical_stage``   critical unit of the layerwise heads' test accuracy curve;
      ``probe_critical_stage`` the same for the end-to-end probes' curve;
      ``window_gain``      layerwise test accuracy of the last unit minus that of ``window`` units before;
    and ``n_stages`` (S, the number of units; None if the arms disagree or are missing), ``unit``,
    ``window`` and ``critical_interval``: the median critical unit over seeds with its
    distribution-free interval (:func:`l2l.stats.median_interval`: ``median``, ``low``, ``high``,
    ``coverage`` guaranteed at these seeds, ``n``).
    """
    table = stage_table(phases)
    lw = _by_seed(_arm(table, layerwise, dataset, "layerwise", unit))
    pr = _by_seed(_arm(table, end_to_end, dataset, "probe", unit))
    e2e = _model_acc(phases, end_to_end, dataset)
    lw_full = {s: float(g.test_acc.iloc[-1]) for s, g in lw.items()}
    stages = {len(g) for g in lw.values()} | {len(g) for g in pr.values()}
    crit = {s: critical_stage(g.test_acc.tolist(), threshold) for s, g in lw.items()}
    median, low, high, coverage = stats.median_interval(list(crit.values()), level)
    return {
        "end_to_end_full": e2e,
        "layerwise_full": lw_full,
        "gap_full": {s: e2e[s] - lw_full[s] for s in sorted(set(e2e) & set(lw_full))},
        "critical_stage": crit,
        "probe_critical_stage": {s: critical_stage(g.test_acc.tolist(), threshold) for s, g in pr.items()},
        "window_gain": window_gain(lw, window),
        "critical_interval": {"median": median, "low": low, "high": high, "coverage": coverage, "n": len(crit)},
        "n_stages": stages.pop() if len(stages) == 1 else None,
        "unit": unit,
        "window": window,
    }


def early_overfit(phases: pd.DataFrame, layerwise: Mapping[str, str], end_to_end: Mapping[str, str], dataset: str,
                  early_stages: int | None = None, unit: str = "stage") -> dict:
    """P2-C2 (early layers of layerwise training overfit), like with like: linear probes of the
    same form and budget on the frozen units of the layerwise-trained network and of its
    end-to-end twin.

    layerwise / end_to_end: the claim's arms (``{"experiment", "model"}``, both with probes at
    ``unit``); early_stages: how many first units count as early (default: half of the units,
    at least 1).

    Returns per seed (train - test accuracy, in points, averaged over units 1..early_stages)
    ``layerwise_probe_gap`` (probes of the layerwise network), ``end_to_end_probe_gap`` (of the
    end-to-end one) and ``layerwise_head_gap`` (the layerwise heads, trained with their units:
    descriptive), plus ``early_stages`` used, ``n_stages`` and ``unit``. The claim holds when
    layerwise_probe_gap > end_to_end_probe_gap (superiority, paired by seed).
    """
    table = stage_table(phases)
    lw = _by_seed(_arm(table, layerwise, dataset, "probe", unit))
    pr = _by_seed(_arm(table, end_to_end, dataset, "probe", unit))
    heads = _by_seed(_arm(table, layerwise, dataset, "layerwise", unit))
    stages = {len(g) for g in lw.values()} | {len(g) for g in pr.values()}
    n = stages.pop() if len(stages) == 1 else None
    e = early_stages if early_stages is not None else max(1, (n or 2) // 2)

    def gap(groups):
        return {s: float(g[g.stage <= e].gap.mean()) for s, g in groups.items()}

    return {"layerwise_probe_gap": gap(lw), "end_to_end_probe_gap": gap(pr), "layerwise_head_gap": gap(heads),
            "early_stages": e, "n_stages": n, "unit": unit}


def _mean_curve(groups: dict[int, pd.DataFrame]) -> list[float]:
    """Test accuracy by unit, averaged over seeds."""
    t = pd.concat(groups.values())
    return t.groupby("stage").test_acc.mean().sort_index().tolist()


def window_gain(groups: dict[int, pd.DataFrame], window: int = 1) -> dict[int, float]:
    """Per seed: test accuracy of the last unit minus that of ``window`` units before (points)."""
    return {s: float(g.test_acc.iloc[-1] - g.test_acc.iloc[-1 - window]) for s, g in groups.items()
            if len(g) > window}


def _unit_fields(claim) -> tuple[str, int]:
    """The claim's ``unit`` (default stage) and ``window`` (default 1), checked."""
    unit, window = claim.extra.get("unit", "stage"), claim.extra.get("window", 1)
    if unit not in UNITS:
        raise ValueError(f"claims.yaml: {claim.id}.unit: expected one of {', '.join(UNITS)}, got {unit!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"claims.yaml: {claim.id}.window: expected a positive number of units, got {window!r}")
    return unit, window


# P2-C1's end-to-end side (a saturation record's ``end_to_end``): the thesis' abstract speaks of "the
# performance gap between the two training procedures" and of layerwise training saturating after a
# critical layer; papers.md's summary adds that end-to-end training of the same depth "keeps improving".
E2E_READINGS = ("gap", "keeps_improving")


def _e2e_reading(claim) -> str:
    reading = claim.extra.get("end_to_end", "gap")
    if reading not in E2E_READINGS:
        raise ValueError(f"claims.yaml: {claim.id}.end_to_end: expected one of {', '.join(E2E_READINGS)}, "
                         f"got {reading!r}")
    return reading


def probe_window_gain(phases: pd.DataFrame, end_to_end: Mapping[str, str], dataset: str, unit: str, window: int
                      ) -> tuple[dict[int, float], dict[int, float]]:
    """Per seed, the end-to-end network's linear-probe test accuracy at its last unit and ``window``
    units before: (last, before)."""
    groups = _by_seed(_arm(stage_table(phases), end_to_end, dataset, "probe", unit))
    keep = {s: g for s, g in groups.items() if len(g) > window}
    return ({s: float(g.test_acc.iloc[-1]) for s, g in keep.items()},
            {s: float(g.test_acc.iloc[-1 - window]) for s, g in keep.items()})


def saturation_check(claim, ctx) -> tuple:
    """The ``saturation`` claim kind for :mod:`l2l.claims` (a CustomKind): (Comparison, extra).

    claim: arms a = end-to-end (with probes), b = layerwise; ``threshold`` (points); ``unit``
    (stage | layer, default stage); ``window`` (units, default 1); ``min_effect`` (points, effect
    of interest). ctx: ``phases``, ``alpha``. The comparison is :func:`l2l.stats.compare_saturation`:
    paired superiority end_to_end_full > layerwise_full AND a paired one-sided test that the
    layerwise gain over the last ``window`` units (per seed) is below ``threshold``, so a curve
    that keeps improving contradicts the claim. With ``end_to_end: keeps_improving`` (the other
    reading of P2's end-to-end side) a third part joins them: the end-to-end network's linear probes
    gain over the same last units (paired superiority of the last unit's probe over the probe
    ``window`` units before, min_effect ``threshold``: contradicted when that gain is shown below the
    threshold); the rule's power (l2l.stats.rule_power) still counts the first two parts only. extra:
    the per-seed measures of :func:`saturation` (with the critical unit's interval at 1 - alpha),
    ``mean_curve`` (layerwise test accuracy by unit, descriptive), ``critical_stage_of_mean`` and
    ``end_to_end`` (the reading; with keeps_improving, ``end_to_end_probe_window_gain`` per seed).
    """
    threshold = claim.extra.get("threshold")
    if not isinstance(threshold, (int, float)) or threshold <= 0:
        raise ValueError(f"claims.yaml: {claim.id}.threshold: expected a positive number, got {threshold!r}")
    unit, window = _unit_fields(claim)
    reading = _e2e_reading(claim)
    e2e, lw = (claim.arm(n) for n in ("a", "b"))
    lw_arm = {"experiment": lw.experiment, "model": lw.model}
    e2e_arm = {"experiment": e2e.experiment, "model": e2e.model}
    r = saturation(ctx.phases, e2e_arm, lw_arm, claim.dataset, float(threshold), unit, window, 1 - ctx.alpha)
    extra: dict = {"end_to_end": reading}
    probe_gain = None
    if reading == "keeps_improving":
        last, before = probe_window_gain(ctx.phases, e2e_arm, claim.dataset, unit, window)
        probe_gain = {s: last[s] - before[s] for s in last if s in before}
        extra["end_to_end_probe_window_gain"] = probe_gain
    comp = stats.compare_saturation(r["end_to_end_full"], r["layerwise_full"], r["window_gain"],
                                    threshold=float(threshold), min_effect=claim.min_effect, alpha=ctx.alpha,
                                    probe_gain=probe_gain)
    groups = _by_seed(_arm(stage_table(ctx.phases), lw_arm, claim.dataset, "layerwise", unit))
    curve = _mean_curve(groups) if groups else []
    crit = critical_stage(curve, float(threshold)) if curve else None
    return comp, {**r, "mean_curve": curve, "critical_stage_of_mean": crit, **extra}


def early_overfit_check(claim, ctx) -> tuple:
    """The ``early_overfit`` claim kind for :mod:`l2l.claims` (a CustomKind): (Comparison, extra).

    claim: arms a = layerwise, b = end-to-end (both with probes at the same budget); ``unit``;
    ``early_stages`` (null = half the units); ``min_effect``. The comparison is the paired
    superiority layerwise_probe_gap > end_to_end_probe_gap (train - test points over the early
    units, probe vs probe). extra: the measures of :func:`early_overfit`.
    """
    unit, _ = _unit_fields(claim)
    lw, e2e = (claim.arm(n) for n in ("a", "b"))
    r = early_overfit(ctx.phases, {"experiment": lw.experiment, "model": lw.model},
                      {"experiment": e2e.experiment, "model": e2e.model}, claim.dataset,
                      claim.extra.get("early_stages"), unit)
    comp = stats.compare_superiority(r["layerwise_probe_gap"], r["end_to_end_probe_gap"], alpha=ctx.alpha,
                                     min_effect=claim.min_effect)
    return comp, r


def stage_pairs(phases: pd.DataFrame) -> list[dict]:
    """Every (model, dataset, unit) that has both layerwise heads and end-to-end probes, with the
    experiments that hold them: [{"model", "dataset", "unit", "layerwise", "end_to_end"}]."""
    t = stage_table(phases)
    out = []
    for (model, dataset, unit), g in t.groupby(["model", "dataset", "unit"], sort=True):
        lw = sorted(g[g.source == "layerwise"].experiment.unique())
        pr = sorted(g[(g.source == "probe") & (g.method != "layerwise")].experiment.unique())
        out += [{"model": model, "dataset": dataset, "unit": unit, "layerwise": a, "end_to_end": b}
                for a in lw for b in pr]
    return out


def _band(values: pd.Series) -> tuple[float, float, float]:
    mean, _, lo, hi = mean_interval(values)
    return mean, lo, hi


def _series(layerwise: str, end_to_end: str) -> tuple:
    """(experiment, source, label) of a pair's curves: the heads, the layerwise network's probes
    (P2-C2's arm, when it has them) and the end-to-end probes."""
    return ((layerwise, "layerwise", "layerwise head"), (layerwise, "probe", "layerwise, linear probe"),
            (end_to_end, "probe", "end-to-end, linear probe"))


def stage_figure(phases: pd.DataFrame, model: str, dataset: str, layerwise: str = "layerwise",
                 end_to_end: str = "layerwise_e2e", unit: str = "stage"):
    """Per-unit curves of one architecture: test accuracy by unit (layerwise heads, probes of the
    layerwise network and of the end-to-end one, with the end-to-end network's own accuracy at
    full depth) and the train - test gap by unit; mean across seeds, band = 95% t-interval.
    Returns a Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = stage_table(phases)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    s_max = 0
    for experiment, source, label in _series(layerwise, end_to_end):
        t = _arm(table, {"experiment": experiment, "model": model}, dataset, source, unit)
        if t.empty:
            continue
        n, s_max = t.seed.nunique(), max(s_max, int(t.stage.max()))
        for ax, metric in zip(axes, ("test_acc", "gap")):
            stats = pd.DataFrame([(s, *_band(g[metric])) for s, g in t.groupby("stage")],
                                 columns=["stage", "mean", "lo", "hi"])
            line, = ax.plot(stats.stage, stats["mean"], marker="o", label=f"{label} (n={n})")
            if interval_shown(n, stats.lo.min(), stats.hi.max(), (0, 100) if metric == "test_acc" else (-100, 100)):
                ax.fill_between(stats.stage, stats.lo, stats.hi, alpha=0.2, color=line.get_color())
    full = _model_acc(phases, {"experiment": end_to_end, "model": model}, dataset)
    if full and s_max:
        axes[0].errorbar([s_max], [np.mean(list(full.values()))], fmt="k*", markersize=10,
                         label="end-to-end network")
    for ax, title in zip(axes, ("test accuracy (%)", "train - test accuracy (points)")):
        ax.set_xlabel(unit)
        ax.set_title(f"{model} on {dataset}: {title}")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    return fig


def figure_name(pair: dict) -> str:
    """``stages_<model>_<dataset>`` (per stage) or ``layers_<model>_<dataset>`` (per layer)."""
    return f"{pair['unit']}s_{pair['model']}_{pair['dataset']}"


def stage_figures(phases: pd.DataFrame) -> dict[str, object]:
    """One :func:`stage_figure` per architecture and unit (model, dataset, unit) with both sources,
    named by :func:`figure_name` (for the report and as MLflow artifacts)."""
    return {figure_name(p): stage_figure(phases, p["model"], p["dataset"], p["layerwise"], p["end_to_end"], p["unit"])
            for p in stage_pairs(phases)}


# Which arm of a per-stage claim record is the layerwise one and which the end-to-end one.
_ROLES = {"saturation": ("b", "a"), "early_overfit": ("a", "b")}


def record_stage_figure(rec: dict, phases: pd.DataFrame):
    """The per-unit figure of a checked saturation / early_overfit claim record of
    results/claims.json (its MLflow artifact); None for other kinds or claims not run."""
    roles = _ROLES.get(rec["kind"])
    if roles is None or rec.get("status") != "run":
        return None
    lw, e2e = (rec["arms"][r] for r in roles)
    return stage_figure(phases, lw["model"], rec["dataset"], lw["experiment"], e2e["experiment"],
                        rec.get("unit", "stage"))


def stage_means(phases: pd.DataFrame, pair: dict) -> pd.DataFrame:
    """Per unit of one architecture: mean (over seeds) test accuracy and train - test gap of the
    layerwise heads, of the layerwise network's probes (if any) and of the end-to-end probes."""
    t = stage_table(phases)
    unit = pair.get("unit", "stage")
    cols = {}
    for experiment, source, label in _series(pair["layerwise"], pair["end_to_end"]):
        a = _arm(t, {"experiment": experiment, "model": pair["model"]}, pair["dataset"], source, unit)
        if a.empty:
            continue
        g = a.groupby("stage")
        cols[f"{label}: test acc"] = g.test_acc.mean()
        cols[f"{label}: train - test"] = g.gap.mean()
        cols[f"{label}: n"] = g.seed.nunique()
    df = pd.DataFrame(cols).rename_axis(unit).reset_index()
    counts = [unit] + [c for c in df if c.endswith(": n")]
    df[counts] = df[counts].astype("Int64").astype(str)  # counts stay integers in the rendered table
    return df


def critical_text(phases: pd.DataFrame, pair: dict, threshold: float, level: float) -> str:
    """One sentence: the layerwise critical unit of a pair, median over seeds and its interval."""
    t = _by_seed(_arm(stage_table(phases), {"experiment": pair["layerwise"], "model": pair["model"]},
                      pair["dataset"], "layerwise", pair["unit"]))
    per_seed = [critical_stage(g.test_acc.tolist(), threshold) for g in t.values()]
    if not per_seed:
        return ""
    median, low, high, coverage = stats.median_interval(per_seed, level)
    return (f"Critical {pair['unit']} (the first within {threshold:g} points of the full depth's test accuracy): "
            f"median {median:g} over {len(per_seed)} seeds, interval [{low:g}, {high:g}] (order statistics, "
            f"coverage >= {100 * coverage:.1f}% at {len(per_seed)} seeds; per seed: "
            f"{', '.join(str(c) for c in per_seed)}).")


def report_section(doc, results, threshold: float = 0.5, level: float = 0.95) -> None:
    """Report section "Per-stage analysis (P2, P3)": per architecture and unit, a table of the
    per-unit means, the critical unit with its interval (``threshold``: P2-C1's, points) and
    :func:`stage_figure`. ``doc`` is l2l.report's Doc; reads results/phases.csv."""
    path = results / "phases.csv"
    phases = pd.read_csv(path) if path.exists() else pd.DataFrame()
    pairs = stage_pairs(phases) if not phases.empty else []
    if not pairs:
        return
    doc.h(2, "Per-stage analysis (P2, P3)")
    doc.p("Unit s = the network up to its s-th stage (P3 block, VGG pooling block, ResNet residual stage) or, per "
          "layer, its s-th conv layer (VGG) / residual block (ResNet). Layerwise head: the test and train accuracy "
          "of the auxiliary head trained with unit s. Linear probe (2x2 average pool, standardised, linear, the "
          "same budget for both networks) on the frozen unit-s features of the layerwise-trained network and of "
          "the network trained whole. Train accuracy on the un-augmented training split; means over seeds, in %.")
    for pair in pairs:
        doc.h(3, f"{pair['model']} on {pair['dataset']}, per {pair['unit']} "
                 f"({pair['layerwise']} vs {pair['end_to_end']})")
        doc.table(stage_means(phases, pair))
        text = critical_text(phases, pair, threshold, level)
        if text:
            doc.p(text)
        doc.figure(figure_name(pair),
                   stage_figure(phases, pair["model"], pair["dataset"], pair["layerwise"], pair["end_to_end"],
                                pair["unit"]),
                   f"{pair['model']} on {pair['dataset']}: test accuracy and train - test gap by {pair['unit']}, "
                   "layerwise heads and linear probes (star: the end-to-end network); mean across seeds, band = 95% "
                   "t-interval")

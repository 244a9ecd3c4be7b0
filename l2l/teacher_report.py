"""Report section and figures of the teacher-student experiments (P4 generations, P5 distillation).

Inputs are the aggregate stage's tables:
- phases_df: results/phases.csv, long format (run, experiment, method, model, dataset, seed,
  phase, metric, value). The generations method writes phases gen0..genG with final_test_acc,
  ensemble_final_test_acc, confidence, entropy, ...; distill writes phase "student"
  (final_test_acc, params, flops, latency_<dtype>_b<N>_ms, the same of its teacher run's model
  prefixed teacher_ (teacher_final_test_acc measured in the student run) and the *_ratio* metrics).
- runs_df: results/runs.csv (one row per run: experiment, method, model, dataset, seed,
  final_test_acc, device_name, ...), for the no-distillation baselines (conventional runs of the
  distilled students' models) and the device stamp.
Means over seeds come with 95% t-intervals (l2l.results.mean_interval); latencies are the
median over seeds of each run's median.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from l2l.report import Doc, format_interval  # noqa: E402
from l2l.results import interval_shown, mean_interval  # noqa: E402

GEN = re.compile(r"gen(\d+)$")
LATENCY = re.compile(r"latency_(?!eager_)(\w+?)_b(\d+)_ms$")  # the latency_mode's figures (eager ones: descriptive)


def _wide(phases_df: pd.DataFrame, method: str) -> pd.DataFrame:
    """One row per (run, phase) of `method`, one column per metric."""
    df = phases_df[phases_df["method"] == method]
    keys = ["run", "experiment", "model", "dataset", "seed", "phase"]
    return df.pivot_table(index=keys, columns="metric", values="value", aggfunc="first").reset_index()


def generation_table(phases_df: pd.DataFrame) -> pd.DataFrame:
    """Per experiment, model, dataset and generation: n seeds, test accuracy (mean and 95% CI),
    ensemble accuracy, the KD weight it learnt with (none for the patriarch), the generation's mean
    top-1 confidence and entropy (means)."""
    w = _wide(phases_df, "generations")
    if w.empty:
        return pd.DataFrame()
    w["generation"] = w["phase"].str.extract(GEN, expand=False).astype(int)
    rows = []
    for (exp, model, ds, g), grp in w.groupby(["experiment", "model", "dataset", "generation"], sort=True):
        acc, _, lo, hi = mean_interval(grp["final_test_acc"])
        ens, _, elo, ehi = mean_interval(grp["ensemble_final_test_acc"])
        rows.append({"experiment": exp, "model": model, "dataset": ds, "generation": g, "n": len(grp),
                     "test_acc": acc, "test_acc_low": lo, "test_acc_high": hi, "ensemble_test_acc": ens,
                     "ensemble_low": elo, "ensemble_high": ehi,
                     "kd_weight": grp["kd_weight"].mean() if "kd_weight" in grp else float("nan"),
                     "confidence": grp["confidence"].mean(),
                     "entropy": grp["entropy"].mean()})
    return pd.DataFrame(rows)


def generation_figure(phases_df: pd.DataFrame) -> Figure:
    """Per generation: test accuracy (solid, 95% CI band) and the ensemble of generations 0..m
    (dashed); mean top-1 confidence; entropy of the outputs. One line per experiment (teacher loss)."""
    t = generation_table(phases_df)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (exp, model, ds), g in t.groupby(["experiment", "model", "dataset"], sort=False):
        label = f"{exp} ({model}, {ds}, n={g['n'].min()})"
        line, = axes[0].plot(g["generation"], g["test_acc"], marker="o", label=label)
        color = line.get_color()
        if interval_shown(g["n"].min(), g["test_acc_low"].min(), g["test_acc_high"].max(), (0, 100)):
            axes[0].fill_between(g["generation"], g["test_acc_low"], g["test_acc_high"], alpha=0.2, color=color)
        axes[0].plot(g["generation"], g["ensemble_test_acc"], ls="--", marker="x", color=color)
        axes[1].plot(g["generation"], g["confidence"], marker="o", color=color)
        axes[2].plot(g["generation"], g["entropy"], marker="o", color=color)
    titles = ("test accuracy (%) (dashed: ensemble of gens 0..m)", "mean top-1 confidence (train images)",
              "mean entropy of the outputs, nats (train images)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("generation")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if not t.empty:
            ax.set_xticks(sorted(t["generation"].unique()))
    if not t.empty:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def distill_table(runs_df: pd.DataFrame, phases_df: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and model: the teacher, each distilled student and its no-distillation
    baseline with n, the test metric (mean, 95% CI; column metric: accuracy, or mAP on VOC), params,
    FLOPs per image and latency per batch size (median over seeds; columns latency_<dtype>_b<N>_ms)."""
    w = _wide(phases_df, "distill")
    if w.empty:
        return pd.DataFrame()
    student = w[w["phase"] == "student"]
    lat = sorted((c for c in student.columns if LATENCY.match(c)), key=lambda c: int(LATENCY.match(c).group(2)))
    rows = []
    metrics = dict(zip(runs_df["dataset"], runs_df["metric"])) if "metric" in runs_df else {}

    def row(role: str, model: str, ds: str, acc: pd.Series, costs: pd.DataFrame, prefix: str = "") -> dict:
        m, _, lo, hi = mean_interval(acc)
        return {"dataset": ds, "model": model, "role": role, "n": int(acc.notna().sum()),
                "metric": metrics.get(ds, "top-1 accuracy (%)"), "test_acc": m,
                "test_acc_low": lo, "test_acc_high": hi, "params": costs[prefix + "params"].median(),
                "flops": costs[prefix + "flops"].median(), **{c: costs[prefix + c].median() for c in lat}}

    for ds, s_ds in student.groupby("dataset"):
        per_seed = s_ds.groupby("seed")["teacher_final_test_acc"].mean()  # one teacher run per seed, in every student run
        rows.append(row("teacher", "teacher (options.teacher)", ds, per_seed, s_ds, "teacher_"))
        for (exp, model), s in s_ds.groupby(["experiment", "model"]):
            rows.append(row(f"KD student ({exp})", model, ds, s["final_test_acc"], s))
            base = runs_df[(runs_df["method"] == "conventional") & (runs_df["model"] == model)
                           & (runs_df["dataset"] == ds)]
            if len(base):
                rows.append(row("no-KD baseline", model, ds, base["final_test_acc"], s))
    return pd.DataFrame(rows)


def accuracy_latency_figure(runs_df: pd.DataFrame, phases_df: pd.DataFrame) -> Figure:
    """Test metric (mean, 95% CI) against latency (log scale), one row of panels per dataset (its
    metric: accuracy or mAP) and one panel per measured batch size: the teacher (square), the
    distilled students (filled) and their baselines (hollow)."""
    t = distill_table(runs_df, phases_df)
    lat = [c for c in t.columns if LATENCY.match(c)]
    datasets = list(t["dataset"].unique()) if not t.empty else []
    nr, nc = max(1, len(datasets)), max(1, len(lat))
    fig, axes = plt.subplots(nr, nc, figsize=(5.5 * nc, 4 * nr), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {m: cycle[i % len(cycle)] for i, m in enumerate(t["model"].unique())} if not t.empty else {}
    for row_axes, ds in zip(axes, datasets):
        for ax, col in zip(row_axes, lat):
            for _, r in t[t["dataset"] == ds].iterrows():
                teacher, baseline = r["role"] == "teacher", r["role"] == "no-KD baseline"
                shown = interval_shown(r["n"], r["test_acc_low"], r["test_acc_high"], (0, 100))
                err = [[r["test_acc"] - r["test_acc_low"]], [r["test_acc_high"] - r["test_acc"]]] if shown else None
                color = "k" if teacher else colors[r["model"]]  # a student and its baseline share a colour
                ax.errorbar(r[col], r["test_acc"], yerr=err, fmt="s" if teacher else "o", capsize=3, color=color,
                            mfc="none" if baseline else color, label=f"{r['model']}: {r['role']} ({r['dataset']})")
            dtype, batch = LATENCY.match(col).groups()
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor log ticks' labels collide
            ax.set_xlabel(f"latency, batch {batch}, {dtype} (ms, median)")
            ax.set_ylabel(f"{ds}: test {t.loc[t['dataset'] == ds, 'metric'].iloc[0]}")
            ax.grid(alpha=0.3, which="both")
    if lat:
        for row_axes in axes:
            row_axes[-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def _fmt_table(t: pd.DataFrame, keys: list[str], extra: dict[str, str]) -> pd.DataFrame:
    out = t[keys].copy()
    out["test (95% CI)"] = [format_interval(*v) for v in t[["test_acc", "test_acc_low", "test_acc_high", "n"]].itertuples(
        index=False)]
    for col, name in extra.items():
        out[name] = t[col]
    return out


def teacher_student_section(doc: Doc, results: Path) -> None:
    """The P4 / P5 section of the report (nothing when no such runs exist); for report.build's
    extra_sections."""
    phases_path = results / "phases.csv"
    if not phases_path.exists() or phases_path.stat().st_size == 0:
        return
    phases_df, runs_df = pd.read_csv(phases_path), pd.read_csv(results / "runs.csv")
    gens, dist = generation_table(phases_df), distill_table(runs_df, phases_df)
    if gens.empty and dist.empty:
        return
    doc.h(2, "Teacher-student training (P4, P5)")
    if not gens.empty:
        doc.h(3, "P4: training in generations")
        doc.p("Per generation: test accuracy of that generation after its last epoch, the accuracy of the "
              "ensemble (mean softmax) of generations 0..m, and how tolerant the generation is as the next "
              "one's teacher: its mean top-1 softmax probability and mean entropy on the training images.")
        doc.table(_fmt_table(gens, ["experiment", "model", "dataset", "generation", "n"],
                             {"ensemble_test_acc": "ensemble acc (mean)", "kd_weight": "KD weight",
                              "confidence": "top-1 confidence",
                              "entropy": "entropy (nats)"}))
        doc.figure("p4_generations", generation_figure(phases_df),
                   "P4: accuracy, confidence and entropy per generation (mean over seeds; band: 95% t-interval)")
    if not dist.empty:
        doc.h(3, "P5: distillation into wide and narrow-deep students")
        devices = runs_df.loc[runs_df["method"] == "distill", "device_name"].dropna().unique()
        lat = [c for c in dist.columns if LATENCY.match(c)]
        doc.p("Latency: one forward pass at the batch size shown, on " + (", ".join(devices) or "the run's device")
              + ", in the dtype named in the column, median of repeated synchronised timings after warm-up "
              "(l2l/profiling.py); FLOPs per image by torch.utils.flop_counter (2 per multiply-add of "
              "convolutions and linear layers). Baselines: the same students trained without distillation.")
        dist = dist.assign(params=dist["params"].round().astype("Int64"), mflops=dist["flops"] / 1e6)
        doc.table(_fmt_table(dist, ["dataset", "metric", "model", "role", "n"],
                             {"params": "params", "mflops": "MFLOPs / image", **{c: c.replace("_", " ") for c in lat}}))
        doc.figure("p5_accuracy_latency", accuracy_latency_figure(runs_df, phases_df),
                   "P5: test metric against latency, per dataset (teacher: square; distilled: filled; "
                   "no-KD baseline: hollow)")

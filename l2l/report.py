"""The report: built from results/ alone (never retrains), as Markdown and self-contained HTML.

Both renderings come from one list of blocks, so they cannot drift apart.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from l2l.io import read_json, write_text  # noqa: E402
from l2l.results import ACCURACY_RANGE, FEWEST_SEEDS_FOR_INTERVAL, interval_shown  # noqa: E402
from l2l.tracking import git_state  # noqa: E402


@dataclass
class Doc:
    """Blocks: ("h", level, text), ("p", text), ("table", df), ("figure", name, caption). Text may hold the
    little Markdown the report writes (`code`, **bold**, "- " bullet lines); html() renders it."""
    blocks: list[tuple] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)
    svgs: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def figure(self, name: str, fig, caption: str, svg: bool = False) -> None:
        """The figure as PNG (embedded in the HTML) in figures/; svg: the report's headline figure, as PNG
        and SVG beside the report instead (dvc.yaml's plots show it first)."""
        fig.tight_layout()  # cheaper than bbox_inches="tight", which draws every figure twice
        for fmt, store in (("png", self.figures), ("svg", self.svgs))[:1 + svg]:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=100)
            store[name] = buf.getvalue()
        plt.close(fig)
        self.blocks.append(("figure", name, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append(_md_table(b[1]))
            elif b[0] == "figure":
                beside = b[1] in self.svgs
                svg = f" ([SVG]({b[1]}.svg))" if beside else ""
                out.append(f"![{b[2]}]({'' if beside else 'figures/'}{b[1]}.png)\n\n*{b[2]}*{svg}")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               f"<style>{CSS}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(_block_html(b[1]))
            elif b[0] == "table":
                out.append(_html_table(b[1]))
            elif b[0] == "figure":
                data = base64.b64encode(self.figures[b[1]]).decode()
                out.append(f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{_inline(b[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


CSS = ("body{font-family:sans-serif;max-width:80em;margin:2em auto;padding:0 1em;line-height:1.4}"
       "table{border-collapse:collapse;font-size:90%;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 6px;"
       "vertical-align:top;text-align:left}th{background:#eee}img{max-width:100%}figcaption{font-style:italic}"
       "code{background:#f3f3f3;padding:0 2px}td.supported{background:#dff0d8}td.contradicted{background:#f2dede}"
       "td.inconclusive{background:#f5f5f5}")


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** rendered (code first: nothing inside it is bold)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else _bold(p) for i, p in enumerate(parts))


def _bold(text: str) -> str:
    parts = text.split("**")
    if len(parts) % 2 == 0:  # an unpaired ** stays as it is
        return text
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def _block_html(text: str) -> str:
    """A paragraph, or a bullet list when every line starts with "- "."""
    lines = text.split("\n")
    if all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return "<p>" + "<br>".join(_inline(line) for line in lines) + "</p>"


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{_inline(str(c))}</th>" for c in df.columns)
    rows = []
    for _, row in df.iterrows():
        cells = []
        for c in df.columns:
            v = _fmt(row[c])
            cls = next((k for k in ("supported", "contradicted", "inconclusive") if c == "verdict"
                        and v.startswith(k)), "")
            cells.append(f"<td class='{cls}'>{_inline(v)}</td>" if cls else f"<td>{_inline(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _fmt(v) -> str:
    """A table cell: floats to 4 significant digits (tables from other sections may hold raw means)."""
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def decimals(halfwidth) -> int:
    """Decimals that the seeds support: two significant digits of the interval's half-width, the
    estimate to the same place (0 to 2 decimals; 1 when there is no interval)."""
    if halfwidth is None or not math.isfinite(halfwidth) or halfwidth <= 0:
        return 1
    return int(min(2, max(0, 1 - math.floor(math.log10(halfwidth)))))


def rounded(v: float, d: int, signed: bool = False) -> str:
    """v to d decimals, with no "-0" (a difference that rounds to zero has no sign)."""
    v = 0.0 if round(v, d) == 0 else v
    return f"{v:{'+' if signed and v else ''}.{d}f}"


def format_interval(mean, lo, hi, n=None, limits=ACCURACY_RANGE, signed: bool = False) -> str:
    """ "mean [lo, hi]" rounded to what the interval supports; "mean (interval too wide, n=2)" when it
    is not shown (results.interval_shown: under 3 seeds, or reaching values the metric cannot take)."""
    if mean is None or pd.isna(mean):
        return "n/a"
    if lo is None or pd.isna(lo):
        return rounded(mean, 1, signed) + (f" (n={n})" if n else "")
    d = decimals((hi - lo) / 2)
    if not interval_shown(n, lo, hi, limits):
        return rounded(mean, d, signed) + " (interval too wide" + (f", n={n})" if n else ")")
    return f"{rounded(mean, d, signed)} [{rounded(lo, d)}, {rounded(hi, d)}]"


def stamp(results: Path) -> dict[str, str]:
    runs = pd.read_csv(results / "runs.csv")
    data = read_json(results / "data.json")
    lock = Path("dvc.lock")
    commit, changed = git_state()
    return {
        "profile": data["profile"],
        "device": ", ".join(sorted(set(f"{d} ({n})" for d, n in zip(runs["device"], runs["device_name"])))),
        "torch / CUDA": ", ".join(sorted(set(f"{t} / {c}" for t, c in zip(runs["torch"], runs["cuda"])))),
        "git commit": commit + ("-dirty" if changed else ""),
        # what makes it -dirty: tracked code changed from the commit (not what dvc exp run writes: git_state)
        "code changed from the commit": ", ".join(changed) or "none",
        "dvc.lock sha256": hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.exists() else "none",
        "runs": str(len(runs)),
        "bit-reproducible": _reproducibility(runs),
        "TF32 (train.tf32)": tf32_note(runs),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **{f"data: {ds}": f"{d['source']['kind']} ({_source_paths(d['source'])}); {d['split_note']}"
           for ds, d in data["datasets"].items()},
    }


def _reproducibility(runs: pd.DataFrame) -> str:
    """CUDA kernels sum in varying order unless train.deterministic is on (l2l/compiling.py)."""
    if not (runs["device"] == "cuda").any():
        return "yes (CPU runs: the same seed gives the same numbers)"
    det = runs["deterministic"] if "deterministic" in runs else pd.Series(False, index=runs.index)
    n = int(((runs["device"] == "cuda") & ~det.fillna(False).astype(bool)).sum())
    return (f"no: {n} CUDA runs trained with train.deterministic false (cuDNN autotuning, atomic-add kernels): the "
            "same seed or a resumed run differs in the last bits" if n
            else "deterministic kernels requested on CUDA (train.deterministic; ops without one warn)")


def tf32_note(runs: pd.DataFrame) -> str:
    """What fp32 convolutions and matmuls ran in on CUDA (train.tf32, l2l/compiling.py); CPU kernels never use TF32."""
    cuda = runs["device"] == "cuda"
    if not cuda.any():
        return "not used (CPU runs compute fp32 in IEEE fp32)"
    if "tf32" not in runs or runs.loc[cuda, "tf32"].isna().any():
        return "unknown for runs trained before train.tf32 (torch's default then: TF32 convolutions on Ampere+)"
    n, on = int(cuda.sum()), int(runs.loc[cuda, "tf32"].astype(bool).sum())
    if not on:
        return f"off in all {n} CUDA runs: fp32 convolutions and matmuls in IEEE fp32 (bf16-autocast runs: bf16 anyway)"
    return (f"on in {on} of {n} CUDA runs: their fp32 convolutions and matmuls on TF32 tensor cores (10-bit mantissa "
            "products; bf16-autocast runs: bf16 anyway)")


TOP1 = "top-1 accuracy (%)"  # the metric of results written before runs.csv named it


def dataset_metrics(results: Path) -> dict[str, str]:
    """dataset -> the metric its *_acc columns hold (results/runs.csv column `metric`)."""
    runs = pd.read_csv(results / "runs.csv", usecols=lambda c: c in ("dataset", "metric"))
    if "metric" not in runs:
        return {ds: TOP1 for ds in runs["dataset"].unique()}
    return dict(zip(runs["dataset"], runs["metric"]))


def _source_paths(source: dict) -> str:
    """Where a dataset came from: its path, or its archives' (VOC has two)."""
    return source.get("path") or ", ".join(a["path"] for a in source.get("archives", []))


def images(n) -> str:
    return "?" if n is None or pd.isna(n) else f"{int(n):,}"


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    def interval(metric: str) -> list[str]:
        cols = [f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high", "n"]
        return [format_interval(m, lo, hi, int(n)) for m, lo, hi, n in summary[cols].itertuples(index=False)]

    return pd.DataFrame({
        "experiment": summary["experiment"], "method": summary["method"], "model": summary["model"],
        "dataset": summary["dataset"], "n": summary["n"],
        "metric": summary["metric"] if "metric" in summary else TOP1,
        # which images each group saw: split.val_size 0 joins the validation images to training
        "train / val images": [f"{images(t)} / {images(v)}" for t, v in
                               zip(summary.get("train_images", [math.nan] * len(summary)),
                                   summary.get("val_images", [math.nan] * len(summary)))],
        "test, last epoch [95% CI]": interval("final_test_acc"),
        "test, best-val epoch [95% CI]": interval("best_test_acc"),
        "val, last epoch [95% CI]": interval("final_val_acc"),
        "train s (mean)": [f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in summary["train_seconds_mean"]],
    })


CURVE_RANGES = {"train_loss": (0.0, math.inf), "val_acc": ACCURACY_RANGE}


CURVE_PANELS = (("train_loss", "training loss"), ("val_acc", "validation"))


def _curve_gap(df: pd.DataFrame, metric: str) -> str | None:
    """Why a group's curve of `metric` has nothing to show, or None: no finite value (no validation split),
    or one epoch (a single point is no curve)."""
    finite = int(df[f"{metric}_mean"].notna().sum())
    if finite == 0:
        return "no validation split (split.val_size 0)" if metric == "val_acc" else f"no {metric} recorded"
    return "one epoch (a single point is no curve)" if finite == 1 else None


def learning_curves(doc: Doc, results: Path) -> None:
    """Per model and dataset, the training-loss and validation panels of every group with a curve to show;
    a panel no group has a curve for is not drawn, nor a figure with no panel, and why is said once above
    the figures (one line per cause, naming the groups)."""
    files = sorted((results / "curves").glob("*.csv"))
    metrics = dataset_metrics(results)
    by_panel: dict[tuple[str, str], list[tuple[str, pd.DataFrame]]] = {}
    for f in files:
        experiment, model, dataset = f.stem.split("__")
        by_panel.setdefault((model, dataset), []).append((experiment, pd.read_csv(f)))
    gaps: dict[str, dict[str, list[str]]] = {}  # cause -> "experiment (model, dataset)" -> panels
    figures = []
    for (model, dataset), items in by_panel.items():
        drawn = {}
        for metric, title in CURVE_PANELS:
            shown = []
            for experiment, df in items:
                gap = _curve_gap(df, metric)
                if gap:
                    gaps.setdefault(gap, {}).setdefault(f"{experiment} ({model}, {dataset})", []).append(title)
                else:
                    shown.append((experiment, df))
            if shown:
                drawn[metric] = (title, shown)
        if drawn:
            figures.append((model, dataset, drawn))
    if gaps:
        doc.p("Not drawn, having nothing to show:")
        doc.p("\n".join(
            f"- {cause}: " + "; ".join(g if len(panels) == len(CURVE_PANELS) else f"{g} {', '.join(panels)}"
                                       for g, panels in groups.items()) for cause, groups in gaps.items()))
    for model, dataset, drawn in figures:
        fig, axes = plt.subplots(1, len(drawn), figsize=(5 * len(drawn), 3.6), squeeze=False)
        hidden = set()
        for ax, (metric, (title, shown)) in zip(axes[0], drawn.items()):
            for experiment, df in shown:
                n = int(df["n"].min())
                line, = ax.plot(df["epoch"], df[f"{metric}_mean"], marker="." if len(df) < 12 else None,
                                label=f"{experiment} (n={df['n'].max()})")
                lo, hi = df[f"{metric}_low"], df[f"{metric}_high"]
                if lo.notna().any() and interval_shown(n, lo.min(), hi.max(), CURVE_RANGES[metric]):
                    ax.fill_between(df["epoch"], lo, hi, alpha=0.2, color=line.get_color())
                elif lo.notna().any():
                    hidden.add(n)
            ax.set_xlabel("epoch (all phases in order)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(title if metric == "train_loss" else f"{title} {metrics.get(dataset, TOP1)}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        note = (f"; no band where it would be too wide to mean anything (n={', '.join(map(str, sorted(hidden)))} "
                f"seeds, under {FEWEST_SEEDS_FOR_INTERVAL}, or reaching impossible values)" if hidden else "")
        doc.figure(f"curves_{model}_{dataset}", fig,
                   f"Learning curves, {model} on {dataset}: mean across seeds, band = 95% t-interval{note}")


def build(results: Path, out: Path, extra_sections=None) -> Doc:
    """extra_sections: functions (doc, results) that write their sections after the stamp line, in order
    (stages/report.py: the claims first, claims_report.claims_sections). Write out/report.md, out/report.html, out/forest.png + .svg and out/figures/*.png from results/."""
    summary = pd.read_csv(results / "summary.csv")
    st = stamp(results)
    doc = Doc()
    doc.h(1, f"l2l-bench report: profile {st['profile']}")
    if st["profile"] == "smoke":
        doc.p("**Smoke scale.** This report comes from the smoke profile: tiny models, a few hundred images and "
              "one or two epochs, to prove the pipeline end to end. Its numbers cannot support any verdict about "
              "the papers.")
    doc.p(f"{st['runs']} runs on {st['device']}; git commit `{st['git commit']}`; generated {st['generated']} "
          "(full provenance at the end).")
    for section in extra_sections or []:
        section(doc, results)
    doc.h(2, "Summary")
    doc.p("Test metric per experiment, model and dataset (column metric: top-1 accuracy, or mAP on a multi-label "
          "dataset): mean over seeds with its 95% t-interval. "
          "'Last epoch' is the papers' reporting rule; 'best-val epoch' selects the epoch on the validation "
          "split carved from the training set, never on the test set.")
    doc.table(summary_table(summary))
    doc.h(2, "Learning curves")
    learning_curves(doc, results)
    doc.h(2, "Provenance")
    doc.p("\n".join(f"- {k}: {v}" for k, v in st.items()))

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "figures").mkdir(parents=True)
    for name, png in doc.figures.items():
        (tmp / ("" if name in doc.svgs else "figures") / f"{name}.png").write_bytes(png)
    for name, svg in doc.svgs.items():
        (tmp / f"{name}.svg").write_bytes(svg)
    write_text(tmp / "report.md", doc.markdown())
    write_text(tmp / "report.html", doc.html(f"l2l-bench report ({st['profile']})"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return doc

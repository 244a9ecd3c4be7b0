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

from l2l.io import read_json, write_text  # noqa: E402
from l2l.results import mean_interval  # noqa: E402
from l2l.tracking import git_commit  # noqa: E402


@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def figure(self, name: str, fig, caption: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()  # cheaper than bbox_inches="tight", which draws every figure twice
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        self.figures[name] = buf.getvalue()
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
                out.append(f"![{b[2]}](figures/{b[1]}.png)\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #bbb;padding:3px 6px}"
               "th{background:#eee}img{max-width:100%}figcaption{font-style:italic}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline_html(b[1])}</p>")
            elif b[0] == "table":
                out.append(b[1].to_html(index=False, na_rep="", escape=True, border=0))
            elif b[0] == "figure":
                data = base64.b64encode(self.figures[b[1]]).decode()
                out.append(f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


def _inline_html(text: str) -> str:
    # Paragraphs may hold Markdown bullet lists and `code`; render both minimally.
    lines = text.split("\n")
    if all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_code(html.escape(line[2:]))}</li>" for line in lines) + "</ul>"
    return _code(html.escape(text)).replace("\n", "<br>")


def _code(text: str) -> str:
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.2f}"
    return str(v)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def format_interval(mean, lo, hi) -> str:
    if pd.isna(mean):
        return "n/a"
    if pd.isna(lo):
        return f"{mean:.2f}"
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def stamp(results: Path) -> dict[str, str]:
    runs = pd.read_csv(results / "runs.csv")
    data = read_json(results / "data.json")
    lock = Path("dvc.lock")
    return {
        "profile": data["profile"],
        "device": ", ".join(sorted(set(f"{d} ({n})" for d, n in zip(runs["device"], runs["device_name"])))),
        "torch / CUDA": ", ".join(sorted(set(f"{t} / {c}" for t, c in zip(runs["torch"], runs["cuda"])))),
        "git commit": git_commit(),
        "dvc.lock sha256": hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.exists() else "none",
        "runs": str(len(runs)),
        "bit-reproducible": _reproducibility(runs),
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


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "experiment": summary["experiment"], "method": summary["method"], "model": summary["model"],
        "dataset": summary["dataset"], "n": summary["n"],
        "metric": summary["metric"] if "metric" in summary else TOP1,
        "test, last epoch (95% CI)": [format_interval(*r) for r in summary[
            ["final_test_acc_mean", "final_test_acc_ci_low", "final_test_acc_ci_high"]].itertuples(index=False)],
        "test, best-val epoch (95% CI)": [format_interval(*r) for r in summary[
            ["best_test_acc_mean", "best_test_acc_ci_low", "best_test_acc_ci_high"]].itertuples(index=False)],
        "val, last epoch": summary["final_val_acc_mean"],
        "train s (mean)": summary["train_seconds_mean"],
    })


def learning_curves(doc: Doc, results: Path) -> None:
    files = sorted((results / "curves").glob("*.csv"))
    metrics = dataset_metrics(results)
    by_panel: dict[tuple[str, str], list[tuple[str, pd.DataFrame]]] = {}
    for f in files:
        experiment, model, dataset = f.stem.split("__")
        by_panel.setdefault((model, dataset), []).append((experiment, pd.read_csv(f)))
    for (model, dataset), items in by_panel.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for experiment, df in items:
            for ax, metric in zip(axes, ("train_loss", "val_acc")):
                line, = ax.plot(df["epoch"], df[f"{metric}_mean"], label=f"{experiment} (n={df['n'].max()})")
                if df[f"{metric}_low"].notna().any():
                    ax.fill_between(df["epoch"], df[f"{metric}_low"], df[f"{metric}_high"], alpha=0.2,
                                    color=line.get_color())
        for ax, title in zip(axes, ("training loss", f"validation {metrics.get(dataset, TOP1)}")):
            ax.set_xlabel("epoch (all phases in order)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        doc.figure(f"curves_{model}_{dataset}", fig,
                   f"Learning curves, {model} on {dataset}: mean across seeds, band = 95% t-interval")


def _num(v, spec=".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ours(rec: dict) -> str:
    c = rec.get("comparison")
    if not c:
        return "not run"
    if rec["kind"] == "reported_value":
        return f"{_num(c['mean_a'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
    return f"{_num(c['mean_a'])} vs {_num(c['mean_b'])}"


def _difference(rec: dict) -> str:
    c = rec.get("comparison")
    if not c or rec["kind"] == "reported_value":
        return f"{_num(c['diff'])} from the paper" if c else ""
    return f"{_num(c['diff'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"


def _family(r: dict) -> str:
    """The claim's family; sensitivity claims are marked."""
    fam = r.get("family", r["paper"])
    return fam + (" (sensitivity)" if r.get("role") == "sensitivity" else "")


def verdict_table(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{
        "claim": r["id"], "family": _family(r), "kind": r["kind"], "dataset": r["dataset"],
        "paper's number": r["reported_text"], "ours: mean [95% CI]": _ours(r), "difference [95% CI]": _difference(r),
        "p (Holm)": _num(r.get("p_holm"), ".3g") if r.get("comparison") else "",
        "contra p (Holm)": _num(r.get("p_contra_holm"), ".3g") if r.get("comparison") else "",
        "verdict": r["verdict"]} for r in records])


def family_table(records: list[dict]) -> pd.DataFrame:
    """Per family: how many tests Holm's correction runs over (checked claims) and its role."""
    fams: dict[str, dict] = {}
    for r in records:
        if r.get("comparison") is not None:
            f = fams.setdefault(r.get("family", r["paper"]), {"role": r.get("role", "primary"), "tests": 0})
            f["tests"] += 1
    return pd.DataFrame([{"family": k, "role": v["role"], "tests (Holm runs over)": v["tests"]}
                         for k, v in fams.items()])


CALIBRATION_FILE = Path("benchmarks/calibration.json")
CALIBRATION_COLUMNS = {"false_supported": "false supported", "false_contradicted": "false contradicted",
                       "power": "power", "coverage": "95% CI coverage"}


def calibration_section(doc: Doc, profile: str, path: Path = CALIBRATION_FILE) -> None:
    """The rule's simulated error rates for this profile's families and seeds (benchmarks/calibration.py)."""
    doc.h(3, "The rule's measured error rates (calibration)")
    data = read_json(path).get(profile) if path.exists() else None
    if not data:
        doc.p(f"No calibration for profile {profile} in {path}: run `python benchmarks/calibration.py "
              f"--profile {profile}`. Without it this report's verdicts come with no measured error rates.")
        return
    doc.p(f"Simulated through the same functions as these verdicts ({data['replicates']} replicates per "
          f"scenario, normal seeds with between-seed sd {data['planning_sd']} points per run, alpha "
          f"{data['alpha']}, this profile's seeds and families; ± one Monte Carlo standard error). False "
          "supported: claims false at their boundary (no effect; a difference at the margin; the paper's number "
          "off by the tolerance); false contradicted: claims true at the edge of their contradicting test "
          "(effect = min_effect; difference at the margin; the paper's number exact); power: supported at the "
          "effect of interest; coverage: the 95% t-interval holding the true value.")
    doc.table(pd.DataFrame([{"family (tests)": f"{r['family']} ({r['family_tests']})", "kind": r["kind"],
                             "seeds": r["seeds"], "claims": r["claims"],
                             **{name: f"{100 * r[k]:.1f} ± {100 * r[k + '_se']:.1f}%"
                                for k, name in CALIBRATION_COLUMNS.items()}} for r in data["rows"]]))


def _arm_model(arm: dict) -> str:
    """The arm's model, with the phase whose metric it reads (e.g. a generation) when it names one."""
    return arm["model"] + (f" [{arm['phase']}]" if arm.get("phase") else "")


def claim_figure(rec: dict, metric_name: str | None = None):
    """Per-seed points of each arm with its mean and 95% t-interval; the paper's number dashed.
    metric_name: what the claim's *_acc column holds on its dataset (accuracy or mAP)."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rec["arms"]), 3.2))
    for i, (name, arm) in enumerate(rec["arms"].items()):
        vals = pd.Series(list(arm["values"].values()), dtype=float)
        ax.scatter([i] * len(vals), vals, s=18, alpha=0.7)
        mean, _, lo, hi = mean_interval(vals)
        if not math.isnan(lo):
            ax.errorbar([i + 0.15], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color="black", capsize=4)
        else:
            ax.plot([i + 0.15], [mean], "o", color="black")
        reported = rec["reported"].get(name) if isinstance(rec["reported"], dict) else None
        if reported is not None:
            ax.plot([i - 0.3, i + 0.3], [reported] * 2, "--", color="tab:red")
    if isinstance(rec["reported"], dict) and "value" in rec["reported"]:
        ax.axhline(rec["reported"]["value"], ls="--", color="tab:red", label="paper")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(rec["arms"])))
    ax.set_xticklabels([f"{n}\n{a['experiment']}\n{_arm_model(a)}" for n, a in rec["arms"].items()], fontsize=7)
    ax.set_ylabel(rec["metric"] + (f"\n{metric_name}" if metric_name and rec["metric"].endswith("_acc") else ""))
    ax.set_title(rec["id"], fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def claims_sections(doc: Doc, results: Path) -> None:
    path = results / "claims.json"
    if not path.exists():
        return
    data = read_json(path)
    records, st = data["claims"], data["settings"]
    metrics = dataset_metrics(results) if (results / "runs.csv").exists() else {}
    doc.h(2, "Verdicts")
    if data["profile"] == "smoke":
        doc.p("Smoke scale cannot support any verdict: every checked claim reads \"inconclusive (smoke scale)\"; "
              "its reason gives what the statistics alone would say, to show the machinery works.")
    checked = [r for r in records if r.get("comparison") is not None]
    not_run = [r for r in records if r.get("comparison") is None]
    if checked:
        doc.table(verdict_table(checked))
    else:
        doc.p("No claim has its arms in this profile.")
    doc.p(f"alpha = {st['alpha']} per family, at least {st['min_seeds']} seeds per arm; p-values Holm-adjusted "
          "within each family (supporting and contradicting tests separately); intervals are t-intervals. "
          "Differences are arm a minus arm b (the last minus the first arm for an ordering), in points of the "
          "claim's metric (accuracy; mAP on VOC). Families and the number of tests each holds:")
    doc.table(family_table(records))
    doc.h(3, "How a verdict is decided")
    doc.p("\n".join(f"- {line}" for line in data["verdict_rule"].splitlines() if line.strip()))
    calibration_section(doc, data["profile"])
    if not_run:
        doc.h(3, f"Not run in profile {data['profile']} ({len(not_run)} claims)")
        doc.table(pd.DataFrame([{"claim": r["id"], "claim text": r["claim"], "paper's number": r["reported_text"],
                                 "why not run": r["reason"]} for r in not_run]))
    doc.h(2, "Claims checked")
    for rec in checked:
        doc.h(3, f"{rec['id']}: {rec['claim']}")
        doc.p(f"Source: {rec['citation']}. Paper's number: {rec['reported_text']}"
              + (f" ({rec['reported'].get('source')})" if isinstance(rec["reported"], dict) else "") + ".")
        doc.p(f"Protocol here: {rec['protocol']}")
        arms = pd.DataFrame([{"arm": n, "experiment": a["experiment"], "model": _arm_model(a), "n": len(a["values"]),
                              "per seed": ", ".join(f"s{s}: {_num(v)}" for s, v in a["values"].items())}
                             for n, a in rec["arms"].items()])
        doc.table(arms)
        c = rec["comparison"]
        details = [f"verdict: **{rec['verdict']}** ({rec['reason']})",
                   f"family {_family(rec)}, {rec.get('family_size')} tests"
                   + (f"; {rec['role_reason']}" if rec.get("role_reason") else ""),
                   f"{'paired by seed' if c['paired'] else 'unpaired'}; difference {_difference(rec)}; "
                   f"family-adjusted interval [{_num(c.get('adj_ci_low'))}, {_num(c.get('adj_ci_high'))}]",
                   f"supporting test p = {_num(c['p_value'], '.3g')}, Holm {_num(rec.get('p_holm'), '.3g')}; "
                   f"contradicting test ({c.get('contra_test')}) p = {_num(c.get('p_contra'), '.3g')}, "
                   f"Holm {_num(rec.get('p_contra_holm'), '.3g')}; non-parametric p = {_num(c['p_nonparam'], '.3g')} "
                   "(descriptive)",
                   f"effect size {_num(c['effect_size'])}; P(a > b across seeds) = {_num(c['prob_superiority'])}"]
        if c.get("mcnemar_p") is not None:
            details.append(f"per-example McNemar (combined over seeds; descriptive: it compares trained networks, "
                           f"not methods, and is in no verdict): p = {_num(c['mcnemar_p'], '.3g')}")
        if c.get("power") is not None:
            details.append(f"power of the rule at the effect of interest ({_num(c.get('effect_of_interest'))}) with "
                           f"these seeds and the measured sd {_num(c.get('sd'))}: {_num(100 * c['power'], '.0f')}%")
        if c.get("seeds_needed") is not None and not rec["verdict"].startswith("supported"):
            details.append(f"seeds per arm for 80% power: {c['seeds_needed']}")
        if c.get("dropped"):
            details.append("runs left out: " + ", ".join(c["dropped"]))
        details += [f"note: {n}" for n in c.get("notes", [])]
        doc.p("\n".join(f"- {d}" for d in details))
        doc.figure(f"claim_{rec['id'].replace('/', '_')}", claim_figure(rec, metrics.get(rec["dataset"])),
                   f"{rec['id']}: per-seed values, "
                   "mean and 95% t-interval per arm; dashed: the paper's number")


def build(results: Path, out: Path, extra_sections=None) -> Doc:
    """Write out/report.md, out/report.html and out/figures/*.png from results/."""
    summary = pd.read_csv(results / "summary.csv")
    st = stamp(results)
    doc = Doc()
    doc.h(1, f"l2l-bench report: profile {st['profile']}")
    if st["profile"] == "smoke":
        doc.p("**Smoke scale.** This report comes from the smoke profile: tiny models, a few hundred images and "
              "one or two epochs, to prove the pipeline end to end. Its numbers cannot support any verdict about "
              "the papers.")
    doc.p("\n".join(f"- {k}: {v}" for k, v in st.items()))
    for section in [claims_sections, *(extra_sections or [])]:
        section(doc, results)
    doc.h(2, "Summary")
    doc.p("Test metric per experiment, model and dataset (column metric: top-1 accuracy, or mAP on a multi-label "
          "dataset): mean over seeds with its 95% t-interval. "
          "'Last epoch' is the papers' reporting rule; 'best-val epoch' selects the epoch on the validation "
          "split carved from the training set, never on the test set.")
    doc.table(summary_table(summary))
    doc.h(2, "Learning curves")
    learning_curves(doc, results)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "figures").mkdir(parents=True)
    for name, png in doc.figures.items():
        (tmp / "figures" / f"{name}.png").write_bytes(png)
    write_text(tmp / "report.md", doc.markdown())
    write_text(tmp / "report.html", doc.html(f"l2l-bench report ({st['profile']})"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return doc

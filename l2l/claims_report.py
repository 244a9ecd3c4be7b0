"""The claims' part of the report (results/claims.json): per paper one line per claim, the forest plot,
not-run claims folded per cause, the verdict statistics and one section per claim with its figure.
For report.build's extra_sections (stages/report.py puts it first)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from l2l.io import read_json  # noqa: E402
from l2l.report import Doc, dataset_metrics, decimals, format_interval, rounded  # noqa: E402
from l2l.sequential_report import calibration_section, decision_text, failed_text  # noqa: E402
from l2l.results import (ACCURACY_RANGE, DIFFERENCE_RANGE, FEWEST_SEEDS_FOR_INTERVAL, interval_shown,  # noqa: E402
                         mean_interval)


def _num(v, spec=".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _p(v) -> str:
    return _num(v, ".2g")


def _seeds(rec: dict) -> int:
    c = rec["comparison"]
    return min(c["n_a"], c.get("n_b") or c["n_a"])


def _paper_value(rec: dict) -> float | None:
    r = rec["reported"]
    return r.get("value") if isinstance(r, dict) else None


def estimate(rec: dict) -> tuple[float, float, float]:
    """The forest plot's quantity with its 95% interval: arm a - arm b (the last minus the first arm of an
    ordering), or for a reported value ours - the paper's number; 0 = no difference / the paper's value."""
    c = rec["comparison"]
    # no interval (one seed, or no spread to estimate): NaN bounds, which nothing draws or prints
    lo, hi = (math.nan if c[k] is None else c[k] for k in ("ci_low", "ci_high"))
    if rec["kind"] == "reported_value":
        r = _paper_value(rec)
        return (math.nan if c["mean_a"] is None else c["mean_a"] - r), lo - r, hi - r
    return (math.nan if c["diff"] is None else c["diff"]), lo, hi


def _estimate_range(rec: dict) -> tuple[float, float]:
    if rec["kind"] == "reported_value":
        r = _paper_value(rec)
        return ACCURACY_RANGE[0] - r, ACCURACY_RANGE[1] - r
    return DIFFERENCE_RANGE


def shown_interval(rec: dict) -> tuple[float, float] | None:
    """The claim's 95% interval on estimate()'s scale where results.interval_shown allows it (3 seeds or
    more, inside what the metric can take), else None: the report, the claims' DVC metrics and their MLflow
    runs all print an interval by this one rule."""
    _, lo, hi = estimate(rec)
    return (lo, hi) if interval_shown(_seeds(rec), lo, hi, _estimate_range(rec)) else None


def _arm_label(rec: dict, name: str) -> str:
    """An arm by its experiment (and model, when the arms' models differ): what a reader compares."""
    arms = rec["arms"]
    models = {_arm_model(a) for a in arms.values()}
    arm = arms[name]
    return arm["experiment"] + (f" ({_arm_model(arm)})" if len(models) > 1 else "")


def _order(rec: dict) -> tuple[str, str]:
    """(minuend, subtrahend) arm names of the claim's difference."""
    names = list(rec["arms"])
    if rec["kind"] == "rise_then_plateau":  # its difference is the rise: peak - start (stats.compare_rise_then_plateau)
        return "peak", "start"
    return (names[-1], names[0]) if rec["kind"] == "ordering" else (names[0], names[1])


def ours(rec: dict) -> str:
    """Our number with its interval, rounded to what the seeds support."""
    c = rec.get("comparison")
    if not c:
        return "not run"
    n = _seeds(rec)
    if rec["kind"] == "reported_value":
        d = decimals((c["ci_high"] - c["ci_low"]) / 2 if c["ci_low"] is not None else None)
        return (f"{format_interval(c['mean_a'], c['ci_low'], c['ci_high'], n)}; "
                f"{rounded(c['mean_a'] - _paper_value(rec), d, signed=True)} from the paper")
    est, lo, hi = estimate(rec)
    if not math.isfinite(est):  # every run of an arm failed (the failed-run rule): nothing to estimate
        return "no estimate: " + "; ".join(f"arm {a}: {len(f)} failed" for a, f in (rec.get("failed") or {}).items())
    first, second = _order(rec)
    d = decimals((hi - lo) / 2)
    means = {k: sum(v["values"].values()) / len(v["values"]) for k, v in rec["arms"].items()}
    return (f"{_arm_label(rec, first)} − {_arm_label(rec, second)}: "
            f"{format_interval(est, lo, hi, n, DIFFERENCE_RANGE, signed=True)} "
            f"({rounded(means[first], d)} vs {rounded(means[second], d)}, {'paired' if c['paired'] else 'unpaired'})")


def _family(r: dict) -> str:
    """The claim's family; sensitivity claims are marked."""
    fam = r.get("family", r["paper"])
    return fam + (" (sensitivity)" if r.get("role") == "sensitivity" and "sensitivity" not in fam else "")


def _claim_name(r: dict) -> str:
    """A claim named by its text, its id after it (ids alone say nothing to a reader)."""
    return f"{r['claim']} `{r['id']}`" + (" (sensitivity)" if r.get("role") == "sensitivity" else "")


def overview_table(records: list[dict]) -> pd.DataFrame:
    """One line per checked claim: its text, where the paper states it, the paper's number, ours, verdict."""
    return pd.DataFrame([{"claim": _claim_name(r), "stated in": r.get("stated_in", "unconfirmed"),
                          "paper": r["reported_text"], "ours [95% CI]": ours(r), "verdict": r["verdict"]}
                         for r in records])


def verdict_table(records: list[dict]) -> pd.DataFrame:
    """The statistics behind each verdict, claims named by their text."""
    rows = []
    for r in records:
        c = r["comparison"]
        est, lo, hi = estimate(r)
        d = decimals((hi - lo) / 2)
        shift = est - (c["mean_a"] if r["kind"] == "reported_value" else c["diff"])  # onto the estimate's scale
        alo, ahi = c.get("adj_ci_low"), c.get("adj_ci_high")
        adj = (f"[{rounded(alo + shift, d)}, {rounded(ahi + shift, d)}]" if alo is not None and ahi is not None
               and interval_shown(_seeds(r), alo + shift, ahi + shift, _estimate_range(r)) else "not shown")
        rows.append({"claim": _claim_name(r), "family": _family(r), "kind": r["kind"], "n": _seeds(r),
                     "estimate [95% CI]": format_interval(est, lo, hi, _seeds(r), _estimate_range(r), signed=True),
                     "decision interval": decision_text(c, adj), "p / level": f"{_p(c['p_value'])} / "
                     f"{_p(c.get('level_support'))}", "contra p / level": f"{_p(c.get('p_contra'))} / "
                     f"{_p(c.get('level_contra'))}", "failed runs": failed_text(r), "verdict": r["verdict"]})
    return pd.DataFrame(rows)


def family_table(records: list[dict]) -> pd.DataFrame:
    """Per family: how many tests Holm's correction runs over (checked claims) and its role."""
    fams: dict[str, dict] = {}
    for r in records:
        if r.get("comparison") is not None:
            f = fams.setdefault(r.get("family", r["paper"]), {"role": r.get("role", "primary"), "tests": 0})
            f["tests"] += 1
    return pd.DataFrame([{"family": k, "role": v["role"], "tests (Holm runs over)": v["tests"]}
                         for k, v in fams.items()])


def fold_not_run(records: list[dict]) -> dict[str, list[dict]]:
    """Not-run claims by their general cause (the record's `why`; its full reason where it has none)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("comparison") is None:
            groups.setdefault(r.get("why") or r["reason"], []).append(r)
    return groups


def not_run_line(why: str, recs: list[dict]) -> str:
    """One line for every claim not run for one cause: how many per paper and which runs they lack."""
    papers = ", ".join(f"{p} {n}" for p, n in pd.Series([r["paper"] for r in recs]).value_counts(sort=False).items())
    missing = sorted({f"{_arm_model(a)} on {r['dataset']}" for r in recs for a in r["arms"].values()
                      if not a["values"]})
    return (f"- **{len(recs)} claim{'s' * (len(recs) != 1)}**: {why} ({papers})"
            + (f"; lacking {', '.join(missing)}" if missing else ""))


def forest_figure(records: list[dict]):
    """Every checked claim's estimate (estimate()) with its 95% interval against 0, the figures written
    beside it; an interval under 3 seeds or reaching impossible values is not drawn (hollow marker). Grey
    ticks: the claim's margin, min_effect or tolerance; red x: the paper's own difference where it gives both."""
    fig, ax = plt.subplots(figsize=(11, 1.3 + 0.5 * len(records)))
    colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(r["paper"] for r in records))}
    beside = ax.get_yaxis_transform()  # x in axes units, y in data units: a text column right of the plot
    labels = []
    for i, r in enumerate(records):
        y = len(records) - 1 - i
        est, lo, hi = estimate(r)
        color = colors[r["paper"]]
        if interval_shown(_seeds(r), lo, hi, _estimate_range(r)):
            ax.errorbar([est], [y], xerr=[[est - lo], [hi - est]], fmt="o", color=color, capsize=3)
        else:
            ax.plot([est], [y], "o", mfc="white", color=color)
        ax.text(1.02, y, format_interval(est, lo, hi, _seeds(r), _estimate_range(r), signed=True), transform=beside,
                va="center", fontsize=8)
        c = r["comparison"]
        bounds = ([c["min_effect"]] if c.get("min_effect") else []) + [
            s * v for v in (c.get("margin"), c.get("tolerance")) if v for s in (-1, 1)]
        for b in bounds:
            ax.plot([b, b], [y - 0.3, y + 0.3], color="gray", lw=1)
        rep = r["reported"]
        if isinstance(rep, dict) and r["kind"] != "reported_value":
            first, second = _order(r)
            if isinstance(rep.get(first), (int, float)) and isinstance(rep.get(second), (int, float)):
                ax.plot([rep[first] - rep[second]], [y], "x", color="tab:red", ms=7)
        what = "ours − paper" if r["kind"] == "reported_value" else " − ".join(_arm_label(r, n) for n in _order(r))
        labels.append(f"{r['id']}\n{what}")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(records)))
    ax.set_yticklabels(labels[::-1], fontsize=7)
    ax.set_ylim(-0.6, len(records) - 0.4)
    ax.text(1.02, len(records) - 0.4, "estimate [95% CI]", transform=beside, va="bottom", fontsize=8, weight="bold")
    ax.set_xlabel("difference, points of the claim's metric (0: no difference, or the paper's number)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _arm_model(arm: dict) -> str:
    """The arm's model, with the phase whose metric it reads (e.g. a generation) when it names one."""
    return arm["model"] + (f" [{arm['phase']}]" if arm.get("phase") else "")


def _interval_or_note(ax, x: float, vals: pd.Series, limits, color="black") -> None:
    """The mean at x with its 95% t-interval, or the mean alone and a note when the interval is not shown."""
    mean, _, lo, hi = mean_interval(vals)
    if interval_shown(len(vals), lo, hi, limits):
        ax.errorbar([x], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=4)
    else:
        ax.plot([x], [mean], "o", color=color)
        ax.annotate(f"n={len(vals)}: interval\ntoo wide", (x, mean), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=7, color="dimgray")


def claim_figure(rec: dict, metric_name: str | None = None):
    """A paired claim: each seed's line across the arms and, beside it, the per-seed differences with
    their mean. An unpaired claim or a reported value: per-seed points per arm with the mean. The mean's
    95% t-interval only where it is shown (results.interval_shown); dashed red: the paper's numbers.
    metric_name: what the claim's *_acc column holds on its dataset (accuracy or mAP)."""
    arms, c = rec["arms"], rec["comparison"]
    names = list(arms)
    ylabel = rec["metric"] + (f"\n{metric_name}" if metric_name and rec["metric"].endswith("_acc") else "")
    paired = bool(c.get("paired")) and len(names) > 1
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(4.2 + 1.1 * len(names), 3.4), squeeze=False,
                             gridspec_kw={"width_ratios": [len(names), 1.4]} if paired else None)
    ax = axes[0][0]
    reported = rec["reported"] if isinstance(rec["reported"], dict) else {}
    if paired:
        seeds = sorted(set.intersection(*(set(a["values"]) for a in arms.values())), key=int)
        for s in seeds:
            ys = [arms[n]["values"][s] for n in names]
            ax.plot(range(len(names)), ys, "-o", color="gray", alpha=0.6, ms=4)
            ax.annotate(f"s{s}", (len(names) - 1, ys[-1]), xytext=(5, 0), textcoords="offset points", fontsize=7,
                        va="center")
    else:
        for i, n in enumerate(names):
            vals = pd.Series(list(arms[n]["values"].values()), dtype=float)
            ax.scatter([i] * len(vals), vals, s=18, alpha=0.7)
            _interval_or_note(ax, i + 0.15, vals, None)
    for i, n in enumerate(names):
        if isinstance(reported.get(n), (int, float)):
            ax.plot([i - 0.3, i + 0.3], [reported[n]] * 2, "--", color="tab:red")
    if isinstance(reported.get("value"), (int, float)):
        ax.axhline(reported["value"], ls="--", color="tab:red", label="paper")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{arms[n]['experiment']}\n{_arm_model(arms[n])}" for n in names], fontsize=7)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel(ylabel)
    ax.set_title(rec["id"], fontsize=9)
    ax.grid(alpha=0.3)
    if paired:
        first, second = _order(rec)
        diffs = pd.Series([arms[first]["values"][s] - arms[second]["values"][s] for s in seeds], dtype=float)
        dax = axes[0][1]
        dax.scatter([0] * len(diffs), diffs, s=18, color="gray")
        _interval_or_note(dax, 0.15, diffs, DIFFERENCE_RANGE)
        dax.axhline(0, color="black", lw=0.8)
        for b in [v for v in (c.get("min_effect"),) if v] + ([-c["margin"], c["margin"]] if c.get("margin") else []):
            dax.axhline(b, color="gray", ls=":", lw=1)
        dax.set_xticks([0])
        dax.set_xticklabels([f"{arms[first]['experiment']}\n− {arms[second]['experiment']}"], fontsize=7)
        dax.set_xlim(-0.6, 1.2)
        dax.set_title("per-seed difference", fontsize=9)
        dax.grid(alpha=0.3)
    return fig


def _provenance(rec: dict) -> str:
    stated = rec.get("stated_in", "unconfirmed")
    choices = rec.get("harness_choices") or {}
    return ("stated in the paper: " + (stated if stated != "unconfirmed" else "unconfirmed (where the paper "
                                       "states it has not been checked)")
            + ("; the harness's choices, not the paper's: " + "; ".join(f"{k}: {v}" for k, v in choices.items())
               if choices else ""))


def claims_overview(doc: Doc, records: list[dict], profile: str) -> None:
    """The report's top: per paper, one line per checked claim and one per cause of claims not run,
    then the forest plot of every checked claim."""
    doc.h(2, "Claims at a glance")
    doc.p("Per paper: each checked claim in one line (our estimate with its 95% t-interval, rounded to what the "
          "seeds support; an interval from fewer than 3 seeds, or one reaching values the metric cannot take, is "
          "not printed: it could exclude nothing), then one line per cause for the claims not run.")
    for paper in dict.fromkeys(r["paper"] for r in records):
        recs = [r for r in records if r["paper"] == paper]
        doc.h(3, f"{paper}: {recs[0]['citation']}")
        checked = [r for r in recs if r.get("comparison") is not None]
        if checked:
            doc.table(overview_table(checked))
        folded = fold_not_run(recs)
        if folded:
            doc.p("\n".join(not_run_line(why, rs) for why, rs in folded.items()))
    checked = [r for r in records if r.get("comparison") is not None and math.isfinite(estimate(r)[0])]
    if checked:
        doc.figure("forest", forest_figure(checked),
                   "Every checked claim: arm a − arm b (an ordering: last − first arm), or ours − the paper's number "
                   "for a reported value, with its 95% t-interval; hollow: interval not drawn (too few seeds or "
                   "reaching impossible values); grey ticks: margin, min_effect or tolerance; red x: the paper's "
                   "own difference", svg=True)


def claims_sections(doc: Doc, results: Path) -> None:
    path = results / "claims.json"
    if not path.exists():
        return
    data = read_json(path)
    records, st = data["claims"], data["settings"]
    metrics = dataset_metrics(results) if (results / "runs.csv").exists() else {}
    claims_overview(doc, records, data["profile"])
    checked = [r for r in records if r.get("comparison") is not None]
    folded = fold_not_run(records)
    if folded:
        doc.h(3, f"Not run in profile {data['profile']} ({sum(map(len, folded.values()))} claims)")
        doc.p("\n".join(not_run_line(why, rs) for why, rs in folded.items()))
    doc.h(2, "Verdicts")
    if data["profile"] == "smoke":
        doc.p("Smoke scale cannot support any verdict: every checked claim reads \"inconclusive (smoke scale)\"; "
              "its reason gives what the statistics alone would say, to show the machinery works.")
    if checked:
        doc.table(verdict_table(checked))
    else:
        doc.p("No claim has its arms in this profile.")
    doc.p(f"alpha = {st['alpha']} per family over every look, at least {st['min_seeds']} seeds per arm; each "
          "test's level is its family's Holm share of alpha times the look's spending (supporting and contradicting "
          "tests separately; the sequential design below); the decision interval is the one the verdict compared "
          "with the claim's bounds, each bound at the level shown (for a reported value: ours, not ours minus the "
          "paper's number); the 95% interval is repeated over looks; intervals are t-intervals. "
          "Estimates are arm a minus arm b (the last minus the first arm for an ordering), or ours minus the "
          "paper's number for a reported value, in points of the claim's metric (accuracy; mAP on VOC). "
          "Families and the number of tests each holds:")
    doc.table(family_table(records))
    doc.h(3, "How a verdict is decided")
    doc.p("\n".join(f"- {line}" for line in data["verdict_rule"].splitlines() if line.strip()))
    calibration_section(doc, data["profile"])
    doc.h(2, "Claims checked")
    for rec in checked:
        doc.h(3, f"{rec['id']}: {rec['claim']}")
        doc.p(f"Source: {rec['citation']}. Paper's number: {rec['reported_text']}"
              + (f" ({rec['reported'].get('source')})" if isinstance(rec["reported"], dict) else "")
              + f". Provenance: {_provenance(rec)}.")
        doc.p(f"Protocol here: {rec['protocol']}")
        c = rec["comparison"]
        est, lo, hi = estimate(rec)
        d = decimals((hi - lo) / 2)
        arms = pd.DataFrame([{"arm": name, "experiment": a["experiment"], "model": _arm_model(a),
                              "n": len(a["values"]),
                              "per seed": ", ".join(f"s{s}: {rounded(v, max(d, 1))}" for s, v in a["values"].items())}
                             for name, a in rec["arms"].items()])
        doc.table(arms)
        details = [f"verdict: **{rec['verdict']}** ({rec['reason']})",
                   f"family {_family(rec)}, {rec.get('family_size')} tests"
                   + (f"; {rec['role_reason']}" if rec.get("role_reason") else ""),
                   f"{'paired by seed' if c['paired'] else 'unpaired'}; ours: {ours(rec)}",
                   f"supporting test p = {_p(c['p_value'])} at level {_p(c.get('level_support'))}; "
                   f"contradicting test ({c.get('contra_test')}) p = {_p(c.get('p_contra'))} at level "
                   f"{_p(c.get('level_contra'))}; non-parametric p = {_p(c['p_nonparam'])} (descriptive)",
                   f"effect size {_num(c['effect_size'])}; P(a > b across seeds) = {_num(c['prob_superiority'])}"]
        if c.get("mcnemar_p") is not None:
            details.append(f"per-example McNemar (combined over seeds; descriptive: it compares trained networks, "
                           f"not methods, and is in no verdict): p = {_p(c['mcnemar_p'])}")
        if c.get("power") is not None:
            details.append(f"power of the rule at the effect of interest ({_num(c.get('effect_of_interest'))}) with "
                           f"these seeds and the measured sd {_num(c.get('sd'))}: {_num(100 * c['power'], '.0f')}%")
        if c.get("seeds_needed") is not None and not rec["verdict"].startswith("supported"):
            details.append(f"seeds per arm for 80% power: {c['seeds_needed']}")
        if c.get("dropped"):
            details.append("runs left out: " + ", ".join(c["dropped"]))
        if rec.get("failed"):
            details.append(f"{rec.get('failed_rule') or 'failed runs'}: " + "; ".join(
                f"arm {a} seed {s_}: {why}" for a, f in rec["failed"].items() for s_, why in f.items()))
        details += [f"note: {note}" for note in c.get("notes", [])]
        doc.p("\n".join(f"- {x}" for x in details))
        if not all(a["values"] for a in rec["arms"].values()):  # an arm whose every run failed: nothing to draw
            continue
        doc.figure(f"claim_{rec['id'].replace('/', '_')}", claim_figure(rec, metrics.get(rec["dataset"])),
                   f"{rec['id']}: " + ("each seed's line across the arms; right: per-seed differences and their mean"
                                       if c["paired"] and len(rec["arms"]) > 1 else "per-seed values and their mean")
                   + f" (95% t-interval from {FEWEST_SEEDS_FOR_INTERVAL} seeds on); dashed: the paper's number")

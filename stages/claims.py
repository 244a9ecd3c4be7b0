"""DVC stage `claims`: check every claim of claims.yaml against results/ (l2l.stats), write
results/claims.json (+ per-claim estimate, interval and verdict in results/claims_metrics.json, and DVC's
metrics, the verdicts counted per paper, in results/verdicts/), the next look of the sequential design
(results/next_look.json, l2l.looks) and, in MLflow, one run per checked claim and one summary run
(l2l.tracking.log_claims)."""
import math
import shutil
from pathlib import Path

import pandas as pd

from l2l import stage
from l2l.claims import check, failed_rule, load_predictions
from l2l.io import remove_stale_temps, write_json
from l2l.layerwise_analysis import record_stage_figure
from l2l.looks import NEXT_LOOK, design_of, next_look
from l2l.claims_report import estimate, ours, shown_interval
from l2l.findings import verdict_counts
from l2l.selection import load_selection
from l2l.stats import VERDICT_RULE
from l2l.tracking import log_claims, log_figure


def claims_metrics(records: list[dict]) -> dict:
    """results/claims_metrics.json (`dvc metrics show results/claims_metrics.json`): per checked claim its
    estimate (the report's forest plot: a - b, or ours - the paper's number), verdict and 95% interval where
    the report shows one (claims_report.shown_interval); the rest is in results/claims.json."""
    out = {}
    for r in records:
        if r.get("comparison") is not None:
            est, _, _ = estimate(r)
            if not math.isfinite(est):  # every run of an arm failed: no estimate, the verdict says why
                out[r["id"]] = {"verdict": r["verdict"]}
                continue
            shown = shown_interval(r)  # no NaN in JSON: no interval shown, no key
            out[r["id"]] = {"estimate": round(est, 2), "verdict": r["verdict"],
                            **({"ci_low": round(shown[0], 2), "ci_high": round(shown[1], 2)} if shown else {})}
    return out


def write_verdict_counts(records: list[dict], folder: Path) -> None:
    """DVC's metrics (dvc.yaml): <folder>/<paper>.json per selected paper and all.json, claims per verdict
    (findings.verdict_counts): `dvc metrics show` prints one row per paper, `dvc exp show` compares them."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, counts in verdict_counts(records).items():
        write_json(tmp / f"{name}.json", counts)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def run() -> None:
    config, claims = load_selection()  # run.yaml's papers' claims only
    remove_stale_temps(stage.RESULTS)  # of a claims stage killed while writing
    settings, profile = config.stats, config.profile.name
    runs = pd.read_csv(stage.RESULTS / "runs.csv")
    phases = pd.read_csv(stage.RESULTS / "phases.csv")
    design = design_of(config)  # sequential on a look (run.yaml seeds), else one look: the fixed plan
    records = check(claims, runs, phases, load_predictions(stage.RESULTS / "predictions.npz"), profile,
                    alpha=settings["alpha"], min_seeds=settings["min_seeds"], design=design,
                    failed_run=failed_rule(config))
    mlflow_ids = log_claims(profile, records, show_interval=lambda rec: shown_interval(rec) is not None, ours=ours)
    for rec in records:  # per-stage claims carry their architecture's per-stage figure
        fig = record_stage_figure(rec, phases)
        if fig is not None and rec["id"] in mlflow_ids:  # a claim not run has no MLflow run (the summary lists it)
            log_figure(mlflow_ids[rec["id"]], fig, f"stages_{rec['id']}.png")
    for rec in records:
        rec["mlflow_run_id"] = mlflow_ids.get(rec["id"])
    write_json(stage.RESULTS / "claims.json", {"profile": profile, "papers": config.papers or "all",
                                               "settings": settings, "verdict_rule": VERDICT_RULE,
                                               "design": design.text(), "claims": records})
    write_json(NEXT_LOOK, next_look(config, claims, records, design))
    write_json(stage.RESULTS / "claims_metrics.json", claims_metrics(records))
    write_verdict_counts(records, stage.RESULTS / "verdicts")
    counts = pd.Series([r["verdict"] for r in records]).value_counts().to_dict()
    stage.log.info("claims: %d checked: %s", len(records), counts)


if __name__ == "__main__":
    stage.main(run)

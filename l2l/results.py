"""Aggregation (pandas): run folders -> results/ tables that the report reads.

results/runs.csv      one row per run: identity, every param that varies, every metric; the *_acc columns
                      hold the dataset's metric, named in column `metric` (top-1 accuracy; mAP for VOC);
                      train_images / val_images: the images the run trained on and validated on (val 0:
                      its experiment's split.val_size 0, the validation images joined training)
results/summary.csv   per experiment x method x model x dataset: n, mean, std, 95% t-interval, train/val images
results/metrics.json  the summary per group (`dvc metrics show results/metrics.json`; DVC's metrics are per claim)
results/curves/*.csv  learning curves per group: mean and band across seeds (`dvc plots show`)
results/phases.csv    per-phase metrics that methods record (e.g. per-stage accuracy)
results/predictions.npz  per-example test predictions (class ids; per-class scores for VOC) and labels
results/data.json     the data manifests' source and split note (the report's stamp)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from l2l.checks import IntegrityError
from l2l.io import read_npz, read_record, write_json
from l2l.spec import RunSpec
from l2l.tasks import task_of
from l2l.tracking import flatten

GROUP = ["experiment", "method", "model", "dataset"]
# The per-run metric columns of runs.csv (what a claim's `metric` may name for a run's arm): the evaluate
# stage's (final / best-on-validation checkpoint x val / test split x acc / loss), then the run's own record's.
EVAL_METRICS = tuple(f"{w}_{s}_{m}" for w in ("final", "best") for s in ("val", "test") for m in ("acc", "loss"))
RUN_METRICS = EVAL_METRICS + ("train_acc", "epochs", "updates", "train_seconds", "images_per_s", "train_images",
                              "val_images")
SUMMARY_METRICS = ["final_test_acc", "best_test_acc", "final_val_acc", "best_val_acc", "train_seconds"]
CURVE_METRICS = ["train_loss", "train_acc", "val_loss", "val_acc"]


def mean_interval(values: pd.Series, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """mean, std, and the t-interval of the mean (NaN bounds when n < 2)."""
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return (np.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, np.nan, np.nan, np.nan
    std = float(v.std(ddof=1))
    if std == 0:
        return mean, 0.0, mean, mean
    lo, hi = stats.t.interval(confidence, len(v) - 1, loc=mean, scale=stats.sem(v))
    return mean, std, float(lo), float(hi)


# Fewer seeds than this and a 95% t-interval is not shown: with 2 seeds it has 1 degree of freedom (t = 12.7),
# so it spans far more than any effect it could exclude, often beyond what the metric can take. 3 is also
# the floor of stats.min_seeds, below which no verdict is tested.
FEWEST_SEEDS_FOR_INTERVAL = 3


ACCURACY_RANGE = (0.0, 100.0)  # the *_acc columns: top-1 accuracy or mAP, in %
DIFFERENCE_RANGE = (-100.0, 100.0)  # a difference of two of them


def interval_shown(n, lo, hi, limits: tuple[float, float] | None = None) -> bool:
    """Whether a t-interval is worth drawing: enough seeds (n None: not known, not checked), finite
    bounds, inside the values the metric can take (limits, e.g. (0, 100) for an accuracy). The one rule
    for every place an interval is shown: the report, results/metrics.json, the claims' DVC metrics and
    their MLflow runs; where it says no, none of them prints a number."""
    if lo is None or hi is None or not np.isfinite([lo, hi]).all():
        return False
    if n is not None and n < FEWEST_SEEDS_FOR_INTERVAL:
        return False
    return limits is None or (limits[0] <= lo and hi <= limits[1])


def read_result(run_dir: Path, check: tuple[str, ...] | None = None) -> dict:
    """runs/<hash>/result.json, verified with the files it records (`check`: default all of them)."""
    return read_record(run_dir / "result.json", check, advice=f"delete {run_dir}/ and re-run `dvc repro` (it "
                                                               "retrains this run)")


def read_eval(eval_dir: Path) -> dict:
    """evals/<hash>/eval.json, verified with its predictions.npz."""
    return read_record(eval_dir / "eval.json", advice=f"delete {eval_dir}/ and re-run `dvc repro evaluate`")


def run_rows(specs: list[RunSpec], runs: Path, evals: Path) -> pd.DataFrame:
    missing = [s.hash for s in specs if not (evals / s.hash / "eval.json").exists()]
    if missing:
        raise FileNotFoundError(f"{evals}/{missing[0]}/eval.json: {len(missing)} planned run(s) not evaluated "
                                "(run the train and evaluate stages)")
    params = pd.DataFrame([flatten(s.to_dict()) for s in specs])
    varying = [c for c in params.columns if params[c].nunique() > 1 and c not in GROUP + ["seed"]]
    rows = []
    for spec, (_, p) in zip(specs, params.iterrows()):
        result = read_result(runs / spec.hash, check=("history.csv",))  # what aggregate reads of the run
        ev = read_eval(evals / spec.hash)
        if ev["final_sha256"] != result["final_sha256"]:
            raise IntegrityError(f"{evals / spec.hash / 'eval.json'}: evaluates another final.pt than "
                                 f"{runs / spec.hash / 'result.json'} records: re-run `dvc repro evaluate`")
        rows.append({"run": spec.hash, **{k: getattr(spec, k) for k in GROUP}, "seed": spec.seed,
                     **{f"param.{c}": p[c] for c in varying},
                     "metric": task_of(spec.data).metric,  # what the *_acc columns hold
                     **{k: v for k, v in ev.items() if k not in ("final_sha256", "files", "sha256")},
                     **_images(result),
                     "train_acc": result["final"]["train_acc"], "train_loss": result["final"]["train_loss"],
                     "epochs": result["epochs"],
                     "updates": result["updates"], "train_seconds": result["train_seconds"],
                     "images_per_s": result["images_per_s"],
                     **{k: result[k] for k in ("device", "device_name", "torch", "cuda")},
                     "deterministic": result.get("deterministic", False),  # absent: written before the switch
                     "tf32": result.get("tf32")})  # None: written before train.tf32 (torch's TF32 convolutions)
    return pd.DataFrame(rows)


def _images(result: dict) -> dict[str, float]:
    """Images the run trained and validated on (result.json's counts; NaN in a record written before
    they were kept)."""
    n = result.get("images") or {}
    return {"train_images": n.get("train", np.nan), "val_images": n.get("val", np.nan)}


def summarise(runs_df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for key, g in runs_df.groupby(GROUP, sort=False):
        row = dict(zip(GROUP, key), n=len(g))
        if "metric" in g:
            row["metric"] = g["metric"].iloc[0]
        for col in ("train_images", "val_images"):  # the same for every seed of a group
            if col in g:
                row[col] = g[col].max()
        for m in SUMMARY_METRICS:
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = mean_interval(g[m])
        out.append(row)
    return pd.DataFrame(out)


def curves(specs: list[RunSpec], runs: Path) -> dict[str, pd.DataFrame]:
    hist = []
    for s in specs:
        h = pd.read_csv(runs / s.hash / "history.csv")
        h["seed"], h["group"] = s.seed, f"{s.experiment}__{s.model}__{s.dataset}"
        hist.append(h)
    hist = pd.concat(hist, ignore_index=True)
    out = {}
    for group, g in hist.groupby("group", sort=False):
        rows = []
        for epoch, e in g.groupby("global_epoch"):
            row = {"epoch": int(epoch) + 1, "phase": e["phase"].iloc[0], "n": len(e)}
            for m in CURVE_METRICS:
                row[f"{m}_mean"], _, row[f"{m}_low"], row[f"{m}_high"] = mean_interval(e[m])
            rows.append(row)
        out[group] = pd.DataFrame(rows)
    return out


def phase_rows(specs: list[RunSpec], runs: Path) -> pd.DataFrame:
    rows = []
    for s in specs:
        for phase, metrics in read_result(runs / s.hash, check=()).get("phase_metrics", {}).items():
            for k, v in (metrics or {}).items():
                rows.append({"run": s.hash, **{g: getattr(s, g) for g in GROUP}, "seed": s.seed,
                             "phase": phase, "metric": k, "value": v})
    return pd.DataFrame(rows, columns=["run", *GROUP, "seed", "phase", "metric", "value"])


def group_metrics(summary: pd.DataFrame) -> dict[str, dict]:
    """results/metrics.json: per group its seeds, mean test metric and, where interval_shown allows it,
    its 95% interval (no keys otherwise, as the report prints no interval there)."""
    out = {}
    for r in summary.itertuples():
        lo, hi = r.final_test_acc_ci_low, r.final_test_acc_ci_high
        out[f"{r.experiment}/{r.model}/{r.dataset}"] = {
            "n": int(r.n), "test_acc_mean": r.final_test_acc_mean,
            **({"test_acc_ci_low": lo, "test_acc_ci_high": hi} if interval_shown(r.n, lo, hi, ACCURACY_RANGE) else {}),
            "best_val_test_acc_mean": r.best_test_acc_mean}
    return out


def aggregate(specs: list[RunSpec], manifests: dict[str, dict], test_labels: dict[str, np.ndarray], runs: Path,
              evals: Path, out: Path, profile: str) -> pd.DataFrame:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted aggregate
    runs_df = run_rows(specs, runs, evals)
    summary = summarise(runs_df)
    (tmp / "curves").mkdir(parents=True)
    runs_df.to_csv(tmp / "runs.csv", index=False)
    summary.to_csv(tmp / "summary.csv", index=False)
    for group, df in curves(specs, runs).items():
        df.to_csv(tmp / "curves" / f"{group}.csv", index=False)
    phase_rows(specs, runs).to_csv(tmp / "phases.csv", index=False)
    write_json(tmp / "metrics.json", group_metrics(summary))
    preds = {s.hash: read_npz(evals / s.hash / "predictions.npz")["final_test"] for s in specs}  # verified above
    # The test labels travel with the predictions, so per-example tests need nothing but results/.
    preds.update({f"y_test__{ds}": y for ds, y in test_labels.items()})
    np.savez_compressed(tmp / "predictions.npz", **preds)
    write_json(tmp / "data.json", {"profile": profile, "datasets": {
        ds: {k: m.get(k) for k in ("source", "test_origin", "split_note", "split", "fingerprint")}
        | {"counts": {k: v["count"] for k, v in m["splits"].items()}} for ds, m in manifests.items()}})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return summary

"""DVC stage `evaluate`: the final and the best-on-validation checkpoint of every run, on the
validation and the test split. The test split is only ever measured here, never used to
select anything. A run without a validation split (its experiment's split.val_size 0) has no
best-on-validation checkpoint: its best_* and *_val_* metrics are NaN (null in eval.json). Writes evals/<hash>/{eval.json, predictions.npz}. "acc" is the dataset's metric (l2l/tasks.py):
top-1 accuracy, or mAP on a multi-label dataset.

Nothing is trusted unverified: a run's result.json and every file it records (final.pt, best.pt,
history.csv) are re-hashed before its eval.json is reused or its checkpoints loaded; an eval.json
is reused only if it and its predictions.npz match their recorded sha256 and it evaluates the
run's current final.pt. A mismatch is one line naming the file and what to delete."""
import numpy as np

from l2l import stage
from l2l.config import prepared_plan
from l2l.data import DeviceDataCache
from l2l.engine import RunContext, load_checkpoint, pick_device
from l2l.io import remove_stale_temps, write_atomic, write_record
from l2l.methods import METHODS
from l2l.results import read_eval, read_result
from l2l.selection import load_selection
from l2l.tracking import dataset_inputs, log_to_run


def run() -> None:
    config, specs, _ = prepared_plan(load_selection()[0])
    device = pick_device()
    cache = DeviceDataCache(config.data, device)
    for spec in specs:
        run_dir, out = stage.RUNS / spec.hash, stage.EVALS / spec.hash
        remove_stale_temps(out)  # of an evaluate stage killed while writing
        if not (run_dir / "result.json").exists():
            raise FileNotFoundError(f"{run_dir / 'result.json'}: run not trained (run the train stage first)")
        result = read_result(run_dir)  # re-hashes final.pt, best.pt, history.csv
        if (out / "eval.json").exists() and read_eval(out)["final_sha256"] == result["final_sha256"]:
            continue
        data, num_classes = cache.get(spec)
        ctx = RunContext(spec, data, num_classes, device)
        model = ctx.prepare(METHODS[spec.method].predictor(spec, num_classes))
        metrics, preds = {"final_sha256": result["final_sha256"]}, {}
        for which in ("final", "best"):
            if which == "best" and result["best"]["sha256"] is None:  # no validation split: nothing selected
                metrics.update({f"best_{split}_{m}": float("nan") for split in ("val", "test") for m in ("acc", "loss")})
                continue
            model.load_state_dict(load_checkpoint(run_dir / f"{which}.pt"))  # verified just above
            for split in ("val", "test"):
                ev = ctx.evaluate(model, split)
                metrics[f"{which}_{split}_acc"], metrics[f"{which}_{split}_loss"] = ev["acc"], ev["loss"]
                preds[f"{which}_{split}"] = ev["pred"]  # class ids, or per-class scores (multi-label)
        files = {"predictions.npz": write_atomic(out / "predictions.npz", lambda f: np.savez_compressed(f, **preds))}
        write_record(out / "eval.json", metrics, files)
        # 4 decimals: the accuracy of float32 sums printed as 13.95, not 13.950000330 (MLflow's columns)
        log_to_run(spec.hash, config.profile.name, {k: round(v, 4) for k, v in metrics.items() if k != "final_sha256"},
                   datasets=dataset_inputs(*cache.prepared(spec.dataset), config.data.prepared_dir(spec.dataset),
                                           {"test": "evaluation"}))
        stage.log.info("%s: test acc final %.2f best-val %.2f", spec.hash, metrics["final_test_acc"],
                       metrics["best_test_acc"])


if __name__ == "__main__":
    stage.main(run)

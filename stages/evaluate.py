"""DVC stage `evaluate`: the final and the best-on-validation checkpoint of every run, on the
validation and the test split. The test split is only ever measured here, never used to
select anything. Writes evals/<hash>/{eval.json, predictions.npz}. "acc" is the dataset's metric (l2l/tasks.py):
top-1 accuracy, or mAP on a multi-label dataset."""
import numpy as np

from l2l import stage
from l2l.config import prepared_plan
from l2l.data import DeviceDataCache
from l2l.engine import RunContext, load_checkpoint, pick_device
from l2l.io import read_json, write_json
from l2l.methods import METHODS
from l2l.tracking import log_to_run


def run() -> None:
    config, specs, _ = prepared_plan()
    device = pick_device()
    cache = DeviceDataCache(config.data, device)
    for spec in specs:
        result_path = stage.RUNS / spec.hash / "result.json"
        if not result_path.exists():
            raise FileNotFoundError(f"{result_path}: run not trained (run the train stage first)")
        result = read_json(result_path)
        out = stage.EVALS / spec.hash
        if (out / "eval.json").exists() and read_json(out / "eval.json").get("final_sha256") == result["final_sha256"]:
            continue
        data, num_classes = cache.get(spec)
        ctx = RunContext(spec, data, num_classes, device)
        model = ctx.prepare(METHODS[spec.method].predictor(spec, num_classes))
        metrics, preds = {"final_sha256": result["final_sha256"]}, {}
        for which, sha in (("final", result["final_sha256"]), ("best", result["best"]["sha256"])):
            model.load_state_dict(load_checkpoint(stage.RUNS / spec.hash / f"{which}.pt", sha256=sha))
            for split in ("val", "test"):
                ev = ctx.evaluate(model, split)
                metrics[f"{which}_{split}_acc"], metrics[f"{which}_{split}_loss"] = ev["acc"], ev["loss"]
                preds[f"{which}_{split}"] = ev["pred"]  # class ids, or per-class scores (multi-label)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "predictions.tmp.npz"
        np.savez_compressed(tmp, **preds)
        tmp.replace(out / "predictions.npz")
        write_json(out / "eval.json", metrics)
        log_to_run(spec.hash, config.profile.name, {k: v for k, v in metrics.items() if k != "final_sha256"})
        stage.log.info("%s: test acc final %.2f best-val %.2f", spec.hash, metrics["final_test_acc"],
                       metrics["best_test_acc"])


if __name__ == "__main__":
    stage.main(run)

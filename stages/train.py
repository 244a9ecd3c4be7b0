"""DVC stage `train`: every run of the profile's plan that has no finished result yet.

A run's folder is runs/<hash>/; a finished run has result.json and is never retrained, so
adding a seed or a method trains only the new runs, and an interrupted run resumes from
its last epoch checkpoint.
"""
import traceback

from l2l import stage
from l2l.engine import RunContext, device_info, pick_device, train_run
from l2l.io import write_json
from l2l.methods import METHODS
from l2l.tracking import RunTracker


def run() -> None:
    params, specs, _ = stage.current_plan()
    device = pick_device()
    profile = params["profile"]
    if device.type == "cpu" and profile != "smoke":
        stage.log.warning("profile %r on a CPU: the paper protocols take days here; use a GPU or profile smoke",
                          profile)
    todo = [s for s in specs if not (stage.RUNS / s.hash / "result.json").exists()]
    stage.log.info("plan: %d runs, %d finished, %d to train on %s", len(specs), len(specs) - len(todo), len(todo),
                   device_info(device)["device_name"])
    cache = stage.DeviceDataCache(params, device)
    for i, spec in enumerate(todo, 1):
        run_dir = stage.RUNS / spec.hash
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "spec.json", spec.to_dict())
        stage.log.info("[%d/%d] %s: %s %s %s seed %d", i, len(todo), spec.hash, spec.experiment, spec.model,
                       spec.dataset, spec.seed)
        data, num_classes = cache.get(spec)
        tracker = RunTracker(spec, profile, run_dir, device_info(device))
        try:
            result = train_run(spec, METHODS[spec.method], RunContext(spec, data, num_classes, device), run_dir,
                               on_epoch=tracker.log_epoch, on_resume=tracker.backfill)
        except BaseException as e:  # KeyboardInterrupt too: the MLflow run must not stay RUNNING
            tracker.finish("FAILED" if isinstance(e, Exception) else "KILLED",
                           error="".join(traceback.format_exception_only(e)).strip())
            raise
        tracker.log_metrics({"train_seconds": result["train_seconds"], "best_val_acc": result["best"]["val_acc"],
                             "final_val_acc": result["final"]["val_acc"]})
        tracker.set_tags(result["tags"])
        tracker.log_artifacts(run_dir / "history.csv", run_dir / "final.pt")
        tracker.finish()


if __name__ == "__main__":
    stage.main(run)

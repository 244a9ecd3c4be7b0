"""DVC stage `train`: every run of the profile's plan that has no finished result yet.

A run's folder is runs/<hash>/; a finished run has result.json and is never retrained, so
adding a seed or a method trains only the new runs, and an interrupted run resumes from
its last resume state. A run is trained under its folder's lock: a second train stage (e.g. a
`dvc repro` started while an orphaned one still trains) is refused for that run, naming the PID
that holds it. Where the runs execute (this process, worker processes per GPU, Ray, Slurm) is
params.yaml's `executor` (l2l/executor.py). SIGTERM or Ctrl-C ends the stage and its workers,
their runs marked KILLED in MLflow; runs a killed stage left RUNNING are marked FAILED here.
Progress (l2l/progress.py): a bar for the stage (runs done, ETA from the cost model) and one per run.
"""
from l2l import stage
from l2l.config import prepared_plan
from l2l.cost import load_throughput, pick_timing, run_costs
from l2l.engine import device_info, pick_device
from l2l.executor import run_plan, stop_on_signals
from l2l.io import is_locked
from l2l.selection import load_selection
from l2l.tracking import mark_abandoned


def run() -> None:
    # claims checked now (a claim naming no run of params.yaml fails before any training); the plan
    # narrowed to run.yaml's papers
    config, specs, _ = prepared_plan(load_selection()[0])
    backend = config.executor["backend"]
    profile = config.profile.name
    todo = [s for s in specs if not (stage.RUNS / s.hash / "result.json").exists()]
    where = backend
    if backend == "local":
        device = pick_device()
        where = device_info(device)["device_name"]
        if device.type == "cpu" and profile != "smoke":
            stage.log.warning("profile %r on a CPU: the paper protocols take days here; use a GPU or profile smoke",
                              profile)
    abandoned = mark_abandoned(profile, lambda h: is_locked(stage.RUNS / h))
    if abandoned:
        stage.log.warning("MLflow: %d runs left RUNNING by an ended process marked FAILED (e.g. %s)", len(abandoned),
                          abandoned[0])
    stage.log.info("plan: %d runs, %d finished, %d to train on %s", len(specs), len(specs) - len(todo), len(todo),
                   where)
    estimates = {}
    if todo:  # the stage's ETA: the cost model's per-run estimates (l2l plan's), scaled as runs finish
        costs, _ = run_costs(config, load_throughput(), timing=pick_timing())  # l2l plan's estimate
        estimates = {c.spec.hash: None if c.hours is None else c.hours * 3600 for c in costs}
    run_plan(todo, config, estimates=estimates)


if __name__ == "__main__":
    stop_on_signals()
    stage.main(run)

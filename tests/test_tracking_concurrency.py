"""MLflow under concurrency: 4 worker processes each log 200 epochs through the single writer;
afterwards every step of every metric is in the store exactly once."""
import multiprocessing
import os
from pathlib import Path

import pytest

from l2l.spec import RunSpec
from l2l.tracking import EPOCH_METRICS, RunTracker, single_writer

pytestmark = pytest.mark.slow
WORKERS, STEPS = 4, 200
DEVICE = {"device": "cpu", "device_name": "test", "torch": "-", "cuda": "none"}


def _worker(i: int, root: str) -> None:
    # MLFLOW_TRACKING_URI (the server) is inherited from the parent, as the executor's workers get it.
    # (This module imports no torch: each spawned worker re-imports it.)
    spec = RunSpec("conventional", "conventional", "cnn", "cifar10", i, {"arch": "cnn"}, {"epochs": STEPS}, {}, {})
    tracker = RunTracker(spec, "conc", Path(root) / f"run{i}", DEVICE)
    for step in range(STEPS):
        tracker.log_epoch({**{k: step + i / 10 for k in EPOCH_METRICS}, "global_epoch": step})
    tracker.finish()


def test_four_workers_200_steps_each_every_step_exactly_once(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with single_writer("conc") as uri:
        assert uri.startswith("http://127.0.0.1:") and os.environ["MLFLOW_TRACKING_URI"] == uri
        with single_writer("conc") as again:
            assert again == uri  # a server already given is used, not a second writer
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(i, str(tmp_path))) for i in range(WORKERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert [p.exitcode for p in procs] == [0] * WORKERS
    assert "MLFLOW_TRACKING_URI" not in os.environ
    # The server is gone; read its database directly.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("l2l-conc").experiment_id])
    assert sorted(int(r.data.tags["l2l.seed"]) for r in runs) == list(range(WORKERS))
    for r in runs:
        i = int(r.data.tags["l2l.seed"])
        assert r.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            history = client.get_metric_history(r.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(STEPS)), key  # each step once, none lost
            assert all(m.value == pytest.approx(m.step + i / 10) for m in history)  # no worker's value in another's run

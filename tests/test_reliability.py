"""Nothing trains twice, nothing tampered passes, every expected failure is one line: real stage
processes, killed and raced (os.kill), on tiny plans; every wait polls readiness with a generous
ceiling (never a timed assertion)."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from l2l.config import prepared_plan, resolve_config
from l2l.data import DeviceDataCache
from l2l.engine import RunContext, train_run
from l2l.executor import Worker, _pool
from l2l.checks import RunsFailed
from l2l.io import is_locked, lock_holder, run_lock
from l2l.methods import METHODS
from l2l.tracking import RunTracker, mark_abandoned, single_writer
from tests.conftest import REPO, make_spec, smoke_params, write_npz
from tests.test_pipeline import mlflow_runs, run_stage

pytestmark = pytest.mark.slow
CEILING_S = 300  # a guard against hanging, not a timing: the machine may be loaded


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def stage_process(ws: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=ws, env=_env(),
                          capture_output=True, text=True, timeout=CEILING_S * 2)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The stage failed with exit 2 and one `l2l: error:` line, no traceback; returns the line."""
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("l2l: error: ")]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr
    return errors[0]


def poll(ready, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + CEILING_S
    while not ready():
        if proc is not None and proc.poll() is not None or time.monotonic() > deadline:
            detail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"{what}: not ready (process exit {proc and proc.poll()}); its log:\n{detail}")
        time.sleep(0.1)


def make_workspace(ws: Path, monkeypatch, seeds=(0,), epochs=1, **executor) -> dict:
    params = smoke_params(write_npz(ws / "arrays.npz"), seeds=seeds)
    params["profiles"]["smoke"]["train"]["epochs"] = epochs
    if executor:
        params["executor"] = executor
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(ws)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_stage("data")
    return params


def the_run(ws: Path):

    (spec,) = prepared_plan(resolve_config(yaml.safe_load((ws / "params.yaml").read_text())))[1]
    return spec


def uninterrupted(ws: Path, spec, into: Path) -> Path:
    """The same run trained in one go, in this process: the reference for bit-identity."""

    config = resolve_config(yaml.safe_load((ws / "params.yaml").read_text()))
    data, k = DeviceDataCache(config.data, torch.device("cpu")).get(spec)
    train_run(spec, METHODS[spec.method], RunContext(spec, data, k, torch.device("cpu")), into)
    return into


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tampering ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workspace trained, evaluated and aggregated once; each test tampers with a copy."""
    ws = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    try:
        make_workspace(ws, mp, epochs=2)
        for name in ("train", "evaluate", "aggregate"):
            run_stage(name)
    finally:
        mp.undo()
    return ws


def _edit_json(p: Path) -> None:
    p.write_text(p.read_text().replace('_acc": ', '_acc": 1', 1))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit_csv(p: Path) -> None:
    lines = p.read_text().splitlines()
    lines[1] = lines[1].replace(",", ",9", 1)
    p.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("where, name, damage, stage, expected", [
    ("runs", "result.json", _edit_json, "aggregate", "result.json: contents do not match its recorded sha256"),
    ("evals", "eval.json", _edit_json, "aggregate", "eval.json: contents do not match its recorded sha256"),
    ("runs", "final.pt", _truncate, "evaluate", "final.pt: sha256 does not match result.json"),
    ("runs", "best.pt", _truncate, "evaluate", "best.pt: sha256 does not match result.json"),
    ("runs", "history.csv", _edit_csv, "aggregate", "history.csv: sha256 does not match result.json"),
    ("evals", "predictions.npz", _truncate, "aggregate", "predictions.npz: sha256 does not match eval.json"),
    ("evals", "eval.json", lambda p: p.write_text("{not json"), "evaluate", "eval.json: not valid JSON"),
    ("runs", "result.json", _truncate, "evaluate", "result.json: not valid JSON"),
])
def test_each_tampered_file_is_caught_with_its_name(finished, tmp_path, where, name, damage, stage, expected):
    ws = tmp_path / "ws"
    shutil.copytree(finished, ws)
    (run,) = [p.name for p in (ws / "runs").iterdir()]
    before = (ws / "results/runs.csv").read_bytes()
    damage(ws / where / run / name)
    line = one_line_error(stage_process(ws, stage))
    folder = ws / where / run if where == "runs" else ws / "evals" / run
    assert line.startswith(f"l2l: error: {Path(where) / run / name}: ") or str(folder / name) in line
    assert expected in line and f"delete {Path(where) / run}/" in line
    assert (ws / "results/runs.csv").read_bytes() == before  # nothing tampered reached the results
    assert not (ws / "results.tmp").exists()


def test_aggregate_cleans_a_temp_folder_left_by_a_kill(finished, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(finished, ws)
    (ws / "results.tmp/curves").mkdir(parents=True)
    (ws / "results.tmp/runs.csv").write_text("half written")
    shutil.rmtree(ws / "evals")  # and the aggregate fails: the stale folder is gone all the same
    assert "not evaluated" in one_line_error(stage_process(ws, "aggregate"))
    assert not (ws / "results.tmp").exists()


# --- MLflow bookkeeping ---------------------------------------------------------------------

def test_runs_left_running_are_marked_failed_unless_their_folder_is_locked(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    device = {"device": "cpu", "device_name": "t", "torch": "-", "cuda": "none"}
    dead, alive = make_spec(seed=0), make_spec(seed=1)
    for s in (dead, alive):
        RunTracker(s, "smoke", tmp_path / "runs" / s.hash, device)  # RUNNING, never finished
    with run_lock(tmp_path / "runs" / alive.hash):
        assert mark_abandoned("smoke", lambda h: is_locked(tmp_path / "runs" / h)) == [dead.hash]
    client, runs = mlflow_runs(tmp_path)
    status = {r.data.tags["l2l.run_hash"]: (r.info.status, r.data.tags.get("l2l.error", "")) for r in runs}
    assert status[dead.hash][0] == "FAILED" and "left RUNNING" in status[dead.hash][1]
    assert status[alive.hash] == ("RUNNING", "")


# --- real processes, killed and raced ------------------------------------------------------

HANGING_TRAINER = """
import dataclasses, sys, threading
from l2l.methods import METHODS
real = METHODS["conventional"].phases
def phases(spec, ctx):  # a trainer that stops mid epoch 2 for good (a stand-in for a long run)
    for phase in real(spec, ctx):
        step, seen = phase.step, []
        def hanging(x, y, step=step, seen=seen):
            seen.append(1)
            if len(seen) > {per_epoch}:
                threading.Event().wait()
            return step(x, y)
        phase.step = hanging
        yield phase
METHODS["conventional"] = dataclasses.replace(METHODS["conventional"], phases=phases)
sys.argv = ["train"]
import runpy
runpy.run_path("{train}", run_name="__main__")
"""


def hanging_trainer(tmp_path, monkeypatch, stderr=subprocess.STDOUT):
    """A 3-epoch one-run workspace and a train stage process on it, hung in epoch 2 after epoch 1's
    resume state; returns (workspace, spec, run folder, process, its log)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    make_workspace(ws, monkeypatch, epochs=3)
    spec = the_run(ws)
    run_dir = ws / "runs" / spec.hash
    log = ws / "trainer.log"
    script = HANGING_TRAINER.format(per_epoch=200 // 50, train=REPO / "stages/train.py")  # 200 images, batch 50
    with open(log, "w") as f:
        a = subprocess.Popen([sys.executable, "-c", script], cwd=ws, env=_env(), stdout=f, stderr=stderr, text=True)
    poll(lambda: (run_dir / "last.pt.json").exists(), "trainer's epoch 1", a, log)
    return ws, spec, run_dir, a, log


def test_second_trainer_refused_then_kill_9_resumes_bit_identical_and_logs_once(tmp_path, monkeypatch):
    ws, spec, run_dir, a, log = hanging_trainer(tmp_path, monkeypatch)
    try:
        line = one_line_error(stage_process(ws, "train"))  # `dvc repro` again while the first still trains
        assert f"{run_dir.relative_to(ws)}: being trained by PID {a.pid} on " in line
        assert not (run_dir / "result.json").exists()
    finally:
        a.kill()  # kill -9
        a.wait()
    out = stage_process(ws, "train")
    assert out.returncode == 0, out.stderr
    assert "runs left RUNNING by an ended process marked FAILED" in out.stderr and "resuming after phase 0 epoch 1" in out.stderr
    ref = uninterrupted(ws, spec, tmp_path / "ref")
    for name in ("final.pt", "best.pt"):
        assert same_weights(run_dir / name, ref / name), name
    client, (run,) = mlflow_runs(ws)
    assert run.info.status == "FINISHED" and "l2l.error" not in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == [0, 1, 2]
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "last.pt").exists()


def test_sigterm_ends_the_train_stage_in_one_line_and_marks_the_run_killed(tmp_path, monkeypatch):
    ws, spec, run_dir, a, log = hanging_trainer(tmp_path, monkeypatch, stderr=subprocess.PIPE)
    a.send_signal(signal.SIGTERM)
    _, err = a.communicate(timeout=CEILING_S)
    assert a.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("l2l: stopped by SIGTERM")
    client, (run,) = mlflow_runs(ws)
    assert run.info.status == "KILLED" and "stopped by SIGTERM" in run.data.tags["l2l.error"]

    assert not is_locked(run_dir)


def test_a_killed_pool_worker_fails_only_its_own_run(tmp_path, monkeypatch):
    """Two worker processes; one is killed -9 mid-run: that run alone fails (marked FAILED in MLflow),
    the other finishes; re-running trains only the killed one, resuming it."""


    params = make_workspace(tmp_path, monkeypatch, seeds=(0, 1), epochs=40)
    config, specs, _ = prepared_plan(resolve_config(params))
    victim = tmp_path / "runs" / specs[0].hash

    def kill_victim_mid_run():
        def watch():
            deadline = time.monotonic() + CEILING_S
            while time.monotonic() < deadline:
                holder = lock_holder(victim / ".lock") if (victim / ".lock").exists() else ""
                if (victim / "last.pt.json").exists() and holder.startswith("PID ") and not (victim / "result.json").exists():
                    os.kill(int(holder.split()[1]), signal.SIGKILL)
                    return
                time.sleep(0.05)
        threading.Thread(target=watch, daemon=True).start()

    worker = Worker(str(tmp_path), cpu_threads=1)
    with single_writer("smoke") as uri:
        kill_victim_mid_run()
        with pytest.raises(RunsFailed) as e:
            _pool(specs, "smoke", config.data, replace(worker, tracking_uri=uri), slots=[None, None])
    msg = str(e.value)
    assert msg.startswith(f"1 of 2 runs failed; first: {specs[0].hash} ") and "died (signal SIGKILL)" in msg
    assert (tmp_path / "runs" / specs[1].hash / "result.json").exists() and not (victim / "result.json").exists()
    client, runs = mlflow_runs(tmp_path)
    status = {r.data.tags["l2l.run_hash"]: r.info.status for r in runs}
    assert status == {specs[0].hash: "FAILED", specs[1].hash: "FINISHED"}
    run_stage("train")
    client, runs = mlflow_runs(tmp_path)
    for r in runs:
        assert r.info.status == "FINISHED" and "l2l.error" not in r.data.tags
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc")) == list(range(40))


POOL_STAGE = """
from l2l import stage
from l2l.config import prepared_plan
from l2l.executor import Worker, _pool, stop_on_signals
from l2l.tracking import single_writer

def run():
    config, specs, _ = prepared_plan()
    with single_writer("smoke") as uri:
        _pool(specs, "smoke", config.data, Worker({root!r}, tracking_uri=uri, cpu_threads=1), slots=[None, None])

stop_on_signals()
stage.main(run)
"""


def test_sigterm_ends_a_worker_pool_and_its_runs_resume(tmp_path, monkeypatch):
    """The train stage's parent signalled (as `kill <pid>` or a scheduler does): both worker
    processes end, their MLflow runs KILLED, their locks free; the next train stage resumes both."""
    params = make_workspace(tmp_path, monkeypatch, seeds=(0, 1), epochs=40)
    specs = prepared_plan(resolve_config(params))[1]
    log = tmp_path / "pool.log"
    with open(log, "w") as f:
        parent = subprocess.Popen([sys.executable, "-c", POOL_STAGE.format(root=str(tmp_path))], cwd=tmp_path,
                                  env=_env(), stdout=f, stderr=subprocess.STDOUT)
    dirs = [tmp_path / "runs" / s.hash for s in specs]
    poll(lambda: all((d / "last.pt.json").exists() for d in dirs), "both workers' first epoch", parent, log)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=CEILING_S) == 130, log.read_text()[-3000:]
    assert log.read_text().strip().splitlines()[-1].startswith("l2l: stopped by SIGTERM")
    assert not any(is_locked(d) for d in dirs)  # no worker left training
    client, runs = mlflow_runs(tmp_path)
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]
    unfinished = [d for d in dirs if not (d / "result.json").exists()]
    assert unfinished  # 40 epochs each: at least one was stopped mid-run
    run_stage("train")
    client, runs = mlflow_runs(tmp_path)
    for r in runs:
        assert r.info.status == "FINISHED" and "l2l.error" not in r.data.tags
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc")) == list(range(40))

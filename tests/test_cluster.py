"""Remote backends under faults, rehearsed on one machine with real processes: a two-node Ray
cluster (`ray start --head`, `ray start --address`, each its own process tree) losing a worker and
then a node mid-run; submitit jobs training two runs each, preempted, timed out, killed; the local
pool losing a worker. Each fault must end with every run trained once: final.pt as the local
backend's (sha256), one MLflow run per run, each epoch logged once; a fault that is final is one
line naming its error. Tracking for remote workers: a loopback URI, an unreachable one, a server
refusing the workers' Host header are one line before anything is submitted; the stage's MLflow
server is known to be its own (a port taken meanwhile is never mistaken for it).

Every wait polls readiness with a generous ceiling (never a timed assertion); a process is caught
mid-run by stopping it (SIGSTOP) and checking its run is unfinished before it is hit.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from l2l.checks import ClusterError, ConfigError, RunsFailed
from l2l.cluster import (allowed_hosts, is_loopback, job_error, ray_slots, spans_machines, this_machine,
                         tracking_problem, workers_tracking)
from l2l.config import EXECUTOR, prepared_plan, resolve_config
from l2l.checks import resolve
from l2l.executor import JOB_SIGNALS, Worker, _pool
from l2l import tracking
from tests.conftest import REPO, smoke_params, write_npz
from tests.test_pipeline import mlflow_runs, run_stage

CEILING_S = 600  # a guard against hanging, not a timing: the machine may be loaded
EPOCHS = 8       # long enough to catch a run between its first resume state and its end
# A job hit twice is first hit with half its runs' epochs left, so the job after it trains long enough to
# be caught too (a catch missed is a failure naming it, never a wrong verdict).
LEFT_FOR_NEXT = EPOCHS // 2
TRACKING = resolve(EXECUTOR, {}, "executor")["tracking"]


# --- helpers ----------------------------------------------------------------------------------

def workspace(ws: Path, monkeypatch, seeds, **executor) -> list:
    """A tiny plan (one run per seed, EPOCHS epochs) with its data prepared; its RunSpecs."""
    params = smoke_params(write_npz(ws / "arrays.npz"), seeds=seeds)
    params["profiles"]["smoke"]["train"]["epochs"] = EPOCHS
    # CPU results depend on the thread count. A resume state after every epoch (smoke_params' setting,
    # kept here): with the default 60 s the only one is the last epoch's, so a run "mid-run" had nothing
    # left to train and could write its result before a signal's effect reached it.
    params["executor"] = {"cpu_threads": 1, "checkpoint_min_seconds": 0, **executor}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(ws)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_stage("data")
    return prepared_plan(resolve_config(params))[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A train stage run in this process sets torch's threads (executor.cpu_threads 1): restored after,
    so tests after these train their references with this process's own count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    """Run hash -> sha256 of final.pt, trained by the local backend (seeds 0-3)."""
    mp, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    try:
        ws = tmp_path_factory.mktemp("local")
        specs = workspace(ws, mp, seeds=(0, 1, 2, 3))
        run_stage("train")
        return {s.hash: sha256(ws / "runs" / s.hash / "final.pt") for s in specs}
    finally:
        mp.undo()
        torch.set_num_threads(threads)


def assert_trained_once_as_local(ws: Path, specs, reference) -> None:
    """Every run finished with the local backend's final.pt; one FINISHED MLflow run per run, without
    an error tag, each epoch logged once."""
    for s in specs:
        assert sha256(ws / "runs" / s.hash / "final.pt") == reference[s.hash], s.hash
    client, runs = mlflow_runs(ws)
    assert sorted(r.data.tags["l2l.run_hash"] for r in runs) == sorted(s.hash for s in specs)
    for r in runs:
        assert r.info.status == "FINISHED" and "l2l.error" not in r.data.tags, r.data.tags.get("l2l.error")
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc")) == list(range(EPOCHS))


def env(**extra) -> dict:
    out = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def start_stage(ws: Path, log: Path, **extra) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(REPO / "stages" / "train.py")], cwd=ws, env=env(**extra),
                                stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=CEILING_S)
    except subprocess.TimeoutExpired:
        for p in tree(proc.pid):
            p.kill()
        pytest.fail(f"the train stage did not end; its log:\n{log.read_text()[-5000:]}")
    return log.read_text()


def one_line_error(code: int, text: str) -> str:
    """The stage failed with exit 2 and one `l2l: error:` line as its last, no traceback; the line."""
    assert code == 2 and "Traceback" not in text, text[-5000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("l2l: error: ")]
    assert len(errors) == 1 and text.strip().splitlines()[-1] == errors[0], text[-5000:]
    return errors[0]


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def send(procs, sig) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def mid_run(ws: Path, specs, since: float = 0.0, left: int = 1) -> list:
    """Runs with a resume state (saved after `since`, a time stamp) with at least `left` epochs to train
    after it (its record's epoch, of the plan's one phase of EPOCHS), and no result yet. Epochs left: a run
    whose last epoch's state is saved has only its result to write, so a fault sent then tests no resume."""
    out = []
    for s in specs:
        state = ws / "runs" / s.hash / "last.pt.json"
        try:
            saved = state.stat().st_mtime
            epoch = json.loads(state.read_text())["epoch"]  # written whole (renamed into place)
        except FileNotFoundError:
            continue
        if saved > since and EPOCHS - 1 - epoch >= left and not (ws / "runs" / s.hash / "result.json").exists():
            out.append(s)
    return out


def trainers(ws: Path, specs, procs, since: float = 0.0, left: int = 1) -> list:
    """Runs mid-run whose trainer (the PID its folder's lock names) is one of `procs`: (spec, process) each."""
    by_pid = {p.pid: p for p in procs}
    out = []
    for s in mid_run(ws, specs, since, left):
        holder = (ws / "runs" / s.hash / ".lock").read_text().split()
        if holder[:1] == ["PID"] and int(holder[1]) in by_pid:
            out.append((s, by_pid[int(holder[1])]))
    return out


def caught(processes, condition, what: str, stage: subprocess.Popen, log: Path):
    """Poll until `condition()` holds, then stop `processes()` (SIGSTOP) and check it still holds;
    returns (the stopped processes, condition's value) with them stopped (the caller hits and resumes them)."""
    deadline = time.monotonic() + CEILING_S
    while time.monotonic() < deadline:
        if stage.poll() is not None:
            pytest.fail(f"{what}: the stage ended first (exit {stage.returncode}); its log:\n{log.read_text()[-5000:]}")
        if condition():
            procs = processes()
            send(procs, signal.SIGSTOP)
            value = condition()
            if value and procs:
                return procs, value
            send(procs, signal.SIGCONT)
        time.sleep(0.02)
    pytest.fail(f"{what}: not seen within {CEILING_S} s; the stage's log:\n{log.read_text()[-5000:]}")


# --- tracking for remote workers, and the stage's own server --------------------------------------

def test_loopback_and_machine_checks():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    outside = [a for a in this_machine() if a.count(".") == 3 and not is_loopback(a)]
    assert outside and not is_loopback(outside[0])
    assert not spans_machines(["127.0.0.1", outside[0]])  # Ray names this machine by its address
    assert spans_machines([outside[0], "203.0.113.9"])    # a node elsewhere (TEST-NET-3)
    assert ray_slots({"CPU": 8.0, "GPU": 2.0}, 1, 0.5) == 4 and ray_slots({"CPU": 8.0}, 2, 0) == 4
    assert ray_slots({"CPU": 8.0}, 1, 1.0) == 0  # no GPU node up yet: nothing runs until one joins


@pytest.mark.parametrize("tracking_cfg, uri, message", [
    ({}, None, "params.yaml: executor.tracking.host: slurm workers on other machines cannot reach MLflow on this "
               "machine's loopback; expected 0.0.0.0 or this node's cluster address"),
    ({"host": "0.0.0.0", "worker_uri": "http://localhost:5000"}, None,
     "params.yaml: executor.tracking.worker_uri: slurm workers on other machines cannot reach MLflow on this "
     "machine's loopback"),
    ({}, "http://127.0.0.1:5000", "MLFLOW_TRACKING_URI: http://127.0.0.1:5000 is this machine's loopback: slurm "
                                  "workers on other machines cannot reach it"),
])
def test_remote_workers_refuse_a_loopback_uri_before_any_server(tracking_cfg, uri, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    if uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "mlflow_server", lambda *a, **k: pytest.fail("a server was started"))
    with pytest.raises(ConfigError) as e:
        with workers_tracking("smoke", {**TRACKING, **tracking_cfg}, str(tmp_path), remote=True, backend="slurm"):
            pytest.fail("workers were given a URI")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_an_unreachable_tracking_uri_is_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    problem = tracking_problem(f"http://127.0.0.1:{port}", "l2l-smoke", timeout_s=2)
    assert problem.startswith(f"MLflow at http://127.0.0.1:{port} does not answer (ConnectionRefusedError")
    assert "\n" not in problem


def test_an_unreachable_tracking_server_fails_remote_workers_in_one_line_before_any_client_waits(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = next(a for a in sorted(this_machine()) if a.count(".") == 3 and not is_loopback(a))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{address}:{port}")
    monkeypatch.setattr(tracking, "client", lambda: pytest.fail("MLflow's client was asked"))
    with pytest.raises(ClusterError) as e:
        with workers_tracking("smoke", TRACKING, str(tmp_path), remote=True, backend="slurm"):
            pytest.fail("workers were given a URI")
    assert str(e.value).startswith(f"slurm: MLFLOW_TRACKING_URI: MLflow at http://{address}:{port} does not answer "
                                   "(ConnectionRefusedError") and str(e.value).endswith("; nothing submitted")
    assert "\n" not in str(e.value)


def _answering_server() -> http.server.HTTPServer:
    """Another HTTP server, answering 200 to everything (as a stranger on a port would)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.slow
def test_the_stage_server_is_its_own_and_workers_on_other_nodes_pass_its_checks(tmp_path, monkeypatch):
    """A free port that another server takes before mlflow binds it is never mistaken for the stage's
    (a fixed port taken is one error naming it); a server opened to the machine's network accepts the
    workers' Host header, refuses another, and passes the remote workers' checks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stranger = _answering_server()
    taken = stranger.server_address[1]
    chosen = iter([taken])
    free = tracking._free_port
    monkeypatch.setattr(tracking, "_free_port", lambda host="127.0.0.1": next(chosen, None) or free(host))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.mlflow_server(store) as uri:
        port = int(uri.rsplit(":", 1)[1])
        assert port != taken and tracking_problem(uri, "Default") is None  # the store's own experiment
    with pytest.raises(RuntimeError, match=rf"on 127.0.0.1:{taken} exited with status \d+; the port is taken by "
                                           "another process; its log: "):
        with tracking.mlflow_server(store, port=taken):
            pytest.fail("another process's server accepted as the stage's")
    stranger.shutdown()

    address = next(a for a in sorted(this_machine()) if a.count(".") == 3 and not is_loopback(a))
    with workers_tracking("smoke", {**TRACKING, "host": address}, str(tmp_path), remote=True, backend="slurm") as uri:
        assert uri.startswith(f"http://{address}:")
        assert tracking_problem(uri, "l2l-smoke", str(tmp_path)) is None
        # a request naming a host the server was not told about (DNS rebinding): refused
        req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=l2l-smoke",
                                     headers={"Host": "elsewhere.example:80"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 403
    assert allowed_hosts("node1")[-2:] == ["node1", "node1:*"]


@pytest.mark.slurm
@pytest.mark.slow
def test_remote_slurm_with_a_loopback_tracking_uri_fails_in_one_line_before_submitting(tmp_path, monkeypatch):
    workspace(tmp_path, monkeypatch, seeds=(0,), backend="slurm")  # slurm.cluster: slurm, tracking: defaults
    out = subprocess.run([sys.executable, str(REPO / "stages" / "train.py")], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=CEILING_S)
    line = one_line_error(out.returncode, out.stderr)
    assert line == ("l2l: error: params.yaml: executor.tracking.host: slurm workers on other machines cannot reach "
                    "MLflow on this machine's loopback; expected 0.0.0.0 or this node's cluster address for host "
                    "(or worker_uri: a server the workers reach), got '127.0.0.1'")
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "runs").exists()  # nothing submitted


# --- the local pool ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_pool_worker_is_retried_first_on_its_slot(tmp_path, monkeypatch, reference):
    """max_retries 1: the run whose worker was killed -9 mid-run is trained by the worker that replaces
    it (before the queue's next run) and resumes; every run as the local backend's, logged once."""
    specs = workspace(tmp_path, monkeypatch, seeds=(0, 1, 2))
    config = resolve_config(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    killed = []

    def kill_one_mid_run():
        deadline = time.monotonic() + CEILING_S
        while time.monotonic() < deadline and not killed:
            for s in mid_run(tmp_path, specs[:2]):
                holder = (tmp_path / "runs" / s.hash / ".lock").read_text().split()
                if holder[:1] == ["PID"]:
                    p = psutil.Process(int(holder[1]))
                    p.suspend()
                    if not (tmp_path / "runs" / s.hash / "result.json").exists():
                        p.kill()
                        killed.append(s)
                        return
                    p.resume()
            time.sleep(0.02)

    threading.Thread(target=kill_one_mid_run, daemon=True).start()
    worker = Worker(str(tmp_path), cpu_threads=1, max_retries=1)
    with tracking.single_writer("smoke") as uri:
        _pool(specs, "smoke", config.data, replace(worker, tracking_uri=uri), slots=[None, None])
    assert killed, "no run was caught mid-run"
    assert_trained_once_as_local(tmp_path, specs, reference)


# --- Slurm (submitit's local executor), two runs per job ------------------------------------------

def job_process(stage: subprocess.Popen, exclude=()) -> psutil.Process | None:
    """The running job's main process (submitit's _submit, below the stage and the local controller)."""
    for p in tree(stage.pid):
        try:
            if "submitit.core._submit" in " ".join(p.cmdline()) and p.pid not in exclude:
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def slurm_signal_job(ws, specs, stage, log, sigs=(signal.SIGUSR2,), exclude=(), left=1) -> psutil.Process:
    """Slurm's way: `sigs` to every process of the running job (its main process, the workers training
    its runs, their helpers), caught while a worker of the job trains a run with `left` epochs or more (the
    lock's PID, not a time stamp: a process's start time is known to the second only). Returns the
    job's main process. Signals that do not kill: the workers caught training resume only once the job
    has sent them its SIGINT (seen pending in the kernel), so what they do meanwhile does not depend on
    the scheduler; a run caught unfinished stays unfinished and resumes in the next job."""
    def job_tree():
        return tree(job.pid) if (job := job_process(stage, exclude)) else []

    procs, training = caught(job_tree, lambda: trainers(ws, specs, job_tree(), left=left), "a job's worker mid-run",
                             stage, log)
    if signal.SIGKILL not in sigs:  # only the job's own process acts on Slurm's signals (submitit's handler)
        helpers = [(p.pid, " ".join(p.cmdline())[-60:]) for p in procs[1:] for sig in JOB_SIGNALS if acts_on(p, sig)]
        assert len(procs) >= 3 and not helpers, helpers  # the job, its two workers (and their helpers)
    for sig in sigs:
        send(procs, sig)
    if signal.SIGKILL not in sigs:
        held = {p.pid for _, p in training}
        send([p for p in procs if p.pid not in held], signal.SIGCONT)
        deadline = time.monotonic() + CEILING_S
        while not all(pending(p, signal.SIGINT) for p in procs if p.pid in held):
            if time.monotonic() > deadline:
                send(procs, signal.SIGCONT)
                pytest.fail(f"the job did not stop its workers {sorted(held)} (SIGINT) after {sigs}; its log:\n"
                            f"{job_logs(ws)[-5000:]}")
            time.sleep(0.02)
    send(procs, signal.SIGCONT)
    return procs[0]


def acts_on(p: psutil.Process, sig: int) -> bool:
    """Whether signal `sig` delivered to `p` now would be acted on (neither ignored nor blocked): read
    from the kernel's masks (/proc/<pid>/status), not from timing."""
    status = Path(f"/proc/{p.pid}/status").read_text()
    masks = {k: int(v, 16) for k, v in re.findall(r"^(SigBlk|SigIgn):\s+([0-9a-f]+)$", status, re.M)}
    return not (masks["SigBlk"] | masks["SigIgn"]) & (1 << (sig - 1))


def pending(p: psutil.Process, sig: int) -> bool:
    """Whether signal `sig` was sent to `p` and awaits delivery (a stopped process keeps it pending): read
    from the kernel (/proc/<pid>/status, the thread's and the process's pending sets)."""
    status = Path(f"/proc/{p.pid}/status").read_text()
    sets = {k: int(v, 16) for k, v in re.findall(r"^(SigPnd|ShdPnd):\s+([0-9a-f]+)$", status, re.M)}
    return bool((sets["SigPnd"] | sets["ShdPnd"]) & (1 << (sig - 1)))


def job_logs(ws: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((ws / "slurm").glob("*_log.*")))


SLURM = {"backend": "slurm", "runs_per_gpu": 2, "slurm": {"cluster": "local", "gpus_per_task": 1}}


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_multi_run_job_preempted_requeues_and_every_run_resumes(tmp_path, monkeypatch, reference):
    """SIGTERM then USR2 to every process of a job training two runs (Slurm preempting it; submitit's own
    rehearsal of a preemption sends the same): the job requeues itself (submitit: "preempted"), its
    workers act on neither signal and are stopped by the job (runs KILLED, not failed), both runs
    resume into their MLflow runs and end as the local backend's."""
    specs = workspace(tmp_path, monkeypatch, seeds=(0, 1), **SLURM)
    log = tmp_path / "stage.log"
    stage = start_stage(tmp_path, log)
    slurm_signal_job(tmp_path, specs, stage, log, sigs=(signal.SIGTERM, signal.SIGUSR2))
    text = finish(stage, log)
    assert stage.returncode == 0, text[-5000:]
    logs = job_logs(tmp_path)
    assert "this job is preempted" in logs and "Requeued job" in logs, logs[-5000:]
    assert "died" not in logs and "FAILED" not in text, logs[-5000:]
    assert "continuing MLflow run" in logs  # a run resumed into its own MLflow run
    assert_trained_once_as_local(tmp_path, specs, reference)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_multi_run_job_timed_out_requeues_then_dies_for_good_in_one_line(tmp_path, monkeypatch, reference):
    """A job of two runs timed out (USR2 to every process, as Slurm signals a job near its time limit;
    with a limit of 10 min submitit counts any such signal as a timeout, not a preemption): requeued once
    (slurm.max_requeue 1) and its runs resume; timed out again: the job is done for, and the stage says
    so in one line with the job's error, not a log path. The next stage resumes both runs to the local
    backend's result."""
    specs = workspace(tmp_path, monkeypatch, seeds=(0, 1), **{**SLURM, "slurm": {
        **SLURM["slurm"], "timeout_min": 10, "max_requeue": 1}})
    log = tmp_path / "stage.log"
    stage = start_stage(tmp_path, log)
    first = slurm_signal_job(tmp_path, specs, stage, log, left=LEFT_FOR_NEXT)
    slurm_signal_job(tmp_path, specs, stage, log, exclude={first.pid})  # the requeued job
    text = finish(stage, log)
    line = one_line_error(stage.returncode, text)
    assert re.fullmatch(r"l2l: error: \d of 2 runs failed; first: \w+ \(conventional/cnn/cifar10/s\d\): RuntimeError: "
                        r"slurm job \d+: UncompletedJobError: Job not requeued because: timed-out too many times\.",
                        line), line
    logs = job_logs(tmp_path)
    timeouts = {m for m in re.findall(r"\(([\d:, -]+)\) - Caught signal SIGUSR2 on \S+: this job is timed-out", logs)}
    assert len(timeouts) == 2 and "Requeued job" in logs, logs[-5000:]  # two signals (each logged by two handlers)
    client, runs = mlflow_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # stopped runs say so
    run_stage("train")
    assert_trained_once_as_local(tmp_path, specs, reference)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_killed_is_resubmitted_then_fails_for_good_in_one_line(tmp_path, monkeypatch, reference):
    """Every process of a two-run job killed -9 (its node lost): the job is resubmitted with its
    unfinished runs (max_retries 1), which resume; killed again: the stage fails in one line naming the
    job's end, not its log path, and the runs left RUNNING are marked FAILED. The next stage resumes them."""
    specs = workspace(tmp_path, monkeypatch, seeds=(0, 1), max_retries=1, **SLURM)
    log = tmp_path / "stage.log"
    stage = start_stage(tmp_path, log)
    first = slurm_signal_job(tmp_path, specs, stage, log, sigs=(signal.SIGKILL,), left=LEFT_FOR_NEXT)
    slurm_signal_job(tmp_path, specs, stage, log, sigs=(signal.SIGKILL,), exclude={first.pid})
    text = finish(stage, log)
    assert re.search(r"slurm job \d+ \(2 runs\): ended without a result \(state [A-Z]+\); its log ends: .*; "
                     r"resubmitted as job \d+ with its [12] unfinished runs \(retry 1 of 1\)", text), text[-5000:]
    line = one_line_error(stage.returncode, text)
    assert re.fullmatch(r"l2l: error: [12] of 2 runs failed; first: \w+ \(conventional/cnn/cifar10/s\d\): RuntimeError: "
                        r"slurm job \d+: ended without a result \(state [A-Z]+\); its log ends: .*", line), line
    assert "_log." not in line  # the error, not where to look for it
    client, runs = mlflow_runs(tmp_path)
    left = {s.hash for s in specs if not (tmp_path / "runs" / s.hash / "result.json").exists()}
    # a run killed before its worker opened its MLflow run has none to mark (hit early, as a catch may be)
    tracked = {r.data.tags["l2l.run_hash"] for r in runs}
    assert {r.data.tags["l2l.run_hash"] for r in runs if r.info.status == "FAILED"} == left & tracked
    assert not [r for r in runs if r.info.status == "RUNNING"]
    run_stage("train")
    assert_trained_once_as_local(tmp_path, specs, reference)


@pytest.mark.slurm
def test_job_error_lines():
    from submitit.core.utils import FailedJobError, UncompletedJobError

    failed = FailedJobError("Job (task=0) failed during processing with trace:\n----------------------\n"
                            "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                            "l2l.checks.RunsFailed: 1 of 2 runs failed; first: abc (x): ValueError: bad\n"
                            "----------------------\nYou can check full logs with 'job.stderr(0)' and "
                            "'job.stdout(0)'or at paths:\n  - /tmp/slurm/1_0_log.err\n")
    assert job_error(failed) == "RunsFailed: 1 of 2 runs failed; first: abc (x): ValueError: bad"
    dead = UncompletedJobError("Job 7_0 (task: 0) with path /tmp/slurm/7_0_result.pkl\nhas not produced any "
                               "output (state: NODE_FAIL)\nError stream produced:\n" + "-" * 40 +
                               "\n2026 INFO epoch 3\nslurmstepd: error: *** JOB 7 ON n1 CANCELLED DUE TO NODE "
                               "FAILURE ***\n")
    assert job_error(dead) == ("ended without a result (state NODE_FAIL); its log ends: slurmstepd: error: *** JOB 7 "
                               "ON n1 CANCELLED DUE TO NODE FAILURE ***")


# --- Ray: two nodes on this machine, each its own process tree -------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ray_nodes(tmp_path_factory):
    """A Ray head and a second node (`ray start --address`) on 127.0.0.1, one CPU each, token
    authentication; yields (address, environment, the second node's `ray start` process). The
    rehearsal kills the second node: it comes last."""
    tmp_path = tmp_path_factory.mktemp("ray")
    temp = tempfile.mkdtemp(prefix="l2lray-")  # short: Ray's socket paths live below it
    ray_env = env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
                  RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="5")
    port = free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
              f"--temp-dir={temp}"]
    nodes = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = tmp_path / f"ray-{name}.log"
        with open(log, "w") as f:
            nodes.append((subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", *common, *args,
                                            f"--dashboard-agent-listen-port={free_port()}"],
                                           env=ray_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), log))
        proc = nodes[-1][0]
        deadline = time.monotonic() + CEILING_S
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray {name} did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        return proc

    try:
        start("head", "--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
              f"--ray-client-server-port={free_port()}")
        second = start("node", f"--address=127.0.0.1:{port}")
        out = subprocess.run([sys.executable, "-c", (
            "import ray, time\n"
            f"ray.init(address='127.0.0.1:{port}', logging_level='ERROR')\n"
            "t = time.monotonic() + 300\n"
            "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.monotonic() < t: time.sleep(0.5)\n"
            "print(sum(n['Alive'] for n in ray.nodes()))\n")], env=ray_env, capture_output=True, text=True,
            timeout=CEILING_S)
        assert out.stdout.strip().splitlines()[-1:] == ["2"], out.stdout + out.stderr
        yield f"127.0.0.1:{port}", ray_env, second
    finally:
        for proc, _ in reversed(nodes):
            send(tree(proc.pid), signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def run_on(ws: Path, specs, node_procs, since: float = 0.0):
    """A run mid-run whose trainer (the PID its folder's lock names) is a process of `node_procs`:
    (its spec, that process), or None."""
    return next(iter(trainers(ws, specs, node_procs, since)), None)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_nodes_that_cannot_reach_mlflow_fail_in_one_line_before_any_run(tmp_path, monkeypatch, two_ray_nodes):
    """Before any run is submitted, a probe on every node checks it can train (this checkout's l2l,
    runs/ shared, the prepared data, MLflow answering): a worker URI nothing answers is one line."""
    address, ray_env, _ = two_ray_nodes
    port = free_port()
    workspace(tmp_path, monkeypatch, seeds=(0,), backend="ray", ray={"address": address},
              tracking={"worker_uri": f"http://127.0.0.1:{port}"})
    log = tmp_path / "stage.log"
    stage = start_stage(tmp_path, log, **{k: v for k, v in ray_env.items() if k.startswith("RAY_")})
    line = one_line_error(finish(stage, log) and stage.returncode, log.read_text())
    assert re.fullmatch(rf"l2l: error: ray: node \S+: MLflow at http://127.0.0.1:{port} does not answer "
                        r"\(ConnectionRefusedError: .*\); nothing submitted", line), line
    assert list((tmp_path / "runs").iterdir()) == []  # no run started, the probe's file removed


@pytest.mark.ray
@pytest.mark.slow
def test_ray_two_nodes_lose_a_worker_then_a_node_and_every_run_ends_as_local(tmp_path, monkeypatch, reference,
                                                                              two_ray_nodes):
    """Four runs on a head and a second node (one CPU each). The worker training a run on the second
    node is killed -9 mid-run: that run is retried first (before the queue's next) and resumes; then
    the whole second node is killed mid-run (raylet, agents, workers): its run is retried first on the
    head. Every run ends with the local backend's final.pt, one MLflow run each, each epoch once."""
    address, ray_env, second = two_ray_nodes
    specs = workspace(tmp_path, monkeypatch, seeds=(0, 1, 2, 3), backend="ray", ray={"address": address})
    log = tmp_path / "stage.log"
    stage = start_stage(tmp_path, log, **{k: v for k, v in ray_env.items() if k.startswith("RAY_")})

    stopped, (victim, worker) = caught(lambda: [found[1]] if (found := run_on(tmp_path, specs, tree(second.pid)))
                                       else [], lambda: run_on(tmp_path, specs, tree(second.pid)),
                                       "a run training on the second node", stage, log)
    send(stopped, signal.SIGKILL)  # the worker process alone
    killed_at = time.time()
    stopped, (lost, _) = caught(lambda: tree(second.pid),
                                lambda: run_on(tmp_path, specs, tree(second.pid), since=killed_at),
                                "a run training on the second node after the worker kill", stage, log)
    send(stopped, signal.SIGKILL)  # the node: every process of its tree
    text = finish(stage, log)
    assert stage.returncode == 0, text[-5000:]
    found = list(re.finditer(r"WARNING l2l.executor: (\w+) \(\S+\): (\w+): .*; retry (\d) of 2, first in the queue",
                             text))
    retries = [m.groups() for m in found]
    # the retried victim may train on the second node again and be the run the node takes down: its 2nd retry
    second = "2" if lost.hash == victim.hash else "1"
    assert [(h, n) for h, _, n in retries] == [(victim.hash, "1"), (lost.hash, second)], retries
    assert retries[0][1] == "WorkerCrashedError" and retries[1][1] in ("NodeDiedError", "WorkerCrashedError"), retries
    # a retried run is the next one submitted ("[k/4] <hash>: ..." lines as runs go out)
    for m in found:
        after = text[m.end():]
        assert re.search(r"INFO l2l.progress: \[\d/4\] (\w+):", after).group(1) == m.group(1), after[:3000]
    assert_trained_once_as_local(tmp_path, specs, reference)

"""Issue 23's fault probes, each rerun: the stage stops with one `l2l: error:` line naming the file (or
key) and what to do, exit status 2, and nothing is lost: the results on disk are as before, and once the
fault is gone the same stage succeeds. (The probe of two experiments at once and the run.yaml repair:
tests/test_workspace.py.) Stages run in this process where the fault allows, else as processes."""
import hashlib
import importlib.util
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from l2l import stage
from tests.conftest import REPO, smoke_params, write_npz
from tests.test_pipeline import CLAIMS, run_stage
from tests.test_reliability import CEILING_S, _env, one_line_error

pytestmark = pytest.mark.slow


def main_line(name: str, capsys) -> str:
    """Stage `name` through stage.main in this process: it must exit 2 with one `l2l: error:` line and no
    traceback; returns the line."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv0, sys.argv[0] = sys.argv[0], f"stages/{name}.py"
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            stage.main(module.run)
    finally:
        sys.argv[0] = argv0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("l2l: error: ")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def files(ws: Path) -> dict[str, str]:
    """sha256 of every result file (data, runs, evals, results), locks aside."""
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("data", "runs", "evals", "results") for p in sorted((ws / d).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def workspace(ws: Path, monkeypatch, claims=CLAIMS, run_yaml: dict | None = None, **smoke) -> Path:
    """A tiny pipeline workspace (2 runs), nothing run yet; this process works in it."""
    ws.mkdir(exist_ok=True)
    params = smoke_params(write_npz(ws / "arrays.npz"))
    params["profiles"]["smoke"].update(smoke)
    if run_yaml is not None:
        params.pop("profile")
        (ws / "run.yaml").write_text(yaml.safe_dump(run_yaml))
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    (ws / "claims.yaml").write_text(yaml.safe_dump(claims))
    monkeypatch.chdir(ws)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return ws


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Trained, evaluated and aggregated once; each test breaks a copy."""
    ws = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    try:
        workspace(ws, mp)
        for name in ("data", "train", "evaluate", "aggregate"):
            run_stage(name)
    finally:
        mp.undo()
    return ws


def copy_of(finished: Path, tmp_path: Path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(finished, ws)
    monkeypatch.chdir(ws)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return ws


# --- before any training: claims, overrides, run.yaml's keys, split sizes -------------------------------

def _edit_claim(**fields):
    doc = yaml.safe_load(yaml.safe_dump(CLAIMS))
    doc["claims"][0].update(fields)
    return doc


@pytest.mark.parametrize("claims, stats, expected", [
    (_edit_claim(metric="final_tset_acc"), {},
     "claims.yaml: PX-C1.metric: expected a metric column of results/runs.csv (did you mean final_test_acc?)"),
    (_edit_claim(tolerence=1.0), {},
     "claims.yaml: PX-C1.tolerence: unknown field for a reported_value claim (did you mean tolerance?)"),
    (CLAIMS, {"tolerances": {"P9-C9": 1.0}},
     "params.yaml: stats.tolerances.P9-C9: unknown claim id; expected a claim id of claims.yaml"),
])
def test_claim_typos_and_overrides_of_nothing_stop_the_first_stage(tmp_path, monkeypatch, capsys, claims, stats,
                                                                    expected):
    ws = workspace(tmp_path / "ws", monkeypatch, claims=claims)
    if stats:
        params = yaml.safe_load((ws / "params.yaml").read_text())
        params["stats"].update(stats)
        (ws / "params.yaml").write_text(yaml.safe_dump(params))
    assert main_line("data", capsys).startswith(f"l2l: error: {expected}")
    assert not (ws / "data").exists() and not (ws / "runs").exists()  # before anything was prepared or trained


def test_a_key_set_in_run_yaml_is_named_as_run_yaml(tmp_path, monkeypatch, capsys):
    ws = workspace(tmp_path / "ws", monkeypatch, run_yaml={"profile": "smoke", "data": {"npz": {"cifar11": "/x.npz"}}})
    assert main_line("data", capsys) == ("l2l: error: run.yaml: data.npz.cifar11: unknown key; expected one of "
                                         "cifar10, cifar100")
    assert not (ws / "data").exists()


def test_split_sizes_too_large_name_their_keys(tmp_path, monkeypatch, capsys):
    ws = workspace(tmp_path / "ws", monkeypatch, split={"val_size": 50, "test_size": 100, "train_subset": 500})
    assert main_line("data", capsys) == (
        "l2l: error: params.yaml: profiles.smoke.split: split sizes too large: test_size 100 (carved: the source has no test set) + val_size "
        f"50 + train_subset 500 = 650 > the 600 training images of {ws / 'arrays.npz'}; lower train_subset, val_size, "
        "test_size")
    assert not [p for p in (ws / "data").rglob("*") if p.is_file()]


# --- the MLflow store -------------------------------------------------------------------------------

def _truncate(ws: Path):
    db = ws / "mlflow.db"
    good = db.read_bytes()
    db.write_bytes(good[: len(good) // 2])
    return lambda: db.write_bytes(good)


def _lock(ws: Path):
    """Another process holds the store's write lock (as an `mlflow ui` writing would)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               "c = sqlite3.connect('mlflow.db', isolation_level=None)\n"
                               "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(600)"],
                              cwd=ws, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"

    def release():
        holder.kill()
        holder.wait()
    release.pid = holder.pid
    return release


def _read_only(ws: Path):
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///file:{ws / 'mlflow.db'}?mode=ro&uri=true"
    return lambda: os.environ.pop("MLFLOW_TRACKING_URI")


@pytest.mark.parametrize("fault, expected", [
    (_truncate, "l2l: error: mlflow.db: the MLflow store is damaged (truncated or overwritten): restore it from a "
                "backup, or move it aside (mv mlflow.db mlflow.db.damaged) to start a new store"),
    (_lock, "l2l: error: mlflow.db: the MLflow store is locked by another process (PID {pid}: "),
    (_read_only, "l2l: error: mlflow.db: the MLflow store is not writable here: make it and its folder writable"),
])
def test_mlflow_store_faults_are_one_line_and_lose_nothing(finished, tmp_path, monkeypatch, capsys, fault, expected):
    ws = copy_of(finished, tmp_path, monkeypatch)
    before = files(ws)
    undo = fault(ws)
    try:
        line = main_line("claims", capsys)
    finally:
        undo()
    assert line.startswith(expected.format(pid=getattr(undo, "pid", None))), line
    assert files(ws) == before  # no result written, none lost
    run_stage("claims")  # the fault gone, the same stage works
    assert (ws / "results/claims.json").exists()


def test_mlflow_store_over_the_file_size_limit(finished, tmp_path, monkeypatch):
    ws = copy_of(finished, tmp_path, monkeypatch)
    before = files(ws)
    limit = (ws / "mlflow.db").stat().st_size  # the store cannot grow; results/ files are far smaller
    out = subprocess.run([sys.executable, str(REPO / "stages/claims.py")], cwd=ws, env=_env(), capture_output=True,
                         text=True, timeout=CEILING_S,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = one_line_error(out)
    assert line.startswith("l2l: error: mlflow.db: the MLflow store is not writable any more (disk full or a file-size "
                           "limit: ") and "file-size limit (ulimit -f)" in line, line
    assert files(ws) == before
    run_stage("claims")  # no limit: the same stage works
    assert (ws / "results/claims.json").exists()


# --- a full disk ------------------------------------------------------------------------------------

def _namespaces() -> bool:
    """Whether this machine lets a process mount a file system of its own (a user and mount namespace)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


def test_a_full_disk_names_the_file_and_the_run_resumes(finished, tmp_path, monkeypatch):
    """runs/ on a file system with no room left (a tmpfs of 256 KiB, filled, in a mount namespace): the train
    stage stops in one line naming the checkpoint it was writing. Without namespaces, the same write under a
    file-size limit (EFBIG: the OS refusing, through the same code)."""
    ws = copy_of(finished, tmp_path, monkeypatch)
    for d in ("runs", "evals", "results"):
        shutil.rmtree(ws / d)
    (ws / "runs").mkdir()
    if _namespaces():
        script = ("mount -t tmpfs -o size=256k tmpfs runs && head -c 250000 /dev/zero > runs/filler && "
                  f"{sys.executable} {REPO / 'stages/train.py'}; rc=$?; ls -A runs/*/ >&2; exit $rc")
        out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ws, env=_env(), capture_output=True,
                             text=True, timeout=CEILING_S)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("l2l: error: ")]
        assert " (No space left on device): its file system is full (0 MiB free): free space, then re-run" in line
        assert ".tmp" not in out.stderr.split(line)[-1]  # the folder listing: nothing half-written kept
    else:
        write = ("import sys, torch\nfrom l2l import stage\nfrom l2l.engine import atomic_save\n"
                 "sys.argv[0] = 'stages/train.py'\n"
                 "stage.main(lambda: atomic_save({'w': torch.zeros(100000)}, stage.RUNS / 'r' / 'last.pt'))\n")
        out = subprocess.run([sys.executable, "-c", write], cwd=ws, env=_env(), capture_output=True, text=True,
                             timeout=CEILING_S, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                                      (65536, 65536)))
        line = one_line_error(out)
        assert " (File too large): over the file-size limit (ulimit -f: 0.1 MiB): raise it, then re-run" in line
        assert not list((ws / "runs/r").glob("*.tmp"))
    assert line.startswith("l2l: error: runs/") and "/last.pt: writing it failed" in line, line
    run_stage("train")  # room again: the runs train
    assert len(list((ws / "runs").glob("*/result.json"))) == 2


# --- temporaries of killed writes --------------------------------------------------------------------

KILLED_WRITER = """
import sys, threading
from pathlib import Path
from l2l.io import temp_path, write_atomic
path = Path(sys.argv[1])
def hang():
    print("writing", flush=True)
    threading.Event().wait()
def write(f):
    f.write(b"half a file")
    f.flush()
    hang()
if sys.argv[2] == "folder":  # the data stage's way (l2l.archives.write_prepared): a folder, swapped in when complete
    tmp = temp_path(path)
    tmp.mkdir()
    (tmp / "train_x.npy").write_bytes(b"half an array")
    hang()
write_atomic(path, write)
"""


def killed_write(path: Path, how: str = "file") -> Path:
    """A process killed (-9) while it writes `path` (a file through write_atomic, or a folder as the data
    stage writes one): returns the temporary it left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), how], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    (tmp,) = path.parent.glob(f"{path.name}.{writer.pid}.*.tmp")
    return tmp


def test_temporaries_of_killed_writes_are_removed_on_the_next_run(finished, tmp_path, monkeypatch):
    ws = copy_of(finished, tmp_path, monkeypatch)
    runs = sorted((ws / "runs").iterdir())
    (runs[0] / "result.json").unlink()  # that run is trained again; its folder held a checkpoint being written
    left = [killed_write(runs[0] / "last.pt"), killed_write(ws / "evals" / runs[1].name / "eval.json"),
            killed_write(ws / "results/claims.json"), killed_write(ws / "data/prepared/cifar10", "folder")]
    assert all(p.exists() for p in left)
    for name in ("data", "train", "evaluate", "claims"):
        run_stage(name)
    assert [p for p in left if p.exists()] == []
    assert len(list((ws / "runs").glob("*/result.json"))) == 2

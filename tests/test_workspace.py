"""The workspace's selection while DVC runs: a second `dvc exp run` cannot rewrite run.yaml under a
running one (it is refused before DVC stashes anything), a selection that changes mid-stage fails the
stage in one line, and after a failed `dvc exp run -S` git sees run.yaml's new value (so `git checkout
run.yaml` repairs it). The DVC tests run real `dvc exp run` processes in a copy of this repository."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from l2l import config, workspace
from l2l.checks import LockedError
from tests.conftest import REPO, smoke_params, write_npz
from tests.test_pipeline import CLAIMS as PIPELINE_CLAIMS

CEILING_S = 600  # a guard against hanging, not a timing: the machine may be loaded


def test_the_selection_files_are_the_configs():
    assert workspace.SELECTION_FILES == (config.PARAMS_FILE, config.RUN_FILE)


def test_changes_names_every_key_that_changed_whatever_the_schema(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("run.yaml").write_text("profile: smoke\npapers: all\n")
    before = workspace.snapshot()
    assert workspace.changes(before) is None
    Path("run.yaml").write_text("# a comment\nprofile: smoke\npapers: all\n")  # the same values
    assert workspace.changes(before) is None
    Path("run.yaml").write_text("profile: smoke\npapers: [P3]\nlook_seeds: [0, 1]\n")  # a key of tomorrow too
    assert workspace.changes(before) == "run.yaml: papers 'all' -> ['P3'], look_seeds None -> [0, 1]"
    Path("params.yaml").write_text("stats: {}\n")
    assert workspace.changes(before).startswith("params.yaml: created; run.yaml: papers")


def test_a_selection_changed_while_a_stage_runs_fails_the_stage_in_one_line(tmp_path, monkeypatch, capsys):
    """DVC records a stage's params when the stage ends: had run.yaml changed meanwhile, it would record a
    selection the stage did not run. The stage fails instead (DVC then records nothing of it)."""
    from l2l import stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages/claims.py"])
    Path("run.yaml").write_text("profile: smoke\npapers: all\n")
    with pytest.raises(SystemExit) as e:
        stage.main(lambda: Path("run.yaml").write_text("profile: smoke\npapers: [PY]\n"))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "l2l: error: run.yaml: papers 'all' -> ['PY']: changed while stage claims ran; its outputs follow the "
        "selection it started with and DVC records nothing of them: run the pipeline again for the selection the "
        "files hold now")
    stage.main(lambda: None)  # unchanged: nothing to say


def _dvc_workspace(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".dvc/tmp/exps").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "train")


def _second_experiment_put(lock_dir: Path):
    """What `dvc exp run` does before it stashes the workspace (WorkspaceQueue.put)."""
    from dvc.fs import localfs
    from dvc.rwlock import rwlock

    return rwlock(str(lock_dir), localfs, "dvc exp run -S run.yaml:papers=[P3]", [], ["workspace", "refs/exps/stash"],
                  False)


def test_a_stage_run_by_dvc_holds_the_workspace_against_a_second_experiment(tmp_path, monkeypatch):
    from dvc.lock import LockError

    _dvc_workspace(tmp_path, monkeypatch)
    with workspace.hold("train"):
        with pytest.raises(LockError, match=r"(?s)'workspace' is busy.*l2l stage train of the pipeline running"):
            with _second_experiment_put(tmp_path / ".dvc/tmp/exps"):
                pass
    with _second_experiment_put(tmp_path / ".dvc/tmp/exps"):  # released when the stage ends
        pass


def test_a_stage_refuses_to_start_while_an_experiment_rewrites_the_workspace(tmp_path, monkeypatch):
    _dvc_workspace(tmp_path, monkeypatch)
    with _second_experiment_put(tmp_path / ".dvc/tmp/exps"):
        with pytest.raises(LockedError) as e:
            with workspace.hold("evaluate"):
                pass
    assert str(e.value).startswith("run.yaml: being rewritten by another dvc exp run ((PID ")
    assert "\n" not in str(e.value)


def test_outside_dvc_a_stage_holds_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    with workspace.hold("train"):
        assert not (tmp_path / ".dvc").exists()


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)


def test_git_sees_a_same_size_rewrite_in_the_same_second(tmp_path, monkeypatch):
    """The state a failed `dvc exp run -S 'run.yaml:papers=P3'` left: the index holds the old blob with the
    stat of a write in the same second as the new content, of the same size; git calls the file clean."""
    monkeypatch.chdir(tmp_path)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "core.trustctime", "false")  # ctime cannot be set: compare mtime and size only
    run = tmp_path / "run.yaml"
    run.write_text("papers: all   # all | a list\n")
    then = time.time_ns() - 10 * 10**9  # older than the index file: not "racily clean" (git would re-read it)
    os.utime(run, ns=(then, then))
    _git(tmp_path, "add", "run.yaml")
    _git(tmp_path, "-c", "user.email=t@l2l.local", "-c", "user.name=t", "commit", "-qm", "run.yaml")
    run.write_text("papers: P3    # all | a list\n")
    os.utime(run, ns=(then, then))
    assert _git(tmp_path, "status", "--porcelain").stdout == ""  # fooled
    assert workspace.let_git_see(Path("run.yaml"))
    assert _git(tmp_path, "status", "--porcelain").stdout.strip() == "M run.yaml"
    _git(tmp_path, "checkout", "run.yaml")
    assert run.read_text() == "papers: all   # all | a list\n"
    assert not workspace.let_git_see(Path("run.yaml"))  # content as the index: nothing to do


# --- real `dvc exp run` in a copy of the repository --------------------------------------------------

# two papers, each one claim on an experiment of its own: selecting PY drops PX's claim and runs
CLAIMS = {"papers": {**PIPELINE_CLAIMS["papers"], "PY": "B. Author. 2021."}, "claims": [
    PIPELINE_CLAIMS["claims"][0],
    {**PIPELINE_CLAIMS["claims"][0], "id": "PY-C1", "paper": "PY",
     "arms": {"a": {"experiment": "other", "model": "cnn"}}}]}

# A train stage held in its first batch until the file $L2L_TEST_GATE exists (a long run, for a test).
GATE = """
import os, sys, time
gate = os.environ.get("L2L_TEST_GATE")
if gate and sys.argv and sys.argv[0].endswith("stages/train.py"):
    import dataclasses
    from l2l.methods import METHODS
    real = METHODS["conventional"].phases
    def phases(spec, ctx):
        for phase in real(spec, ctx):
            def held(x, y, step=phase.step):
                open(gate + ".waiting", "w").close()
                while not os.path.exists(gate):
                    time.sleep(0.1)
                return step(x, y)
            phase.step = held
            yield phase
    METHODS["conventional"] = dataclasses.replace(METHODS["conventional"], phases=phases)
"""


# What a pipeline run leaves in the checkout (CI runs the tests after the smoke run): not the project's
# files, and a copied dvc.lock would name outputs whose cache the copy lacks.
PIPELINE_OUTPUTS = ("dvc.lock", "results/", "reports/", "runs/", "evals/", "data/", "slurm/")


def repo_copy(ws: Path, run_yaml: str | None = None) -> Path:
    """A git repository holding this project's files (tracked and new, not a pipeline run's outputs), a
    tiny smoke profile of two experiments (conventional: PX's claim, other: PY's), committed."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith(PIPELINE_OUTPUTS):
            (ws / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, ws / f)
    npz = write_npz(ws.parent / f"{ws.name}-arrays.npz")
    params = smoke_params(npz, seeds=(0, 1), experiments={
        "conventional": {"method": "conventional", "models": ["cnn"]},
        "other": {"method": "conventional", "models": ["cnn"], "seeds": [0]}})
    params.pop("profile")  # run.yaml's
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (ws / "claims.yaml").write_text(yaml.safe_dump(CLAIMS, sort_keys=False))
    (ws / "run.yaml").write_text(run_yaml or "profile: smoke\npapers: all\nseeds: profile\ndata: {}\n")
    for cmd in (["init", "-q"], ["config", "user.email", "test@l2l.local"], ["config", "user.name", "test"],
                ["add", "-A"], ["commit", "-qm", "workspace"]):
        _git(ws, *cmd)
    return ws


def dvc_env(ws: Path, *extra_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (ws, *extra_path)),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    for k in ("MLFLOW_TRACKING_URI", "DVC_STAGE", "L2L_TEST_GATE"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_two_experiments_at_once_the_first_keeps_its_selection(tmp_path):
    """`dvc exp run` (papers: all) trains; meanwhile `dvc exp run -S 'run.yaml:papers=[PY]'` is refused
    before it rewrites run.yaml; the first ends with its own claims, dvc.lock and experiment."""
    ws = repo_copy(tmp_path / "ws")
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate/sitecustomize.py").write_text(GATE)
    gate = tmp_path / "release"
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        # up to the claims stage (the report adds nothing here)
        first = subprocess.Popen(["dvc", "exp", "run", "-n", "first", "claims"], cwd=ws, stdout=log,
                                 stderr=subprocess.STDOUT,
                                 env={**dvc_env(ws, tmp_path / "gate"), "L2L_TEST_GATE": str(gate)})
    try:
        deadline = time.monotonic() + CEILING_S
        while not Path(f"{gate}.waiting").exists():  # the first experiment is training
            assert first.poll() is None and time.monotonic() < deadline, first_log.read_text()[-3000:]
            time.sleep(0.2)
        before = (ws / "run.yaml").read_bytes()
        second = subprocess.run(["dvc", "exp", "run", "-S", "run.yaml:papers=[PY]"], cwd=ws, env=dvc_env(ws),
                                capture_output=True, text=True, timeout=CEILING_S)
        assert second.returncode != 0
        assert "'workspace' is busy" in second.stderr and "l2l stage train of the pipeline running" in second.stderr
        assert (ws / "run.yaml").read_bytes() == before  # refused before anything was rewritten
    finally:
        gate.touch()
        first.wait(timeout=CEILING_S)
    assert first.returncode == 0, first_log.read_text()[-3000:]
    claims = yaml.safe_load((ws / "results/claims.json").read_text())
    assert claims["papers"] == "all" and [c["id"] for c in claims["claims"]] == ["PX-C1", "PY-C1"]
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert {s: v["params"]["run.yaml"].get("papers") for s, v in lock.items()} == dict.fromkeys(
        ("data", "train", "evaluate", "aggregate", "claims"), "all")
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=ws, env=dvc_env(ws), capture_output=True, text=True)
    assert '"first"' in shown.stdout  # the experiment was saved
    assert (ws / "run.yaml").read_bytes() == before
    with _second_experiment_put(ws / ".dvc/tmp/exps"):  # nothing holds the workspace any more
        pass


SHIPPED_SHAPE = """# the workspace's selection, shaped like the shipped run.yaml (comments in a column)
profile: smoke   # one of params.yaml's profiles
papers: all      # all | a list of paper ids of claims.yaml, e.g. [P3]
seeds: profile   # the look's seeds (l2l adapt)
data: {}         # this machine's data sources
"""


@pytest.mark.slow
def test_after_a_failed_set_param_git_checkout_restores_run_yaml(tmp_path):
    """`dvc exp run -S 'run.yaml:papers=PX'` (not a list: the data stage refuses it) leaves papers: PX in
    run.yaml, as DVC leaves a failed experiment's changes; git shows it and `git checkout run.yaml`
    (the README's repair) restores the committed selection."""
    ws = repo_copy(tmp_path / "ws", SHIPPED_SHAPE)
    out = subprocess.run(["dvc", "exp", "run", "-S", "run.yaml:papers=PX"], cwd=ws, env=dvc_env(ws),
                         capture_output=True, text=True, timeout=CEILING_S)
    assert out.returncode != 0
    assert "l2l: error: run.yaml: papers: expected all or a non-empty list of paper ids" in out.stdout + out.stderr
    assert "papers: PX" in (ws / "run.yaml").read_text()
    assert _git(ws, "status", "--porcelain", "--untracked-files=no").stdout.strip() == "M run.yaml"
    _git(ws, "checkout", "run.yaml")
    assert (ws / "run.yaml").read_text() == SHIPPED_SHAPE

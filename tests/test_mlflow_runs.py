"""What an MLflow user finds on a training run: its dataset inputs (the prepared splits' digests),
system metrics, the model as a logged model that loads weights-only and predicts what final.pt
predicts, every metric once per step (re-evaluation included), the commit rather than "-dirty",
an experiment that opens as machine learning, and a claims experiment without "not run" runs."""
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import smoke_params, write_npz
from tests.test_pipeline import run_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run trained and evaluated twice (the second time after its eval.json was removed)."""
    ws = tmp_path_factory.mktemp("mlflow_ws")
    (ws / "params.yaml").write_text(yaml.safe_dump(smoke_params(write_npz(ws / "arrays.npz"), seeds=(0,))))
    mp = pytest.MonkeyPatch()
    mp.chdir(ws)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    for stage in ("data", "train", "evaluate"):
        run_stage(stage)
    for e in (ws / "evals").glob("*/eval.json"):
        e.unlink()
    run_stage("evaluate")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("l2l-smoke")
    (run,) = client.search_runs([exp.experiment_id])
    yield ws, client, exp, run
    mp.undo()


def test_dataset_inputs_carry_the_prepared_arrays_digests(trained):
    ws, _, _, run = trained
    prepared = ws / "data/prepared/cifar10"

    def digest(split):  # of the arrays the run read, hashed here from the files themselves
        x, y = (np.load(prepared / f"{split}_{p}.npy") for p in ("x", "y"))
        parts = "".join(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in (x, y))
        return hashlib.sha256(parts.encode()).hexdigest()[:36]

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["cifar10-test", "cifar10-train", "cifar10-val"]  # once each, after two evaluations
    contexts = {n: {t.key: t.value for t in d.tags}["mlflow.data.context"] for n, d in inputs.items()}
    assert contexts == {"cifar10-train": "training", "cifar10-val": "validation", "cifar10-test": "evaluation"}
    for split in ("train", "val", "test"):
        ds = inputs[f"cifar10-{split}"].dataset
        assert ds.digest == digest(split)
        assert json.loads(ds.source)["uri"] == prepared.resolve().as_uri()
        assert json.loads(ds.profile)["features_shape"][0] == len(np.load(prepared / f"{split}_y.npy"))


def test_system_metrics_logged(trained):
    _, _, _, run = trained
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)


def test_no_metric_has_two_values_at_one_step(trained):
    _, client, _, run = trained
    assert {"final_test_acc", "best_val_acc", "train_seconds", "val_acc"} <= set(run.data.metrics)
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: steps {steps}"


def test_logged_model_loads_weights_only_and_predicts_as_final_pt(trained, monkeypatch):
    ws, client, _, run = trained
    from l2l.methods import METHODS
    from l2l.mlflow_model import load_model
    from l2l.spec import RunSpec

    (out,) = run.outputs.model_outputs
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    model = load_model(out.model_id, uri)
    spec = RunSpec.from_dict(json.loads((ws / "runs" / run.data.tags["l2l.run_hash"] / "spec.json").read_text()))
    reference = METHODS[spec.method].predictor(spec, 10)
    reference.load_state_dict(torch.load(ws / "runs" / spec.hash / "final.pt", weights_only=True))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference.eval()(x))
    assert client.get_logged_model(out.model_id).source_run_id == run.info.run_id

    # a model.pt that is not the one logged is refused (the store's copy, tampered with)
    stored = next(Path(client.get_logged_model(out.model_id).artifact_location.removeprefix("file://")).rglob("model.pt"))
    original = stored.read_bytes()
    torch.save({k: v + 1 for k, v in torch.load(stored, weights_only=True).items()}, stored)
    try:
        from l2l.checks import IntegrityError

        with pytest.raises(IntegrityError, match="does not match the sha256"):
            load_model(out.model_id, uri)
    finally:
        stored.write_bytes(original)


def test_run_tags_and_experiment_kind(trained):
    _, _, exp, run = trained
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["l2l.params_digest"] == run.data.tags["l2l.run_hash"]
    assert "mlflow.source.git.commit" in run.data.tags and "l2l.git.modified" in run.data.tags


def test_git_commit_is_not_dirty_for_what_dvc_rewrites(tmp_path, monkeypatch):
    from l2l.tracking import git_commit, git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "run.yaml").write_text("profile: paper\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "params.yaml").write_text("a: 2\n")  # what `dvc exp run -S a=2` does
    (tmp_path / "run.yaml").write_text("profile: smoke\n")  # what `dvc exp run -S run.yaml:profile=smoke` does
    assert git_commit() == head and git_state() == (head, [])
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit() == head + "-dirty" and git_state() == (head, ["code.py"])


def test_outputs_dvc_exp_run_stages_do_not_make_the_commit_dirty(tmp_path, monkeypatch):
    """After each stage `dvc exp run` git-adds the stage's outputs that git does not ignore (uncached:
    results/metrics.json...): later stages see them as added files, which are results, not code."""
    from l2l.tracking import git_commit, git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"aggregate": {
        "cmd": "x", "outs": [{"results/metrics.json": {"cache": False}}, "results/runs.csv"],
        "metrics": [{"results/verdicts": {"cache": False}}]}}}))
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "results/verdicts").mkdir(parents=True)
    (tmp_path / "results/metrics.json").write_text("{}")
    (tmp_path / "results/verdicts/all.json").write_text("{}")
    git("add", "results/metrics.json", "results/verdicts")  # what dvc exp run does after the stage
    assert git_commit() == head
    (tmp_path / "new_module.py").write_text("x = 1\n")
    git("add", "new_module.py")  # new code, staged: not DVC's
    assert git_state() == (head, ["new_module.py"])


def _record(cid, verdict, diff=None, reason=""):
    rec = {"id": cid, "paper": "PX", "claim": f"claim {cid}", "verdict": verdict, "reason": reason,
           "arms": {"a": {"runs": {}}}}
    if diff is not None:
        rec["comparison"] = {"diff": diff, "ci_low": diff - 1, "ci_high": diff + 1}
    return rec


def test_claims_experiment_holds_checked_claims_and_one_summary(tmp_path, monkeypatch):
    import mlflow

    from l2l.tracking import log_claims

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    records = [_record("PX-C1", "inconclusive", diff=0.5)] + [
        _record(f"PX-C{i}", "not run", reason="cifar100 is not in profile smoke") for i in (2, 3, 4)]
    ids = log_claims("smoke", records)
    log_claims("smoke", records)  # the claims stage re-run: nothing duplicated
    records[0]["comparison"]["diff"] = 0.7  # re-checked with more seeds: the new value at the next step
    log_claims("smoke", records)
    c = mlflow.MlflowClient()
    runs = c.search_runs([c.get_experiment_by_name("l2l-smoke-claims").experiment_id])
    assert sorted(r.data.tags["l2l.kind"] for r in runs) == ["claim", "claims_summary"]
    assert set(ids) == {"PX-C1"}
    claim = next(r for r in runs if r.data.tags["l2l.kind"] == "claim")
    assert [(m.step, m.value) for m in c.get_metric_history(claim.info.run_id, "diff")] == [(0, 0.5), (1, 0.7)]
    assert len(c.get_metric_history(claim.info.run_id, "ci_high")) == 1  # unchanged: not logged again
    summary = next(r for r in runs if r.data.tags["l2l.kind"] == "claims_summary")
    assert summary.data.metrics == {"claims": 4.0, "claims_inconclusive": 1.0, "claims_not_run": 3.0}
    note = summary.data.tags["mlflow.note.content"]
    assert "not run (3): cifar100 is not in profile smoke: PX-C2, PX-C3, PX-C4" in note


def test_a_dataset_insert_race_with_another_worker_is_retried(tmp_path):
    """Two workers logging the same new split at once collide on the store's unique key (seen in CI
    with a worker pool): the loser retries and links the winner's row; any other error still raises."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from l2l.tracking import dataset_inputs, log_new_inputs
    from tests.conftest import random_arrays

    real = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = real.create_run(real.create_experiment("race"))
    manifest = {"dataset": "cifar10", "splits": {s: {"sha256_x": s * 8, "sha256_y": s} for s in ("train", "val")}}
    inputs = dataset_inputs(random_arrays(8, 4, 4), manifest, tmp_path, {"train": "training", "val": "validation"})

    class Racing:
        """The client of the worker that lost the race: its first insert meets the other's row."""

        def __init__(self, error):
            self.calls, self.error = 0, error

        def __getattr__(self, name):
            return getattr(real, name)

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls == 1:
                raise MlflowException(self.error)
            real.log_inputs(run_id, datasets=datasets)

    racing = Racing("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name")
    log_new_inputs(racing, real.get_run(run.info.run_id), inputs)
    logged = real.get_run(run.info.run_id).inputs.dataset_inputs
    assert racing.calls == 2 and sorted(d.dataset.name for d in logged) == ["cifar10-train", "cifar10-val"]
    log_new_inputs(real, real.get_run(run.info.run_id), inputs)  # nothing new: nothing logged twice
    assert len(real.get_run(run.info.run_id).inputs.dataset_inputs) == 2
    run2 = real.create_run(real.get_experiment_by_name("race").experiment_id)
    with pytest.raises(MlflowException, match="permission denied"):
        log_new_inputs(Racing("permission denied"), real.get_run(run2.info.run_id), inputs)

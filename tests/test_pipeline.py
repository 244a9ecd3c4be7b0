"""The pipeline end to end on a tiny plan: stages in order, one MLflow run per planned run,
nothing retrained or duplicated on a re-run, and the MLflow server (what the UI shows)."""
import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, smoke_params, write_npz

pytestmark = pytest.mark.slow

CLAIMS = {"papers": {"PX": "A. Author. A paper. 2020."}, "claims": [
    {"id": "PX-C1", "paper": "PX", "claim": "The CNN reaches 90%.", "kind": "reported_value",
     "metric": "final_test_acc", "dataset": "cifar10", "arms": {"a": {"experiment": "conventional", "model": "cnn"}},
     "reported": {"value": 90.0, "source": "Table 1"}, "tolerance": 1.0, "protocol": "as params.yaml"},
    {"id": "PX-C2", "paper": "PX", "claim": "The CNN reaches 70% on CIFAR-100.", "kind": "reported_value",
     "metric": "final_test_acc", "dataset": "cifar100", "arms": {"a": {"experiment": "conventional", "model": "cnn"}},
     "reported": {"value": 70.0, "source": "Table 2"}, "tolerance": 1.0, "protocol": "as params.yaml"}]}


def run_stage(name: str) -> None:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    params = smoke_params(write_npz(ws / "arrays.npz"))
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    (ws / "claims.yaml").write_text(yaml.safe_dump(CLAIMS))
    mp = pytest.MonkeyPatch()
    mp.chdir(ws)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    for stage in ("data", "train", "evaluate", "aggregate", "claims", "report"):
        run_stage(stage)
    yield ws, params
    mp.undo()


def mlflow_runs(ws):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("l2l-smoke")
    return client, client.search_runs([exp.experiment_id])


def test_outputs_and_one_mlflow_run_per_planned_run(workspace):
    ws, _ = workspace
    runs = pd.read_csv(ws / "results/runs.csv")
    assert len(runs) == 2 and set(runs["seed"]) == {0, 1}
    summary = pd.read_csv(ws / "results/summary.csv")
    assert summary["n"].tolist() == [2]
    assert (ws / "reports/report.md").read_text().startswith("# l2l-bench report: profile smoke\n\n**Smoke scale.**")
    html = (ws / "reports/report.html").read_text()
    assert "data:image/png;base64," in html and "carved from the training set" in html
    client, mruns = mlflow_runs(ws)
    assert sorted(r.data.tags["l2l.run_hash"] for r in mruns) == sorted(runs["run"])
    for r in mruns:
        assert r.info.status == "FINISHED"
        assert r.data.tags["l2l.method"] == "conventional" and "mlflow.source.git.commit" in r.data.tags
        assert "final_test_acc" in r.data.metrics and "train.optimizer.lr" in r.data.params
        assert len(client.get_metric_history(r.info.run_id, "val_acc")) == 1  # one epoch
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "history.csv" in arts and len(r.outputs.model_outputs) == 1  # final.pt: its logged model


def test_claims_in_report_and_mlflow(workspace):
    ws, _ = workspace
    claims = json.loads((ws / "results/claims.json").read_text())["claims"]
    assert [c["verdict"] for c in claims] == ["inconclusive (smoke scale)", "not run"]
    assert "cifar100 is not in profile smoke" in claims[1]["reason"]
    md = (ws / "reports/report.md").read_text()
    assert md.index("## Verdicts") < md.index("## Summary") and "How a verdict is decided" in md
    top = md[:md.index("## Verdicts")]  # the report opens with the claims, by their text
    assert md.index("| The CNN reaches 90%. `PX-C1` |") < md.index("### Not run in profile smoke (1 claims)")
    assert "- **1 claim**: its runs are not in profile smoke (PX 1); lacking cnn on cifar100" in top
    assert "forest.png" in top and (ws / "reports/forest.svg").exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("l2l-smoke-claims")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`l2l.claim_id` = 'PX-C1'")
    assert run.data.tags["l2l.verdict"] == "inconclusive (smoke scale)" and "diff" in run.data.metrics
    tagged = client.search_runs([client.get_experiment_by_name("l2l-smoke").experiment_id],
                                filter_string="tags.`l2l.claim.PX-C1` = 'a'")
    assert len(tagged) == 2  # both seeds' training runs point at the claim


def test_verdict_counts_report_top_and_mlflow_views(workspace):
    """DVC's metrics count the verdicts per paper; the report opens with that tally; every experiment holds
    the saved view of its runs table, whose columns (seed, test metric, verdicts) its runs carry."""
    ws, _ = workspace
    counts = {p.name: json.loads(p.read_text()) for p in (ws / "results/verdicts").iterdir()}
    assert counts == {n: {"supported": 0, "contradicted": 0, "inconclusive": 1, "not_run": 1}
                      for n in ("PX.json", "all.json")}
    md = (ws / "reports/report.md").read_text()
    assert md.index("## What it found") < md.index("## Claims at a glance")
    assert "| PX | 2 (2) | 0 | 0 | 1 (1) | 1 (1) |" in md and "**Undecided primary claims** (2)" in md
    from l2l.mlflow_view import DESCRIPTION_TAG, SHARED_VIEW_TAG, VIEW_KEY, training_view

    client, runs = mlflow_runs(ws)
    for name in ("l2l-smoke", "l2l-smoke-claims"):
        exp = client.get_experiment_by_name(name)
        view = json.loads(exp.tags[SHARED_VIEW_TAG + VIEW_KEY])
        assert view["name"] == "l2l-bench" and f"#/experiments/{exp.experiment_id}/runs?viewStateShareKey=l2l" \
            in exp.tags[DESCRIPTION_TAG]
    state = json.loads(json.loads(client.get_experiment_by_name("l2l-smoke").tags[SHARED_VIEW_TAG + VIEW_KEY])["state"])
    assert state == training_view()
    for r in runs:  # the view's columns exist on every run
        assert r.data.tags["l2l.seed"] in ("0", "1") and "final_test_acc" in r.data.metrics
        assert r.data.tags["l2l.verdicts"] == "inconclusive (smoke scale): PX-C1"
    claims = client.get_experiment_by_name("l2l-smoke-claims")
    (claim,) = client.search_runs([claims.experiment_id], filter_string="tags.`l2l.kind` = 'claim'")
    assert "(interval too wide, n=2); " in claim.data.tags["l2l.ours"]  # the report's text
    assert "ci_low" not in claim.data.metrics and claim.data.metrics["n_a"] == 2  # as the report: no interval at n=2


def test_rerun_trains_nothing_and_adding_a_seed_trains_only_it(workspace, monkeypatch):
    ws, params = workspace
    monkeypatch.chdir(ws)
    mtimes = {p: p.stat().st_mtime_ns for p in (ws / "runs").glob("*/final.pt")}
    run_stage("train")
    assert {p: p.stat().st_mtime_ns for p in (ws / "runs").glob("*/final.pt")} == mtimes
    assert len(mlflow_runs(ws)[1]) == 2  # not duplicated
    params["profiles"]["smoke"]["seeds"] = [0, 1, 2]
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage("train")
    assert len(list((ws / "runs").glob("*/final.pt"))) == 3
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert len(mlflow_runs(ws)[1]) == 3
    params["profiles"]["smoke"]["seeds"] = [0, 1]
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_on_localhost_serves_the_runs(workspace, tmp_path):
    ws, _ = workspace
    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--backend-store-uri", f"sqlite:///{ws / 'mlflow.db'}", "--workers", "1"],
                                  cwd=ws, stdout=f, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        # Ready when it answers; it may start slowly on a loaded machine: poll until it answers or its
        # process exits, under a generous ceiling (a guard against hanging, not a timing).
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=l2l-smoke", timeout=10) as r:
                    exp_id = json.load(r)["experiment"]["experiment_id"]
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not come up (exit status {server.poll()}); its log:\n"
                                + log.read_text()[-5000:])
                time.sleep(0.5)
        req = urllib.request.Request(f"{base}/runs/search", data=json.dumps({"experiment_ids": [exp_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            found = json.load(r)["runs"]
        hashes = {t["value"] for run in found for t in run["data"]["tags"] if t["key"] == "l2l.run_hash"}
        assert hashes == {r.data.tags["l2l.run_hash"] for r in mlflow_runs(ws)[1]}  # the store, as the UI shows it
        assert set(pd.read_csv(ws / "results/runs.csv")["run"]) <= hashes
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_failed_run_is_marked_failed(tmp_path, monkeypatch):
    params = smoke_params(write_npz(tmp_path / "arrays.npz"), seeds=[0])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_stage("data")
    import dataclasses

    from l2l.methods import METHODS

    def broken(spec, ctx):
        raise RuntimeError("loss is NaN")
        yield

    monkeypatch.setitem(METHODS, "conventional", dataclasses.replace(METHODS["conventional"], phases=broken))
    with pytest.raises(RuntimeError, match="loss is NaN"):
        run_stage("train")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("l2l-smoke").experiment_id])
    assert run.info.status == "FAILED" and "loss is NaN" in run.data.tags["l2l.error"]
    assert not list(tmp_path.glob("runs/*/result.json"))
    monkeypatch.undo()  # fixed: the same run trains, its MLflow run FINISHED without the earlier error
    monkeypatch.chdir(tmp_path)
    run_stage("train")
    (run,) = client.search_runs([run.info.experiment_id])
    assert run.info.status == "FINISHED" and "l2l.error" not in run.data.tags
    import shutil

    shutil.rmtree(next((tmp_path / "runs").iterdir()))  # e.g. after a tampered file: retrained, each step once
    run_stage("train")
    (run,) = client.search_runs([run.info.experiment_id])
    for key in ("val_acc", "train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key


def test_bad_params_one_line_error_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: smoke\nprofiles: {smoke: {seeds: [0]}}\ndata: {source: auto}\n")
    out = subprocess.run([sys.executable, str(REPO / "stages/data.py")], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["l2l: error: params.yaml: profiles.smoke.datasets: missing"]


def test_corrupt_npz_leaves_nothing(tmp_path):
    params = smoke_params(tmp_path / "broken.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, str(REPO / "stages/data.py")], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "broken.npz" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data/prepared/cifar10").exists()
    assert [p.name for p in (tmp_path / "data").rglob("*") if p.is_file()] == []


VOC_CLAIM = {"papers": {"P5": "Zhou et al. 2024."}, "claims": [
    {"id": "P5-C1/voc2007", "paper": "P5", "claim": "Narrow-deep student about the teacher's mAP.",
     "kind": "equivalence", "metric": "final_test_acc", "dataset": "voc2007", "margin": 1.0,
     "arms": {"a": {"experiment": "p5_distill", "model": "student"},
              "b": {"experiment": "p5_teacher", "model": "teacher"}},
     "reported": "not public", "protocol": "tiny"}]}


def test_voc_through_the_whole_pipeline(tmp_path, monkeypatch):
    """Pascal VOC (a generated tree in the VOC layout) from the data stage to the report: P5's
    distillation (its teacher a run of its own, trained first) and its no-KD baseline trained with
    BCE, scored by mAP, claimed and reported."""
    from tests.test_voc import TRAINVAL, make_voc

    trainval = {f"{i:06d}": TRAINVAL[k] for i, k in enumerate(list(TRAINVAL) * 4)}  # 24 images
    params = smoke_params(write_npz(tmp_path / "arrays.npz"), experiments={
        # the students before their teacher in the plan's order: the train stage's waves reorder
        "p5_distill": {"method": "distill", "models": ["student"], "datasets": ["voc2007"],
                       "options": {"teacher": {"experiment": "p5_teacher", "model": "teacher"},
                                   "latency_batches": [1, 4], "latency_warmup": 0, "latency_repeats": 2}},
        "p5_teacher": {"method": "conventional", "models": ["teacher"], "datasets": ["voc2007"]},
        "p5_baseline": {"method": "conventional", "models": ["student"], "datasets": ["voc2007"]}})
    smoke = params["profiles"]["smoke"]
    smoke["datasets"] = ["voc2007"]
    smoke["models"] = {"student": {"arch": "cnn", "width": 4}, "teacher": {"arch": "cnn", "width": 8}}
    smoke["train"]["batch_size"] = 8
    params["data"]["voc2007"] = {"root": str(make_voc(tmp_path / "VOC", trainval=trainval)), "image_size": 24,
                                 "val_size": 4}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(VOC_CLAIM))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for stage in ("data", "train", "evaluate", "aggregate", "claims", "report"):
        run_stage(stage)
    runs = pd.read_csv(tmp_path / "results/runs.csv")
    assert len(runs) == 6 and set(runs["metric"]) == {"mAP (%, area)"}
    teachers = runs[runs["experiment"] == "p5_teacher"].set_index("seed")["run"]
    for run in runs.loc[runs["experiment"] == "p5_distill", "run"]:
        spec = json.loads((tmp_path / "runs" / run / "spec.json").read_text())
        teacher = teachers[spec["seed"]]  # its seed's teacher run, finished before the student started
        assert spec["options"]["teacher_run"]["hash"] == teacher
        assert (tmp_path / "runs" / teacher / "result.json").stat().st_mtime < (
            tmp_path / "runs" / run / "spec.json").stat().st_mtime
    assert runs["final_test_acc"].between(0, 100).all()
    import numpy as np

    preds = np.load(tmp_path / "results/predictions.npz")
    assert preds[runs["run"][0]].shape == (3, 20) and preds["y_test__voc2007"].shape == (3, 20)
    (claim,) = json.loads((tmp_path / "results/claims.json").read_text())["claims"]
    assert claim["verdict"] == "inconclusive (smoke scale)" and claim["comparison"] is not None
    md = (tmp_path / "reports/report.md").read_text()
    assert "`P5-C1/voc2007`" in md and "mAP (%, area)" in md and "P5: distillation" in md
    assert (tmp_path / "reports/figures/p5_accuracy_latency.png").exists()
    client, mruns = mlflow_runs(tmp_path)
    assert {r.data.tags["l2l.metric"] for r in mruns} == {"mAP (%, area)"}

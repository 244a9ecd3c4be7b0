"""Execution backends: Ray (a local instance on CPU) and Slurm (submitit's local executor) train
a tiny plan to the same results/runs.csv as the default `local` backend, with one MLflow run
per planned run; bad executor params fail in one line."""
import pandas as pd
import pytest
import yaml

from l2l.checks import ConfigError, resolve
from l2l.config import EXECUTOR
from tests.conftest import REPO, config_of, shipped_params, smoke_params, write_npz
from tests.test_pipeline import mlflow_runs, run_stage

# Timings and the machine differ between backends; everything the runs computed must not.
VARYING = ["train_seconds", "images_per_s"]


def _workspace(tmp_path, monkeypatch, executor=None, seeds=(0, 1)):
    params = smoke_params(write_npz(tmp_path / "arrays.npz"), seeds=seeds)
    if executor is not None:
        params["executor"] = executor
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_stage("data")
    return tmp_path


def _train_and_aggregate(ws):
    for stage in ("train", "evaluate", "aggregate"):
        run_stage(stage)
    return pd.read_csv(ws / "results/runs.csv").drop(columns=VARYING)


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        ws = _workspace(tmp_path_factory.mktemp("local"), mp, seeds=(0, 1, 2))
        yield _train_and_aggregate(ws)
    finally:
        mp.undo()


def _same_as_local(ws, local_runs):
    runs = _train_and_aggregate(ws)
    pd.testing.assert_frame_equal(runs, local_runs)
    mruns = mlflow_runs(ws)[1]
    assert sorted(r.data.tags["l2l.run_hash"] for r in mruns) == sorted(runs["run"])  # one per run, none twice
    assert all(r.info.status == "FINISHED" and "final_test_acc" in r.data.metrics for r in mruns)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_local_instance_same_results_as_local(tmp_path, monkeypatch, local_runs):
    import ray

    ws = _workspace(tmp_path, monkeypatch, {"backend": "ray"}, seeds=(0, 1, 2))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})  # workers import this checkout
    try:
        _same_as_local(ws, local_runs)
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.slurm
def test_submitit_local_executor_same_results_as_local(tmp_path, monkeypatch, local_runs):
    # 3 runs, 2 per job: a job array of 2 jobs, one of them training 2 runs side by side (worker processes).
    executor = {"backend": "slurm", "runs_per_gpu": 2, "slurm": {"cluster": "local", "gpus_per_task": 1}}
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    ws = _workspace(tmp_path, monkeypatch, executor, seeds=(0, 1, 2))
    _same_as_local(ws, local_runs)
    assert len(list((ws / "slurm").glob("*_result.pkl"))) == 2


@pytest.mark.parametrize("executor, message", [
    ({"backend": "dask"}, "executor.backend: expected one of local, ray, slurm, got 'dask'"),
    ({"runs_per_gpu": 0}, "executor.runs_per_gpu: expected a positive integer, got 0"),
    ({"gpus": 2}, "executor.gpus: unknown key; expected one of backend, checkpoint_every, checkpoint_min_seconds, "
                  "cpu_threads, cuda_graphs, max_retries, ray, runs_per_gpu, slurm, stack_seeds, tracking"),
    ({"ray": {"address": 5}}, "executor.ray.address: expected a name or null, got 5"),
    ({"cpu_threads": "all"}, "executor.cpu_threads: expected a positive integer, got 'all'"),
    ({"checkpoint_every": 0}, "executor.checkpoint_every: expected a positive integer, got 0"),
    ({"checkpoint_min_seconds": -1}, "executor.checkpoint_min_seconds: expected a non-negative number, got -1"),
    ({"cuda_graphs": "yes"}, "executor.cuda_graphs: expected true or false, got 'yes'"),
    ({"slurm": {"cluster": "pbs"}}, "executor.slurm.cluster: expected one of slurm, local, got 'pbs'"),
    ({"slurm": {"timeout": 10}}, "executor.slurm.timeout: unknown key; expected one of"),
])
def test_bad_executor_params_one_line(executor, message):
    with pytest.raises(ConfigError) as e:
        resolve(EXECUTOR, executor, "executor")
    assert str(e.value).startswith(f"params.yaml: {message}") and "\n" not in str(e.value)


def test_defaults_local_one_run_per_gpu():
    cfg = config_of(shipped_params()).executor
    assert cfg["backend"] == "local" and cfg["runs_per_gpu"] == 1 and cfg["ray"]["address"] is None


@pytest.mark.slurm
def test_requeued_slurm_job_resumes_its_runs(tmp_path, monkeypatch):
    """Preemption: submitit calls the job's checkpoint(), which resubmits the same runs; an
    interrupted run resumes from its last epoch into the same MLflow run."""
    import torch

    from l2l.config import prepared_plan
    from l2l.data import DeviceDataCache
    from l2l.engine import RunContext, train_run
    from l2l.executor import SlurmJob, Worker
    from l2l.methods import conventional

    ws = _workspace(tmp_path, monkeypatch, seeds=(0,))
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["profiles"]["smoke"]["train"]["epochs"] = 2
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    config, (spec,), _ = prepared_plan()
    data, k = DeviceDataCache(config.data, torch.device("cpu")).get(spec)
    assert train_run(spec, conventional.METHOD, RunContext(spec, data, k, torch.device("cpu")), ws / "runs" / spec.hash,
                     stop_after_epochs=1) == {"interrupted": True}  # preempted after epoch 1 of 2
    job, args = SlurmJob(), ([spec.to_dict()], "smoke", config.data, Worker(str(ws)))
    requeued = job.checkpoint(*args)
    assert requeued.function is job and requeued.args == args
    (result,) = requeued.result()
    assert result["hash"] == spec.hash and (ws / "runs" / spec.hash / "result.json").exists()
    client, (run,) = mlflow_runs(ws)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0, 1]


def _teacher_and_students(seeds=(0, 1)):
    """Per seed a teacher run and a distill run requiring it (options as l2l.config.plan resolves them)."""
    from l2l.methods import distill
    from tests.conftest import make_spec

    teachers = [make_spec(experiment="p5_teacher", seed=s) for s in seeds]
    students = [make_spec(experiment="p5_distill", method="distill", seed=t.seed,
                          options={**distill.validate_options({}, "o"),
                                   "teacher_run": {"hash": t.hash, "model_cfg": t.model_cfg}}) for t in teachers]
    return teachers, students


def _config():
    return config_of(shipped_params())


def _fake_backend(monkeypatch, fail=()):
    """The local backend replaced by one that records each call's runs and 'finishes' them
    (result.json) unless asked to fail them."""
    from l2l import executor

    calls = []

    def runner(wave, config, worker, progress):
        calls.append([s.hash for s in wave])
        for s in wave:
            progress.started(s.hash, s.label)
            if s.hash in fail:
                raise RuntimeError(f"run {s.hash} failed")
            run_dir = executor.Path(worker.root) / "runs" / s.hash
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "result.json").write_text("{}")
            progress.finished(s.hash, s.label)

    monkeypatch.setitem(executor.RUNNERS, "local", runner)
    return calls


def test_run_plan_trains_required_runs_first(tmp_path, monkeypatch):
    from l2l.executor import run_plan

    teachers, students = _teacher_and_students()
    calls = _fake_backend(monkeypatch)
    run_plan(students + teachers, _config(), root=tmp_path)  # students listed first: the waves reorder
    assert calls == [[t.hash for t in teachers], [s.hash for s in students]]
    calls.clear()
    run_plan(students, _config(), root=tmp_path)  # teachers finished earlier: one wave
    assert calls == [[s.hash for s in students]]


def test_a_failed_teacher_fails_its_students_in_one_line(tmp_path, monkeypatch):
    from l2l.executor import run_plan

    teachers, students = _teacher_and_students()
    calls = _fake_backend(monkeypatch, fail={teachers[1].hash})
    with pytest.raises(RuntimeError) as e:
        run_plan(teachers + students, _config(), root=tmp_path)
    assert len(calls) == 1  # the students' wave never starts
    msg = str(e.value)
    assert msg.startswith(f"run {teachers[1].hash} failed; 2 runs of later waves not started, 1 of them requiring "
                          f"a run that did not finish; e.g. {students[1].hash} (p5_distill/cnn/cifar10/s1) requires "
                          f"{teachers[1].hash} (p5_teacher/cnn/cifar10/s1)")
    assert "\n" not in msg
    calls.clear()
    with pytest.raises(RuntimeError, match=rf"1 runs require unfinished runs; first: {students[1].hash} .* requires "
                                           rf"{teachers[1].hash}, which has no result.json"):
        run_plan(students[1:], _config(), root=tmp_path)  # the teacher is not in the list and not finished
    assert calls == []

"""Stacked seeds (l2l/stacking.py): K runs that differ only by seed train as one vmapped step, and each
ends as its separate run ends: weights equal in fp64 up to rounding, the same history and record; a
diverging member stays alone in its divergence; a member whose own code fails leaves the stack alone;
a stacked run resumes; the pipeline with stacking on gives the same runs, one MLflow run each."""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from l2l.device_data import DeviceData
from l2l.engine import RunContext, load_checkpoint, train_run
from l2l.methods import METHODS
from l2l.stacking import Lockstep, MemberContext, seed_group, stacked_layout
from tests.conftest import TRAIN, make_spec, random_arrays

RESNET = {"arch": "cifar_resnet", "depth": 8, "width": 2}
TIMING = {"epoch_seconds", "images_per_s", "train_seconds", "run_seconds", "stacked"}


@pytest.fixture
def fp64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _data() -> DeviceData:
    # built after the default dtype is set: its normalisation constants (and so the images) follow it
    return DeviceData(random_arrays(n_train=48, n_val=16, n_test=16), "cifar10", torch.device("cpu"),
                      crop_padding=4, flip=True)


def _specs(method: str = "conventional", seeds=(0, 1, 2, 3), options: dict | None = None, epochs: int = 2):
    opts = METHODS[method].validate_options(options or {}, "test")
    return [make_spec(seed=s, method=method, experiment=method, model="resnet8", model_cfg=RESNET, options=opts,
                      train={**TRAIN, "epochs": epochs, "batch_size": 16}) for s in seeds]


def _separate(specs, data, root, method=None, **kw):
    return [train_run(s, method or METHODS[s.method], RunContext(s, data, 10, torch.device("cpu"), runs=root),
                      root / f"separate-{s.seed}", **kw) for s in specs]


def _stacked(specs, data, root, method=None, **kw):
    stack = Lockstep(specs)
    ctxs = [MemberContext(s, data, 10, torch.device("cpu"), runs=root, stack=stack, member=k)
            for k, s in enumerate(specs)]
    return stack.run(lambda k: train_run(specs[k], stack.method(method or METHODS[specs[k].method], k), ctxs[k],
                                         root / f"stacked-{specs[k].seed}", **kw))


def _largest_difference(a, b) -> float:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].numel())


def _same_run(root, seed: int, sep: dict, stk: dict, weights_tol: float) -> None:
    """Member `seed` ended as its separate run: weights, history (losses to fp32's rounding: the tasks
    compute them in float32), every record field but the timings."""
    assert not isinstance(stk, BaseException), stk
    for f in ("final.pt", "best.pt"):
        assert _largest_difference(root / f"separate-{seed}" / f, root / f"stacked-{seed}" / f) <= weights_tol
    hs, hk = (pd.read_csv(root / f"{w}-{seed}" / "history.csv") for w in ("separate", "stacked"))
    cols = [c for c in hs.columns if c not in TIMING]
    assert list(hs.columns) == list(hk.columns)
    pd.testing.assert_frame_equal(hs[cols], hk[cols], check_exact=False, rtol=1e-6, atol=1e-6)
    assert set(sep) | {"stacked"} == set(stk)
    assert stk["stacked"]["members"] >= 2
    for key in set(sep) - TIMING - {"final", "best", "final_sha256", "sha256", "files", "phase_metrics"}:
        assert sep[key] == stk[key], key
    assert sep["best"]["epoch"] == stk["best"]["epoch"]
    assert sep["phase_metrics"].keys() == stk["phase_metrics"].keys()
    for phase, values in sep["phase_metrics"].items():  # every phase-end measure but a measured latency
        assert values.keys() == stk["phase_metrics"][phase].keys()
        for m, v in values.items():
            if "latency" not in m:
                assert math.isclose(v, stk["phase_metrics"][phase][m], rel_tol=1e-6, abs_tol=1e-6), (phase, m)


def test_four_stacked_members_equal_four_separate_runs_in_fp64(tmp_path, fp64):
    data, specs = _data(), _specs()
    sep, stk = _separate(specs, data, tmp_path), _stacked(specs, data, tmp_path)
    assert _largest_difference(tmp_path / "separate-0/final.pt", tmp_path / "stacked-1/final.pt") > 1e-3  # seeds differ
    for k, s in enumerate(specs):
        _same_run(tmp_path, s.seed, sep[k], stk[k], weights_tol=1e-12)


@pytest.mark.parametrize("method, options", [
    ("distill", {"latency_batches": [2], "latency_warmup": 0, "latency_repeats": 1}),
    ("generations", {"generations": 1, "teacher_loss": "tolerant"}),
    ("layerwise", {}),
])
def test_every_stackable_method_stacks_exactly_in_fp64(tmp_path, fp64, method, options):
    data = _data()
    specs = _specs(method, seeds=(0, 1), options=options, epochs=1)
    if method == "distill":  # each student's own teacher run (one per seed), finished first
        teachers = _specs("conventional", seeds=(0, 1), epochs=1)
        for t in teachers:
            train_run(t, METHODS["conventional"], RunContext(t, data, 10, torch.device("cpu"), runs=tmp_path),
                      tmp_path / t.hash)
        specs = [dataclasses.replace(s, options={**s.options, "teacher_run": {"hash": t.hash, "model_cfg": RESNET}})
                 for s, t in zip(specs, teachers)]
    sep, stk = _separate(specs, data, tmp_path), _stacked(specs, data, tmp_path)
    for k, s in enumerate(specs):
        _same_run(tmp_path, s.seed, sep[k], stk[k], weights_tol=1e-12)


class _OneSeedChanged:
    """conventional, with `change(phase, spec)` applied to one seed's phases."""

    def __init__(self, seed: int, change):
        self.seed, self.change = seed, change

    def phases(self, spec, ctx):
        for phase in METHODS["conventional"].phases(spec, ctx):
            yield self.change(phase, spec) if spec.seed == self.seed else phase


def _poison(phase, spec):
    """Its model's first weight NaN: a run that diverges from its first step."""
    with torch.no_grad():
        next(phase.modules["model"].parameters()).view(-1)[0] = float("nan")
    return phase


def _unreadable_teacher(phase, spec):
    """Its second epoch's hook raises: a member's own code failing."""
    def boom(epoch):
        if epoch == 1:
            raise OSError(f"run {spec.hash}: its teacher's checkpoint is unreadable")
    return dataclasses.replace(phase, on_epoch_start=boom)


def test_a_diverging_member_stays_alone_in_it(tmp_path, fp64, caplog):
    data, specs = _data(), _specs(seeds=(0, 1, 2, 3), epochs=1)
    sep = _separate(specs, data, tmp_path, method=_OneSeedChanged(2, _poison))
    with caplog.at_level(logging.WARNING, logger="l2l.stacking"):
        stk = _stacked(specs, data, tmp_path, method=_OneSeedChanged(2, _poison))
    for k in (0, 1, 3):  # the others: exactly their separate runs
        _same_run(tmp_path, k, sep[k], stk[k], weights_tol=1e-12)
    nan = [r["final"]["train_loss"] for r in (sep[2], stk[2])]  # the record writes NaN as null
    assert all(v is None or math.isnan(v) for v in nan)
    assert pd.read_csv(tmp_path / "stacked-2/history.csv")["train_loss"].isna().all()
    assert "stacked run" in caplog.text and "diverged" in caplog.text and specs[2].hash in caplog.text


def test_a_member_whose_own_code_fails_leaves_the_stack_alone(tmp_path, fp64):
    data, specs = _data(), _specs(seeds=(0, 1, 2))
    sep = _separate([s for s in specs if s.seed != 1], data, tmp_path)
    stk = _stacked(specs, data, tmp_path, method=_OneSeedChanged(1, _unreadable_teacher))
    assert isinstance(stk[1], OSError) and "unreadable" in str(stk[1])
    assert not (tmp_path / "stacked-1" / "result.json").exists()
    assert (tmp_path / "stacked-1" / "last.pt").exists()  # its first epoch's resume state: it resumes later
    for k, s in zip((0, 2), sep):
        _same_run(tmp_path, k, s, stk[k], weights_tol=1e-12)


def test_an_interrupted_stack_resumes_to_the_uninterrupted_runs(tmp_path, fp64):
    data, specs = _data(), _specs(seeds=(0, 1), epochs=2)
    sep = _separate(specs, data, tmp_path)
    assert all(r == {"interrupted": True} for r in _stacked(specs, data, tmp_path, stop_after_epochs=1))
    stk = _stacked(specs, data, tmp_path)
    for k, s in enumerate(specs):
        _same_run(tmp_path, s.seed, sep[k], stk[k], weights_tol=1e-12)


def test_a_member_resumed_at_another_point_fails_alone_and_the_executor_groups_by_resume_point(tmp_path, fp64):
    from l2l.executor import Stack, _resume_point

    data, specs = _data(), _specs(seeds=(0, 1, 2), epochs=3)
    train_run(specs[1], METHODS["conventional"], RunContext(specs[1], data, 10, torch.device("cpu"), runs=tmp_path),
              tmp_path / "stacked-1", stop_after_epochs=1)  # seed 1 alone: one epoch ahead of the others
    stk = _stacked(specs, data, tmp_path)
    assert isinstance(stk[1], RuntimeError) and "out of step" in str(stk[1])
    assert "result.json" in {p.name for p in (tmp_path / "stacked-0").iterdir()}
    # the executor would not have stacked it with them: it groups a stack's runs by their resume point
    (tmp_path / "runs").mkdir()
    (tmp_path / "stacked-1").rename(tmp_path / "runs" / specs[1].hash)
    assert _resume_point(tmp_path, specs[1]) == (0, 0) and _resume_point(tmp_path, specs[0]) is None
    assert Stack(tuple(specs)).hash == "+".join(s.hash for s in specs)


def test_seed_group_ignores_the_seed_and_the_required_runs_hash():
    a, b = (make_spec(seed=s, method="distill", options={"teacher_run": {"hash": f"t{s}", "model_cfg": RESNET}})
            for s in (0, 1))
    assert seed_group(a) == seed_group(b) and a.hash != b.hash
    assert seed_group(make_spec(seed=0)) != seed_group(make_spec(seed=0, model_cfg=RESNET))
    with pytest.raises(ValueError, match="differ by seed only"):
        Lockstep([make_spec(seed=0), make_spec(seed=1, model_cfg=RESNET)])


@pytest.mark.parametrize("value", [0, -2, "yes", True, 2.5, None])
def test_a_bad_stack_seeds_is_one_line(value):
    from l2l.checks import ConfigError, resolve
    from l2l.config import EXECUTOR

    with pytest.raises(ConfigError, match=r"executor\.stack_seeds: expected auto, off or a number of runs per stack"):
        resolve(EXECUTOR, {"stack_seeds": value}, "executor")
    assert resolve(EXECUTOR, {}, "executor")["stack_seeds"] == "auto"
    assert resolve(EXECUTOR, {"stack_seeds": False}, "executor")["stack_seeds"] == "off"  # YAML's unquoted off


def test_methods_say_whether_they_stack():
    assert METHODS["conventional"].stackable({}) is None and METHODS["distill"].stackable({}) is None
    assert METHODS["layerwise"].stackable({}) is None
    assert METHODS["generations"].stackable({"teacher_on_the_fly": True}) is None
    assert "data order" in METHODS["generations"].stackable({"teacher_on_the_fly": False})
    assert "two dependent updates" in METHODS["l2l"].stackable({})


# --- the batching rules ---------------------------------------------------------------------

def test_the_stacked_layout_gives_plain_vmaps_values_and_gradients(fp64):
    """stacked_layout's BatchNorm (train and eval), out-of-place ReLU and residual add (torchvision's blocks):
    the same outputs, running statistics and gradients as vmap's own rules, with far fewer kernels."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from l2l.profiling import StepCounter

    for block in (BasicBlock(4, 4), Bottleneck(16, 4)):
        torch.manual_seed(0)
        blocks = [type(block)(*((4, 4) if isinstance(block, BasicBlock) else (16, 4))) for _ in range(3)]
        params = {n: torch.stack([dict(b.named_parameters())[n].detach() for b in blocks])
                  for n, _ in blocks[0].named_parameters()}
        buffers = {n: torch.stack([dict(b.named_buffers())[n] for b in blocks]) for n, _ in blocks[0].named_buffers()}
        x = torch.randn(3, 5, params["conv1.weight"].shape[2], 6, 6)

        def run(layout: bool, training: bool):
            p = {n: v.clone().requires_grad_() for n, v in params.items()}
            b = {n: v.clone() for n, v in buffers.items()}
            blocks[0].train(training)

            def member(pb, xi):
                return torch.func.functional_call(blocks[0], pb, (xi,)).sum()

            with stacked_layout([blocks[0]]) if layout else torch.enable_grad(), StepCounter() as count:
                losses = torch.vmap(member, randomness="error")({**p, **b}, x)
                losses.sum().backward()
            return losses.detach(), {n: v.grad for n, v in p.items()}, b, count.launches

        for training in (True, False):
            (l1, g1, b1, n1), (l2, g2, b2, n2) = run(True, training), run(False, training)
            torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
            for n in g1:
                torch.testing.assert_close(g1[n], g2[n], rtol=1e-10, atol=1e-12)
            for n in b1:
                torch.testing.assert_close(b1[n], b2[n], rtol=1e-12, atol=1e-12)
            assert n1 < 0.75 * n2, (n1, n2)
        updated = run(True, True)[2]["bn1.running_mean"]
        assert all(not torch.equal(updated[k], buffers["bn1.running_mean"][k]) for k in range(3))  # per member
        assert "forward" not in blocks[0].__dict__ and blocks[0].relu.inplace  # restored


def test_kd_loss_is_kl_div_bit_for_bit():
    """l2l.losses.kd_loss in elementary ops (vmap batches them) equals F.kl_div's batchmean KL and its gradient."""
    from l2l.losses import kd_loss

    torch.manual_seed(0)
    s, t = torch.randn(64, 100, requires_grad=True), torch.randn(64, 100)
    reference = F.kl_div((s / 4).log_softmax(1), (t / 4).log_softmax(1), reduction="batchmean", log_target=True) * 16
    ours = kd_loss(s, t, 4.0)
    assert torch.equal(ours, reference)
    assert torch.equal(torch.autograd.grad(ours, s)[0], torch.autograd.grad(reference, s)[0])


# --- through the executor and the pipeline ------------------------------------------------------

def _workspace(tmp_path, monkeypatch, stack_seeds, seeds=(0, 1, 2)):
    from tests.conftest import smoke_params, write_npz
    from tests.test_pipeline import run_stage

    params = smoke_params(write_npz(tmp_path / "arrays.npz"), seeds=seeds)
    params["executor"] = {"stack_seeds": stack_seeds}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_stage("data")
    return run_stage


def test_the_pipeline_stacked_trains_the_same_runs_each_with_its_mlflow_run(tmp_path, monkeypatch):
    from tests.test_pipeline import mlflow_runs

    results = {}
    for setting in ("off", 3):
        ws = tmp_path / str(setting)
        ws.mkdir()
        run_stage = _workspace(ws, monkeypatch, setting)
        for stage in ("train", "evaluate", "aggregate"):
            run_stage(stage)
        results[setting] = pd.read_csv(ws / "results/runs.csv").drop(columns=["train_seconds", "images_per_s"])
        _, runs = mlflow_runs(ws)
        assert sorted(r.data.tags["l2l.run_hash"] for r in runs) == sorted(results[setting]["run"])
        assert all(r.info.status == "FINISHED" and "final_test_acc" in r.data.metrics for r in runs)
        assert {r.data.tags.get("l2l.execution") for r in runs} == ({None} if setting == "off" else {"stacked_3"})
        records = [json.loads(p.read_text()) for p in sorted(ws.glob("runs/*/result.json"))]
        assert all(("stacked" in r) == (setting == 3) for r in records)
    # the same runs (identities), the same figures up to float32 rounding (grouped convolutions on a CPU)
    pd.testing.assert_frame_equal(results["off"], results[3], check_exact=False, rtol=1e-4, atol=1e-4)


def test_a_run_failing_in_a_stack_is_marked_failed_alone(tmp_path, monkeypatch):
    import mlflow

    from l2l.checks import RunsFailed

    run_stage = _workspace(tmp_path, monkeypatch, 3)
    conventional = METHODS["conventional"].phases

    def phases(spec, ctx):
        for phase in conventional(spec, ctx):
            if spec.seed == 1:
                phase = dataclasses.replace(phase, on_epoch_start=lambda e: (_ for _ in ()).throw(
                    OSError(f"run {spec.hash}: its teacher's checkpoint is unreadable")))
            yield phase

    monkeypatch.setitem(METHODS, "conventional", dataclasses.replace(METHODS["conventional"], phases=phases))
    with pytest.raises(RunsFailed, match=r"^1 of 3 stacked runs failed; first: \w{12} \(conventional/cnn/cifar10/s1\): "
                                         r"OSError: run \w{12}: its teacher's checkpoint is unreadable"):
        run_stage("train")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("l2l-smoke").experiment_id])
    status = {r.data.tags["l2l.seed"]: r.info.status for r in runs}
    assert status == {"0": "FINISHED", "1": "FAILED", "2": "FINISHED"}
    assert len(list(tmp_path.glob("runs/*/result.json"))) == 2
    monkeypatch.undo()  # fixed: the next train stage trains the failed run only
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_stage("train")
    assert len(list(tmp_path.glob("runs/*/result.json"))) == 3

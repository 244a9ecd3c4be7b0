"""The multi-label path (Pascal VOC as 20-class multi-label classification, l2l/tasks.py) through
the engine and the teacher-student methods: the loss, the KD form, the metric (mAP), the saved
predictions, and the plan's refusal of methods that only know single-label outputs."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_spec, plan_of, shipped_params
from l2l.spec import resolve_train
from l2l.checks import ConfigError
from l2l.device_data import DeviceData
from l2l.engine import RunContext, load_checkpoint, train_run
from l2l.losses import multilabel_kd_loss
from l2l.methods import conventional, distill
from l2l.methods.teaching import kd_step
from l2l.models import build_model
from l2l.tasks import MultiLabel, SingleLabel, task_of
from l2l.datasets import VOC_ABSENT as ABSENT
from l2l.datasets import VOC_DIFFICULT as DIFFICULT
from l2l.datasets import VOC_PRESENT as PRESENT
from l2l.tasks import mean_average_precision, voc_bce_loss

VOC_TASK = {"kind": "multi-label", "ap_mode": "area", "difficult": "ignore"}
CPU = torch.device("cpu")


def quadrant_arrays(n_train=192, n_val=64, n_test=64, size=16, seed=0):
    """Labels readable off the image: class c (0..3) is present iff quadrant c is bright; a few
    present labels are marked difficult-only; classes 4..19 never occur."""
    rng = np.random.default_rng(seed)
    h = size // 2

    def split(n):
        y = np.full((n, 20), ABSENT, np.int8)
        present = rng.random((n, 4)) < 0.4
        y[:, :4][present] = PRESENT
        y[:, :4][present & (rng.random((n, 4)) < 0.1)] = DIFFICULT
        x = rng.integers(0, 60, (n, 3, size, size), dtype=np.uint8)
        for c, (r, q) in enumerate(((0, 0), (0, h), (h, 0), (h, h))):
            x[present[:, c], :, r:r + h, q:q + h] += 180
        return x, y

    return {"train": split(n_train), "val": split(n_val), "test": split(n_test)}


def voc_spec(**overrides):
    train = resolve_train({"epochs": 4, "batch_size": 32, "eval_batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05,
             "momentum": 0.9}, "schedule": {"name": "cosine"}, "augment": {"crop_padding": 1, "flip": False}}, "test.train")
    d = dict(dataset="voc2007", model_cfg={"arch": "cnn", "width": 8}, train=train,
             data={"fingerprint": "test", "task": VOC_TASK})
    d.update(overrides)
    return make_spec(**d)


def voc_ctx(spec, arrays=None, runs=None):
    arrays = arrays or quadrant_arrays()
    aug = spec.train["augment"]
    data = DeviceData(arrays, "voc2007", CPU, crop_padding=aug["crop_padding"], flip=aug["flip"])
    return RunContext(spec, data, 20, CPU, **({"runs": runs} if runs else {}))


def test_task_of_the_run_data():
    assert isinstance(task_of({"fingerprint": "x"}), SingleLabel)
    t = task_of({"task": {**VOC_TASK, "ap_mode": "11point"}})
    assert isinstance(t, MultiLabel) and t.ap_mode == "11point" and t.metric == "mAP (%, 11point)"


def test_multilabel_training_learns_and_reports_map(tmp_path):
    spec = voc_spec()
    ctx = voc_ctx(spec)
    result = train_run(spec, conventional, ctx, tmp_path / "run")
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    # the loss falls and the validation mAP ends far above what chance ranking gives (~ the positive rate)
    assert hist["train_loss"].iloc[-1] < 0.5 * hist["train_loss"].iloc[0]
    assert result["final"]["val_acc"] > 90.0
    # evaluate's "acc" is the mAP of the model's scores, its loss the BCE, its predictions the sigmoid scores
    model = build_model(spec.model_cfg, 20)
    model.load_state_dict(load_checkpoint(tmp_path / "run" / "final.pt", sha256=result["final_sha256"]))
    ev = ctx.evaluate(model, "test")
    model.eval()
    with torch.no_grad():
        logits = model(ctx.data.normalise(ctx.data.x["test"]))
    y = ctx.data.y["test"]
    assert ev["acc"] == pytest.approx(100 * mean_average_precision(logits.numpy(), y.numpy(), "area")[0])
    assert ev["loss"] == pytest.approx(voc_bce_loss(logits, y).item(), rel=1e-5)
    assert ev["pred"].shape == (64, 20) and ev["pred"].dtype == np.float16
    np.testing.assert_allclose(ev["pred"], logits.sigmoid().numpy(), atol=1e-3)
    # the same seed gives the same run
    again = train_run(spec, conventional, voc_ctx(spec), tmp_path / "again")
    assert again["final_sha256"] == result["final_sha256"]


def test_train_metric_is_the_map_of_the_batches_seen():
    ctx = voc_ctx(voc_spec())
    meter = ctx.task.meter(CPU)
    logits, y = torch.randn(64, 20), ctx.data.y["train"][:64]
    meter.add(logits[:40], y[:40])
    meter.add(logits[40:], y[40:])
    assert meter.value() == pytest.approx(100 * mean_average_precision(logits.numpy(), y.numpy())[0])


def test_distillation_on_multilabel_uses_the_sigmoid_kd():
    spec = voc_spec(method="distill", options=distill.validate_options({}, "o"))
    ctx = voc_ctx(spec)
    torch.manual_seed(0)
    student, teacher = build_model(spec.model_cfg, 20), build_model(spec.model_cfg, 20).eval()
    opt = ctx.optimizer(student.parameters())
    step = kd_step(ctx, student, opt, lambda x, y: teacher(x), ctx.task.loss, temperature=4.0, kd_weight=0.9)
    x, y = next(ctx.data.train_batches(0, 0, 0, 32))
    loss, logits = step(x, y)
    with torch.no_grad():
        expected = 0.1 * voc_bce_loss(logits, y) + 0.9 * multilabel_kd_loss(logits, teacher(x), 4.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distill_run_on_multilabel_measures_map_and_costs(tmp_path):
    train = {**voc_spec().train, "epochs": 2}
    teacher = voc_spec(experiment="p5_teacher", model="teacher", train=train)  # the teacher run: BCE
    taught = train_run(teacher, conventional, voc_ctx(teacher), tmp_path / "runs" / teacher.hash)
    opts = distill.validate_options({"latency_batches": [1, 4], "latency_warmup": 0, "latency_repeats": 2}, "o")
    opts["teacher_run"] = {"hash": teacher.hash, "model_cfg": teacher.model_cfg}
    spec = voc_spec(method="distill", experiment="p5_distill", model_cfg={"arch": "cnn", "width": 4}, options=opts,
                    train=train)
    result = train_run(spec, distill, voc_ctx(spec, runs=tmp_path / "runs"), tmp_path / "runs" / spec.hash)
    s = result["phase_metrics"]["student"]
    for k in ("final_test_acc", "final_val_acc", "teacher_final_test_acc", "teacher_final_val_acc"):
        assert 0 < s[k] <= 100, k  # mAP in percent, measured on the held-out splits
    assert s["teacher_final_val_acc"] == pytest.approx(taught["final"]["val_acc"])  # the teacher run's model
    assert s["flops_ratio"] < 1 and "latency_fp32_b4_ms" in s
    assert result["final"]["val_acc"] == pytest.approx(s["final_val_acc"])


def _voc_params(experiments: dict) -> dict:
    params = shipped_params()
    paper = params["profiles"]["paper"]
    paper["experiments"] = experiments
    paper["datasets"] = ["cifar10", "voc2007"]
    del params["profiles"]["smoke"]  # its overrides name the paper's experiments, replaced here
    del params["stats"]["sequential"]["looks"]["smoke"]  # (a profile's settings without the profile: refused)
    del params["stats"]["failed_run"]["train_acc_floor"]["smoke"]
    return params


@pytest.mark.parametrize("experiment", [
    {"method": "l2l", "models": ["cnn"], "datasets": ["voc2007"]},
    {"method": "conventional", "models": ["cnn"], "datasets": ["voc2007"], "options": {"probe_epochs": 2}},
])
def test_plan_refuses_single_label_methods_on_voc(experiment):
    with pytest.raises(ConfigError, match=r"experiments\.x\.datasets: method \w+ with these options trains on "
                                          r"single-label datasets only, got voc2007 \(multi-label\)"):
        plan_of(_voc_params({"x": experiment}))


def test_plan_gives_voc_runs_their_task_and_keeps_cifar_identities():
    exps = {"p5_teacher": {"method": "conventional", "models": ["p5_teacher"], "datasets": ["cifar10", "voc2007"]},
            "x": {"method": "distill", "models": ["p5_narrow_deep"], "datasets": ["cifar10", "voc2007"]}}
    params = _voc_params(exps)
    specs = plan_of(params)
    voc = [s for s in specs if s.dataset == "voc2007"]
    assert voc and all(s.data["task"] == VOC_TASK and s.data["image_size"] == 128 for s in voc)
    assert all("task" not in s.data for s in specs if s.dataset == "cifar10")
    # a VOC setting changes the VOC runs' identity only
    other = copy.deepcopy(params)
    other["data"]["voc2007"]["ap_mode"] = "11point"
    changed = {s.hash for s in plan_of(other)} ^ {s.hash for s in specs}
    assert changed and all(s.dataset == "voc2007" for s in specs + plan_of(other) if s.hash in changed)

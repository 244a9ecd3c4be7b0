"""Layer-to-layer training (P1): exact split, frozen parts, mutual losses, incremental schedule,
split-point errors, and the ResNeXt / DenseNet models built from torchvision parts."""
from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torchvision

from l2l.spec import resolve_train
from l2l.checks import ConfigError
from l2l.spec import RunSpec
from l2l.device_data import DeviceData
from l2l.engine import RunContext, load_checkpoint, train_run
from l2l.methods import conventional, l2l
from l2l.models import block_names, build_model
from tests.conftest import config_of, plan_of, shipped_params

TINY = {
    "cnn": {"arch": "cnn", "width": 4},
    "vgg16": {"arch": "vgg16", "width": 0.0625},
    "resnext": {"arch": "resnext", "layers": [1, 1, 1, 1], "groups": 2, "width_per_group": 32, "planes": 4},
    "densenet": {"arch": "densenet", "growth_rate": 4, "block_config": [1, 2, 1, 1], "num_init_features": 8,
                 "bn_size": 2},
}
TRAIN = resolve_train({"epochs": 2, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                                      "weight_decay": 5e-4},
         "schedule": {"name": "cosine"}, "augment": {"crop_padding": 4, "flip": True}}, "test.train")


def make_data(n_train: int = 64, n_val: int = 32) -> DeviceData:
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (("train", n_train), ("val", n_val))}
    return DeviceData(arrays, "cifar10", torch.device("cpu"), crop_padding=4, flip=True)


def make_spec(options: dict | None = None, model: str = "cnn", method: str = "l2l", epochs: int = 2) -> RunSpec:
    opts = (l2l if method == "l2l" else conventional).validate_options(options or {}, "options")
    return RunSpec("t", method, model, "cifar10", 0, TINY[model], {**TRAIN, "epochs": epochs}, opts, {})


def first_phase(spec: RunSpec, data: DeviceData):
    torch.manual_seed(spec.seed)  # as the engine does before a run's phases
    ctx = RunContext(spec, data, 10, torch.device("cpu"))
    phase = next((l2l if spec.method == "l2l" else conventional).phases(spec, ctx))
    return phase, phase.step.__self__ if spec.method == "l2l" else None


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters AND buffers (BatchNorm running statistics, batch counters)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def momentum(opt, params) -> list[torch.Tensor]:
    return [opt.state[p]["momentum_buffer"].clone() for p in params]


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_changed(a: dict, b: dict) -> bool:
    """Every floating tensor (weights and running statistics) changed."""
    return all(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


# --- models ---------------------------------------------------------------------------

@pytest.mark.parametrize("ours, theirs", [("resnext", torchvision.models.resnext50_32x4d),
                                          ("densenet", torchvision.models.densenet121)])
def test_full_models_are_torchvisions_with_a_cifar_stem(ours, theirs):
    """Same parameters as torchvision's model except the stem's 7x7 conv, which is 3x3 here."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model({"arch": ours}, 10)) == count(theirs(num_classes=10)) - 3 * 64 * (49 - 9)


@pytest.mark.parametrize("model", list(TINY))
def test_student_then_teacher_is_the_unsplit_forward_bit_for_bit(model):
    torch.manual_seed(0)
    net = build_model(TINY[model], 10)
    x = torch.randn(4, 3, 32, 32)
    for k in range(1, len(block_names(net))):
        for train in (True, False):  # batch statistics and running statistics
            a, b = copy.deepcopy(net).train(train), copy.deepcopy(net).train(train)
            split = b[k:](b[:k](x))
            assert torch.equal(a(x), split), (model, k, train)
            assert identical(a.state_dict(), b.state_dict())  # the same running-statistics updates


def test_l2l_starts_from_the_conventional_initialisation():
    data = make_data()
    conv, _ = first_phase(make_spec(method="conventional"), data)
    mutual, _ = first_phase(make_spec({"reading": "mutual"}), data)
    assert identical(state(conv.predictor), state(mutual.predictor))


# --- frozen parts ---------------------------------------------------------------------

@pytest.mark.parametrize("model, reading, frozen_bn", [
    *[("cnn", r, bn) for r in ("alternating", "mutual") for bn in ("batch_stats", "eval")],
    *[(m, r, "batch_stats") for m in ("vgg16", "resnext", "densenet") for r in ("alternating", "mutual")]])
def test_frozen_part_is_bit_identical_after_the_other_parts_update(model, reading, frozen_bn):
    data = make_data()
    phase, trainer = first_phase(make_spec({"reading": reading, "frozen_bn": frozen_bn}, model=model), data)
    phase.on_epoch_start(0)
    x, y = next(data.train_batches(0, 0, 0, 16))
    trainer.step(x, y)  # every part has momentum now
    student = torch.nn.ModuleList([trainer.student] + ([trainer.head] if trainer.head is not None else []))
    for active, frozen, update in ((student, trainer.teacher, trainer.student_update),
                                   (trainer.teacher, student, trainer.teacher_update)):
        frozen_before, active_before = state(frozen), state(active)
        frozen_momentum = momentum(trainer.opt, list(frozen.parameters()))
        update(x, y)
        assert identical(state(frozen), frozen_before)  # weights and BatchNorm statistics
        assert all(torch.equal(a, b) for a, b in zip(momentum(trainer.opt, list(frozen.parameters())),
                                                     frozen_momentum))
        assert all_changed(active_before, state(active))


@pytest.mark.parametrize("model", ["cnn", "vgg16", "resnext"])
def test_alternating_gradients_are_the_full_networks_with_batch_stats(model):
    """frozen_bn batch_stats: the student's (and the teacher's) gradient in the alternating reading is
    exactly the full network's training-loss gradient for those parameters; eval-mode BatchNorm in the
    frozen part gives another gradient (so the comparison can tell them apart)."""
    data = make_data()
    x, y = next(data.train_batches(0, 0, 0, 16))
    grads = {}
    for frozen_bn in ("batch_stats", "eval"):
        phase, trainer = first_phase(make_spec({"reading": "alternating", "frozen_bn": frozen_bn}, model=model), data)
        trainer.model.train()
        trainer.set_split(trainer.k or l2l.resolve_split("middle", block_names(trainer.model)))
        full = copy.deepcopy(trainer.model).train()  # the unsplit network, same weights and statistics
        k = trainer.k
        full_loss = torch.nn.functional.cross_entropy(full(x), y)
        want_student = torch.autograd.grad(full_loss, list(full[:k].parameters()), retain_graph=True)
        want_teacher = torch.autograd.grad(full_loss, list(full[k:].parameters()))
        loss, _ = trainer.student_loss(x, y)
        got_student = torch.autograd.grad(loss, trainer.student_params)
        loss, _ = trainer.teacher_loss(x, y)
        got_teacher = torch.autograd.grad(loss, trainer.teacher_params)
        grads[frozen_bn] = (got_student, want_student)
        if frozen_bn == "batch_stats":
            for got, want in ((got_student, want_student), (got_teacher, want_teacher)):
                assert len(got) == len(want)
                assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-7) for g, w in zip(got, want))
    got, want = grads["eval"]
    assert not all(torch.allclose(g, w, rtol=1e-3, atol=1e-6) for g, w in zip(got, want))


def test_mutual_losses_give_no_gradient_to_the_frozen_side():
    data = make_data()
    phase, trainer = first_phase(make_spec({"reading": "mutual"}), data)
    phase.on_epoch_start(0)
    x, y = next(data.train_batches(0, 0, 0, 16))
    student_side = [*trainer.student.parameters(), *trainer.head.parameters()]
    for loss_fn, active, frozen in ((trainer.student_loss, student_side, list(trainer.teacher.parameters())),
                                    (trainer.teacher_loss, list(trainer.teacher.parameters()), student_side)):
        trainer.opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(x, y)
        loss.backward()  # unrestricted: whatever the graph reaches gets a gradient
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in active)


@pytest.mark.parametrize("form, pooled", [("gap_linear", 1), ("pool2x2_linear", 2)])
def test_mutual_student_head_forms(form, pooled):
    """option student_head: global average pooling or P3's 2x2 pooling before the student's linear layer;
    the default draws the same head as before the option existed (a pooled map of 1x1)."""
    data = make_data()
    phase, trainer = first_phase(make_spec({"reading": "mutual", "student_head": form}), data)
    phase.on_epoch_start(0)
    pool, _, linear = trainer.head
    assert pool.output_size == pooled
    channels = trainer.student(torch.zeros(1, 3, 32, 32)).shape[1]
    assert linear.in_features == channels * pooled * pooled
    with pytest.raises(ConfigError, match="student_head"):
        l2l.validate_options({"student_head": "mlp"}, "options")


def test_vgg16_heads():
    """VGG16's classifier: one linear layer (default) or torchvision's FC-4096 head, scaled by width; the
    blocks (and so L2L's split points) are the same."""
    lin = build_model({"arch": "vgg16", "width": 0.0625, "head": "linear"}, 10)
    fc = build_model({"arch": "vgg16", "width": 0.0625, "head": "fc4096"}, 10)
    assert block_names(lin) == block_names(fc)
    linears = [m for m in fc.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 256), (256, 256), (256, 10)]
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in fc.classifier) == 2
    assert fc(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="head"):
        build_model({"arch": "vgg16", "head": "mlp"}, 10)


def test_distillation_loss_weights():
    logits, target, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(logits, y)
    mutual = types.SimpleNamespace(o={"temperature": 4.0})  # the one option the loss reads
    assert torch.allclose(l2l.LayerToLayer.distillation_loss(mutual, logits, target, y, 0.0), ce)
    assert l2l.LayerToLayer.distillation_loss(mutual, logits, logits, y, 1.0).abs() < 1e-6  # KL of a distribution to itself


# --- incremental ----------------------------------------------------------------------

def test_incremental_schedule():
    names = ["stage1", "stage2", "stage3", "classifier"]
    opts = lambda **o: l2l.validate_options({"reading": "incremental", **o}, "o")  # noqa: E731
    assert l2l.split_schedule(opts(), names, 6) == [1, 1, 2, 2, 3, 3]  # every boundary, evenly
    assert l2l.split_schedule(opts(incremental_epochs=[1, 4]), names, 6) == [1, 2, 2, 2, 3, 3]
    assert l2l.split_schedule(opts(incremental_splits=["stage1", "middle"]), names, 4) == [1, 1, 2, 2]
    assert l2l.split_schedule(l2l.validate_options({"split": "stage3"}, "o"), names, 3) == [3, 3, 3]
    for bad in (opts(incremental_splits=[2, 1]), opts(incremental_epochs=[1]), opts(incremental_epochs=[2, 6])):
        with pytest.raises(ConfigError):
            l2l.split_schedule(bad, names, 6)
    with pytest.raises(ConfigError, match="too few epochs"):
        l2l.split_schedule(opts(), names, 2)


@pytest.mark.parametrize("optimizer_state", ["keep", "reset"])
def test_incremental_moves_the_split_at_the_scheduled_epochs(optimizer_state):
    """Driven epoch by epoch: the trainer's split follows the schedule and only the current
    split's student head learns (so the move really changes what is trained)."""
    data = make_data(n_train=32)
    spec = make_spec({"reading": "incremental", "incremental_step": "mutual", "incremental_epochs": [1, 2],
                      "optimizer_state": optimizer_state}, epochs=3)
    phase, trainer = first_phase(spec, data)
    for epoch, k in enumerate([1, 2, 3]):
        heads_before = {h: state(m) for h, m in trainer.heads.items()}
        had_state = len(trainer.opt.state) > 0
        phase.on_epoch_start(epoch)
        assert trainer.k == k and len(trainer.student) == k
        assert (len(trainer.opt.state) > 0) == (had_state and (optimizer_state == "keep" or epoch == 0))
        for x, y in data.train_batches(0, 0, epoch, 16):
            phase.step(x, y)
        for h, before in heads_before.items():
            assert identical(before, state(trainer.heads[h])) == (h != str(k)), (epoch, h)


# --- split-point errors ---------------------------------------------------------------

@pytest.mark.parametrize("split", [0, -1, True, "", 2.5])
def test_invalid_split_options_fail_with_one_line(split):
    with pytest.raises(ConfigError) as e:
        l2l.validate_options({"split": split}, "profiles.p.experiments.e.options")
    assert "experiments.e.options.split" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("split, message", [(4, "leaves no teacher"), ("classifier", "leaves no teacher"),
                                            ("stage9", "unknown block 'stage9'")])
def test_split_points_the_model_lacks_fail_with_one_line(split, message):
    with pytest.raises(ConfigError, match=message) as e:
        first_phase(make_spec({"split": split}), make_data())  # cnn: stage1..3, classifier
    assert "\n" not in str(e.value) and "experiments.t.options.split" in str(e.value)


def test_bad_option_values_fail():
    for bad in ({"reading": "sideways"}, {"frozen_bn": "train"}, {"temperature": 0}, {"student_kd_weight": 1.5},
                {"incremental_epochs": [3, 2]}, {"incremental_splits": [0]}, {"optimiser_state": "keep"}):
        with pytest.raises(ConfigError):
            l2l.validate_options(bad, "o")


# --- through the engine ---------------------------------------------------------------

def test_engine_run_counts_two_updates_per_batch_tags_the_split_and_resumes_exactly(tmp_path):
    data = make_data()
    spec = make_spec({"reading": "incremental", "incremental_step": "mutual", "optimizer_state": "reset",
                      "incremental_splits": [1, "middle"]}, epochs=2)
    ctx = RunContext(spec, data, 10, torch.device("cpu"))
    whole = train_run(spec, l2l, ctx, tmp_path / "whole")
    assert whole["updates"] == 2 * 2 * (64 // 16)  # = conventional training's at twice the epochs
    assert whole["tags"] == {"l2l.reading": "incremental", "l2l.split": "stage1@0>stage2@1",
                             "l2l.split_index": "1>2", "train.compile": "false", "train.deterministic": "false",
                             "train.tf32": "false", "fp32_precision": "matmul=ieee,conv=ieee",
                             "executor.cuda_graphs": "off"}
    assert whole["phase_metrics"]["incremental"]["final_split"] == 2
    assert train_run(spec, l2l, ctx, tmp_path / "cut", stop_after_epochs=1) == {"interrupted": True}
    resumed = train_run(spec, l2l, ctx, tmp_path / "cut")
    final = [load_checkpoint(tmp_path / d / "final.pt") for d in ("whole", "cut")]
    assert identical(*final) and resumed["final"] == whole["final"]


# --- claims records -------------------------------------------------------------------

def test_claims_records_name_experiments_and_models_of_the_profiles():
    from pathlib import Path

    import yaml


    root = Path(__file__).resolve().parents[1]
    records = yaml.safe_load((root / "claims" / "l2l.yaml").read_text())
    params = shipped_params()
    paper, smoke = config_of(params, "paper").profile, config_of(params, "smoke").profile
    # 4 claims x 2 datasets x 3 readings x 2 budgets, and #24's two head readings (FC-4096, pool2x2 student head)
    assert len({r["id"] for r in records}) == len(records) == 4 * 2 * 3 * 2 + 2
    in_smoke = set()
    for r in records:
        assert r["kind"] == "superiority" and r["reported"] == "not public" and r["dataset"] in paper.datasets
        for arm in r["arms"].values():
            assert arm["model"] in paper.experiments[arm["experiment"]].models
        if r["dataset"] in smoke.datasets and all(
                arm["model"] in smoke.experiments[arm["experiment"]].models
                for arm in r["arms"].values()):
            in_smoke.add(r["id"])
    # what the smoke profile's comment promises: P1-C2's records, and of P1-C1 only its FC-4096 head record
    assert {i.split("/")[0] for i in in_smoke} == {"P1-C1", "P1-C2"}
    assert {i for i in in_smoke if i.startswith("P1-C1")} == {"P1-C1/cifar10/alternating/equal-epochs/fc4096-head"}


def test_compute_matched_baseline_trains_twice_the_l2l_epochs_in_every_profile():
    """Derived from each profile's resolved plan: every conventional_compute_matched run has twice the
    epochs of every L2L run of its model and dataset, and every L2L model/dataset has such a baseline."""
    params = shipped_params()
    profiles = config_of(params).profiles
    assert {"paper", "smoke"} <= set(profiles)
    for profile in profiles:
        specs = plan_of(params, profile)
        l2l_epochs: dict[tuple, set] = {}
        for s in specs:
            if s.method == "l2l":
                l2l_epochs.setdefault((s.model, s.dataset), set()).add(s.train["epochs"])
        baseline = {(s.model, s.dataset): s.train["epochs"] for s in specs
                    if s.experiment == "conventional_compute_matched"}
        # every L2L model has one, but #24's FC-4096 head, whose record is at equal epochs only
        assert baseline and set(baseline) == {k for k in l2l_epochs if k[0] != "vgg16_fc4096"}, profile
        for key, epochs in baseline.items():
            assert l2l_epochs[key] == {epochs // 2} and epochs % 2 == 0, (profile, key)

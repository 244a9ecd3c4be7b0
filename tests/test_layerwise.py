"""Greedy layerwise training (P3/P2): architecture, sequential training, ensemble, pruning,
linear probes and the per-stage analysis. Tiny models on random data, CPU."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from l2l.spec import resolve_train
from l2l.checks import ConfigError
from l2l.claims import Arm, Claim, check
from l2l.methods import METHODS
from l2l.spec import RunSpec
from tests.conftest import config_of, plan_of, shipped_params
from l2l.device_data import DeviceData
from l2l.engine import RunContext, train_run
from l2l.layerwise_analysis import (critical_stage, early_overfit, record_stage_figure, report_section, saturation,
                                    stage_figure, stage_figures, stage_pairs, stage_table)
from l2l.methods import conventional, layerwise
from l2l.models import (LAYERWISE_PRESETS, ChannelMask, build_model, layerwise_cnn, layerwise_cnn_heads, stage_ends,
                        stage_outputs, unit_view)
from l2l.probe import probe_stages
from l2l.pruning import count_parameters, prune_lowest, slice_pruned, taylor_scores

CPU = torch.device("cpu")
TRAIN = resolve_train({"epochs": 1, "batch_size": 32, "eval_batch_size": 64,
         "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
         "schedule": {"name": "step", "step_size": 1, "gamma": 0.2}, "augment": {"crop_padding": 4, "flip": True}}, "test.train")
TINY_K3 = {"arch": "layerwise_cnn", "preset": "k3", "J": 3, "M": 4, "M_tilde": 4, "downsample_at": [1]}
TINY_COMPRESS = {"arch": "layerwise_cnn", "preset": "compress", "M": 6, "M_tilde": 6, "final_M_tilde": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tensors here are tiny: a second intra-op thread only adds contention on shared cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> DeviceData:
    rng = np.random.default_rng(0)

    def split(n):
        return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)

    return DeviceData({"train": split(96), "val": split(32), "test": split(32)}, "cifar10", CPU, crop_padding=4, flip=True)


def make_spec(method, model_cfg, options=None, train=None, seed=0) -> RunSpec:
    return RunSpec("exp", method.__name__.rsplit(".", 1)[-1], "m", "cifar10", seed, model_cfg, train or TRAIN,
                   method.validate_options(options or {}, "experiments.exp.options"), {})


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(a[k], b[k]) for k in keys)


# --- architecture ----------------------------------------------------------------------

def test_space_to_depth_is_invertible():
    x = torch.randn(2, 5, 8, 6)
    down = layerwise_cnn(10, preset="k1").block2[0]
    assert isinstance(down, nn.PixelUnshuffle) and down(x).shape == (2, 20, 4, 3)
    assert torch.equal(nn.PixelShuffle(2)(down(x)), x)


def _head_widths(head: nn.Sequential) -> list[int]:
    return [m.out_channels for m in head if isinstance(m, nn.Conv2d)]


def _pooled_bn(head: nn.Sequential) -> bool:
    pool = next(i for i, m in enumerate(head) if isinstance(m, nn.AdaptiveAvgPool2d))
    return isinstance(head[pool + 1], nn.BatchNorm2d)


@pytest.mark.parametrize("preset, widths, sizes, bn, head_widths, pool_bn", [
    # the official code (eugenium/layerCNN README commands; l2l/models.py LAYERWISE_PRESETS)
    ("k1", [256, 256, 512, 1024, 1024], [32, 32, 16, 8, 8], False, [[]] * 5, False),
    ("k2", [128, 128, 256, 256], [32, 32, 16, 16], True, [[128], [128], [256], [256]], True),
    ("k3", [128, 128, 256, 256], [32, 32, 16, 16], True, [[128] * 2, [128] * 2, [256] * 2, [256] * 2], True),
    ("compress", [128, 128, 128], [32, 32, 32], True, [[128] * 2, [128] * 2, [64] * 2], True),
    ("5x64", [64, 64, 64], [32, 32, 32], True, [[64] * 2] * 3, True),
    # the paper's text: j = 1, 3 (k=1); M~ = 256 doubling with the trunk, no BN after the pooling
    ("k1_paper_text", [256, 512, 512, 1024, 1024], [32, 16, 16, 8, 8], False, [[]] * 5, False),
    ("k2_paper_text", [128, 128, 256, 256], [32, 32, 16, 16], True, [[256], [256], [512], [512]], False),
    ("k3_paper_text", [128, 128, 256, 256], [32, 32, 16, 16], True, [[256] * 2, [256] * 2, [512] * 2, [512] * 2],
     False),
])
def test_presets_build_their_configuration(preset, widths, sizes, bn, head_widths, pool_bn):
    with torch.device("meta"):  # shapes without the compute of the full-width networks
        model = layerwise_cnn(10, preset=preset)
        heads = layerwise_cnn_heads(10, preset=preset)
        outs = stage_outputs(model, torch.zeros(2, 3, 32, 32))
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert [o.shape[1] for o in outs] == widths and [o.shape[2] for o in outs] == sizes
    assert len(heads) == len(widths) - 1 and stage_ends(model) == list(range(1, len(widths) + 1))
    all_heads = [*heads, model.classifier]
    assert [_head_widths(h) for h in all_heads] == head_widths
    assert all(_pooled_bn(h) == pool_bn for h in all_heads)
    assert all(h[-1].in_features == 4 * (hw[-1] if hw else w) for h, hw, w in zip(all_heads, head_widths, widths))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bn
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_official_configurations_have_the_official_parameter_counts():
    """The final networks (trunk + last head) of the official code's k=2 and k=3 CIFAR-10 commands;
    k=1: 3*256*9 + 256 (block 0, with its bias) + 256*256*9 + 1024*512*9 + 2048*1024*9 + 1024*1024*9
    (no biases, no BN) + 4*1024*10 + 10 (linear head on the 2x2 map)."""
    with torch.device("meta"):
        counts = {p: count_parameters(layerwise_cnn(10, preset=p)) for p in ("k1", "k2", "k3")}
    assert counts == {"k1": 33_668_106, "k2": 2_523_018, "k3": 3_113_354}


def test_conv_biases_follow_the_official_code():
    """greedyNet's first conv has bias=not batchnorm, every later block_conv bias=False."""
    with torch.device("meta"):
        code = layerwise_cnn(10, preset="k1")
        every = layerwise_cnn(10, preset="k1", conv_bias="without_bn")
        bn = layerwise_cnn(10, preset="k3")
    assert [m.bias is not None for m in code.modules() if isinstance(m, nn.Conv2d)] == [True] + [False] * 4
    assert all(m.bias is not None for m in every.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is None for m in bn.modules() if isinstance(m, nn.Conv2d))


def test_bn_gamma_is_drawn_from_u01_as_pytorch_0_4_did_and_ones_on_request():
    torch.manual_seed(0)
    old = layerwise_cnn(10, preset="k3", M=8, M_tilde=8)
    torch.manual_seed(0)
    again = [*layerwise_cnn(10, preset="k3", M=8, M_tilde=8).modules()]
    new = layerwise_cnn(10, preset="k3", M=8, M_tilde=8, bn_weight_init="ones")
    gammas = torch.cat([m.weight.detach() for m in old.modules() if isinstance(m, nn.BatchNorm2d)])
    assert len(gammas) > 50 and 0 <= gammas.min() and gammas.max() < 1 and gammas.std() > 0.2  # U(0,1): sd 0.29
    assert torch.equal(gammas, torch.cat([m.weight.detach() for m in again if isinstance(m, nn.BatchNorm2d)]))
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in new.modules() if isinstance(m, nn.BatchNorm2d))
    heads = layerwise_cnn_heads(10, preset="k3", M=8, M_tilde=8)  # the heads' BatchNorms too
    assert all(m.weight.max() < 1 for h in heads for m in h.modules() if isinstance(m, nn.BatchNorm2d))


def test_compressed_network_is_the_5x64_baseline():
    with torch.device("meta"):
        final = layerwise_cnn(10, preset="compress").classifier
        base = layerwise_cnn(10, preset="5x64")
    assert [m.out_channels for m in final if isinstance(m, nn.Conv2d)] == [64, 64]
    # After pruning every block 128 -> 64 the network must be the 5-layer width-64 CNN.
    model = layerwise_cnn(10, preset="compress", channel_mask=True)
    for mask in (m for m in model.modules() if isinstance(m, ChannelMask)):
        prune_lowest(mask, torch.rand(128), 64)
    assert count_parameters(slice_pruned(model)) == count_parameters(base)


def test_bad_model_kwargs():
    with pytest.raises(ValueError, match="unknown preset"):
        layerwise_cnn(10, preset="k9")
    with pytest.raises(ValueError, match="downsample_at"):
        layerwise_cnn(10, J=2, downsample_at=[2])
    with pytest.raises(ValueError, match="models.layerwise_cnn"):
        build_model({"arch": "layerwise_cnn", "width": 3}, 10)
    with pytest.raises(ValueError, match="conv_bias must be one of block0, without_bn"):
        layerwise_cnn(10, preset="k1", conv_bias="all")
    with pytest.raises(ValueError, match="bn_weight_init must be one of uniform, ones"):
        layerwise_cnn(10, preset="k3", bn_weight_init="zeros")


# --- sequential training ---------------------------------------------------------------

def run_phases(spec: RunSpec, data: DeviceData, batches: int = 2):
    """Drive the method's phases by hand, a few batches each; yields (phase, state before, state after)."""
    ctx = RunContext(spec, data, 10, CPU)
    torch.manual_seed(spec.seed)
    for pi, phase in enumerate(layerwise.phases(spec, ctx)):
        before = {k: snapshot(m) for k, m in phase.modules.items()}
        phase.on_epoch_start(0)
        phase.train_mode()
        for i, (x, y) in enumerate(data.train_batches(spec.seed, pi, 0, 32)):
            if i == batches:
                break
            phase.step(x, y)
        yield phase, before, {k: snapshot(m) for k, m in phase.modules.items()}


def test_earlier_stages_frozen_and_heads_fresh(data):
    spec = make_spec(layerwise, TINY_K3)
    initial_heads = None
    trained_at: dict[int, dict] = {}
    for s, (phase, before, after) in enumerate(run_phases(spec, data)):
        assert phase.name == f"stage{s + 1}"
        model_b, model_a = before["model"], after["model"]
        if initial_heads is None:
            initial_heads = before["heads"]
        for j in range(s):  # earlier blocks: weights AND BatchNorm buffers bit-identical
            assert same(model_b, model_a, f"block{j}.")
            assert same(trained_at[j], model_a, f"block{j}.")
        for kind in ("weight", "running_mean"):  # the stage being trained moves, its BatchNorm statistics too
            assert any(not torch.equal(model_b[k], model_a[k]) for k in model_a
                       if k.startswith(f"block{s}.") and k.endswith(kind))
        for j in range(2):  # intermediate heads: only the current one moves; later ones untouched (fresh)
            if j == s:
                assert not same(before["heads"], after["heads"], f"{j}.")
            else:
                assert same(before["heads"], after["heads"], f"{j}.")
            if j > s:
                assert same(initial_heads, after["heads"], f"{j}.")
        # The optimizer holds exactly this stage's block and head.
        model = phase.modules["model"]
        head = [*phase.modules["heads"], model.classifier][s]
        expected = {id(p) for p in [*model[s].parameters(), *head.parameters()]}
        assert {id(p) for g in phase.optimizers["sgd"].param_groups for p in g["params"]} == expected
        trained_at[s] = model_a


@pytest.mark.parametrize("cfg, units", [({"arch": "vgg16", "width": 0.0625}, {"stage": 5, "layer": 13}),
                                        ({"arch": "cifar_resnet", "depth": 14, "width": 4}, {"stage": 3, "layer": 6})])
@pytest.mark.parametrize("unit", ["stage", "layer"])
def test_earlier_units_stay_bit_identical(data, cfg, units, unit):
    """VGG16 and the CIFAR ResNet, per stage and per layer: training unit s leaves every earlier unit's
    weights AND BatchNorm buffers bit-identical (and the later ones untouched), moves unit s, and its
    optimizer holds exactly unit s and its head."""
    spec = make_spec(layerwise, cfg, {"unit": unit})
    torch.manual_seed(0)
    trained: dict[int, dict] = {}
    phases = list(layerwise.phases(spec, RunContext(spec, data, 10, CPU)))
    assert [p.name for p in phases] == [f"{unit}{s + 1}" for s in range(units[unit])]
    for s, phase in enumerate(phases):
        view = unit_view(phase.modules["model"], unit)
        ends = stage_ends(view)
        parts = [view[(ends[j - 1] if j else 0):ends[j]] for j in range(len(ends))]
        before = [snapshot(p) for p in parts]
        phase.on_epoch_start(0)
        phase.train_mode()
        for i, (x, y) in enumerate(data.train_batches(0, s, 0, 32)):
            if i == 2:
                break
            phase.step(x, y)
        after = [snapshot(p) for p in parts]
        for j in range(s):
            assert same(before[j], after[j]) and same(trained[j], after[j])
        for j in range(s + 1, len(parts)):
            assert same(before[j], after[j])
        for kind in ("weight", "running_mean"):  # the unit being trained moves, its BatchNorm statistics too
            assert any(not torch.equal(before[s][k], after[s][k]) for k in after[s] if k.endswith(kind))
        head = [*phase.modules["heads"], view.classifier][s]
        expected = {id(p) for p in [*parts[s].parameters(), *head.parameters()]}
        assert {id(p) for g in phase.optimizers["sgd"].param_groups for p in g["params"]} == expected
        trained[s] = after[s]


def test_ensemble_predictor_is_saved_and_reloaded(data, tmp_path):
    spec = make_spec(layerwise, TINY_K3, {"predict": "ensemble"})
    ctx = RunContext(spec, data, 10, CPU)
    result = train_run(spec, layerwise, ctx, tmp_path)
    ens = layerwise.predictor(spec, 10)
    ens.load_state_dict(torch.load(tmp_path / "final.pt"))  # what the evaluate stage does
    assert isinstance(ens, layerwise.StageEnsemble)
    assert ctx.evaluate(ens, "val")["acc"] == pytest.approx(result["final"]["val_acc"])
    assert result["phase_metrics"]["stage3"]["ensemble_test_acc"] == pytest.approx(ctx.evaluate(ens, "test")["acc"])


def test_ensemble_weights_and_output():
    assert layerwise.ensemble_weights(3) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert sum(layerwise.ensemble_weights(5)) == pytest.approx(1.0)
    torch.manual_seed(0)
    spec = make_spec(layerwise, TINY_K3, {"predict": "ensemble"})
    ens = layerwise.predictor(spec, 10).eval()
    x = torch.randn(3, 3, 32, 32)
    model, heads = ens.model, [*ens.heads, ens.model.classifier]
    expected = sum(w * heads[s](model[:end](x)) for s, (w, end) in
                   enumerate(zip(layerwise.ensemble_weights(3), stage_ends(model))))
    assert torch.allclose(ens(x), expected, atol=1e-6)


def test_train_run_records_stages_and_resumes_exactly(data, tmp_path):
    spec = make_spec(layerwise, TINY_COMPRESS, {"prune_to": 3, "prune_finetune_epochs": 2})
    ctx = RunContext(spec, data, 10, CPU)
    full = train_run(spec, layerwise, ctx, tmp_path / "full")
    names = ["stage1", "stage1_pruned", "stage2", "stage2_pruned", "stage3", "stage3_pruned"]
    assert list(full["phase_metrics"]) == names
    declared = layerwise.phase_metrics(spec.options, spec.model_cfg)  # what claims may name: what a run records
    assert {p: set(m) for p, m in full["phase_metrics"].items()} == {p: set(m) for p, m in declared.items()}
    final = full["phase_metrics"]["stage3_pruned"]
    assert set(final) == {"head_train_acc", "head_test_acc", "ensemble_test_acc", "params"}
    base = layerwise_cnn(10, preset="compress", M=3, M_tilde=3, final_M_tilde=3)  # the pruned shape
    assert final["params"] == count_parameters(base)
    # Interrupted inside a pruned phase (stage2_pruned, after its epoch 0), then resumed: bit-identical.
    assert train_run(spec, layerwise, ctx, tmp_path / "cut", stop_after_epochs=5) == {"interrupted": True}
    resumed = train_run(spec, layerwise, ctx, tmp_path / "cut")
    assert resumed["final_sha256"] == full["final_sha256"]
    model = layerwise.predictor(spec, 10)
    model.load_state_dict(torch.load(tmp_path / "full" / "final.pt"))
    assert [int(m.mask.sum()) for m in model.modules() if isinstance(m, ChannelMask)] == [3, 3, 3]


def test_prune_plan_one_shot_and_iterative():
    assert layerwise.prune_plan(128, 64, 20, "one_shot", 4) == {0: 64}
    # Molchanov-style: four equal steps at evenly spaced fine-tuning epochs, the last one at the target
    assert layerwise.prune_plan(128, 64, 20, "iterative", 4) == {0: 112, 5: 96, 10: 80, 15: 64}
    assert layerwise.prune_plan(8, 3, 2, "iterative", 2) == {0: 6, 1: 3}


def test_iterative_pruning_prunes_in_steps_and_resumes_exactly(data, tmp_path):
    """The filters go step by step at the planned epochs of the fine-tuning phase, each step re-scored;
    an interruption between two steps resumes bit-identically."""
    spec = make_spec(layerwise, TINY_COMPRESS, {"prune_to": 2, "prune_finetune_epochs": 2, "prune_schedule": "iterative",
                                                "prune_steps": 2})
    ctx = RunContext(spec, data, 10, CPU)
    live = []
    for phase in layerwise.phases(spec, ctx):
        if phase.name == "stage1_pruned":
            for epoch in range(2):
                phase.on_epoch_start(epoch)
                live.append([int(m.mask.sum()) for m in phase.modules["model"].modules() if isinstance(m, ChannelMask)][0])
            break
    assert live == [4, 2]  # 6 filters -> 4 at the fine-tuning's epoch 0 -> 2 at epoch 1
    full = train_run(spec, layerwise, ctx, tmp_path / "full")
    assert train_run(spec, layerwise, ctx, tmp_path / "cut", stop_after_epochs=2) == {"interrupted": True}
    assert train_run(spec, layerwise, ctx, tmp_path / "cut")["final_sha256"] == full["final_sha256"]


def test_other_architectures_get_aux_heads(data):
    spec = make_spec(layerwise, {"arch": "cifar_resnet", "depth": 8, "width": 4}, {"aux_convs": 1, "aux_width": 5})
    model, _, heads = layerwise.build(spec, 10)
    assert stage_ends(model) == [2, 3, 4] and len(heads) == 2  # stem joins stage1
    assert all(h[0].out_channels == 5 for h in heads)
    phases = [p.name for p, _, _ in run_phases(spec, data, batches=1)]
    assert phases == ["stage1", "stage2", "stage3"]


def test_momentum_restarts_at_lr_drops(data):
    spec = make_spec(layerwise, TINY_K3, train={**TRAIN, "epochs": 3})
    phase = next(layerwise.phases(spec, RunContext(spec, data, 10, CPU)))
    phase.train_mode()
    phase.step(*next(data.train_batches(0, 0, 0, 32)))
    opt = phase.optimizers["sgd"]
    assert opt.state
    phase.on_epoch_start(1)  # step_size 1: the learning rate dropped, the code re-creates the optimizer
    assert not opt.state


@pytest.mark.parametrize("options, match", [
    ({"predict": "best"}, "predict"), ({"prune_to": -1}, "prune_to"), ({"aux_convs": 1.5}, "aux_convs"),
    ({"prune_to": 4, "prune_finetune_epochs": 0}, "prune_finetune_epochs"), ({"k": 3}, "unknown option"),
    ({"unit": "block"}, "unit"), ({"probe_epochs": -1}, "probe_epochs"), ({"probe_lr": 0.0}, "probe_lr"),
    ({"prune_schedule": "gradual"}, "prune_schedule"), ({"prune_steps": 0}, "prune_steps"),
    ({"prune_to": 4, "prune_finetune_epochs": 2, "prune_schedule": "iterative", "prune_steps": 3}, "prune_steps"),
])
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        layerwise.validate_options(options, "experiments.x.options")


def test_pruning_needs_masks_architecture(data):
    spec = make_spec(layerwise, {"arch": "cnn", "width": 4}, {"prune_to": 2})
    with pytest.raises(ConfigError, match="prune_to"):
        layerwise.predictor(spec, 10)


# --- pruning ---------------------------------------------------------------------------

def test_taylor_criterion_and_lowest_filters_pruned():
    torch.manual_seed(0)
    model = layerwise_cnn(10, preset="compress", M=6, M_tilde=4, channel_mask=True).eval()
    prefix, head = model[:1], layerwise_cnn_heads(10, preset="compress", M=6, M_tilde=4, channel_mask=True)[0].eval()
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    scores = taylor_scores(prefix, head, [(x[:2], y[:2]), (x[2:], y[2:])])
    manual = []  # per example: |mean_hw z * dL/dz|, then the mean over examples, then L2 normalised
    for i in range(5):
        z = prefix(x[i:i + 1]).detach().requires_grad_(True)
        g, = torch.autograd.grad(nn.functional.cross_entropy(head(z), y[i:i + 1]), z)
        manual.append((z * g).mean(dim=(2, 3)).abs()[0])
    manual = torch.stack(manual).mean(0)
    assert torch.allclose(scores, manual / manual.norm(), atol=1e-5)
    mask = model.block0[-1]
    pruned = prune_lowest(mask, scores, keep=4)
    assert set(pruned.tolist()) == set(torch.argsort(scores)[:2].tolist())
    assert mask.mask.tolist() == [0.0 if c in pruned.tolist() else 1.0 for c in range(6)]
    # Pruning further removes the lowest of the still-live channels only.
    again = prune_lowest(mask, scores, keep=3)
    live_scores = {c: scores[c].item() for c in range(6) if c not in pruned.tolist()}
    assert again.tolist() == [min(live_scores, key=live_scores.get)]


@pytest.mark.parametrize("cfg", [
    {"preset": "compress", "M": 8, "M_tilde": 5},
    {"preset": "k1", "J": 3, "M": 4, "downsample_at": [1]},  # space-to-depth and a linear head
    {"preset": "k2", "J": 3, "M": 4, "M_tilde": 3, "downsample_at": [0, 2], "pool_bn": True},
])
def test_sliced_network_equals_masked_network(cfg):
    torch.manual_seed(1)
    model = layerwise_cnn(10, channel_mask=True, **cfg)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    masks = [m for m in model.modules() if isinstance(m, ChannelMask)]
    for mask in masks:
        prune_lowest(mask, torch.rand(len(mask.mask)), len(mask.mask) // 2)
    model.eval()
    small = slice_pruned(model).eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(small(x), model(x), atol=1e-5)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:len(masks)]] == [len(m.mask) // 2 for m in masks]
    assert count_parameters(small) < count_parameters(model)


# --- linear probes ---------------------------------------------------------------------

def test_probes_never_update_the_probed_model(data):
    spec = make_spec(conventional, {**TINY_K3, "preset": "k1"}, {"probe_epochs": 2})
    ctx = RunContext(spec, data, 10, CPU)
    torch.manual_seed(0)
    model = build_model(spec.model_cfg, 10)
    model.train()
    before = snapshot(model)
    out = probe_stages(model, ctx, epochs=2, lr=0.1)
    assert same(before, snapshot(model)) and model.training
    assert set(out) == {f"stage{s}_probe_{split}_acc" for s in (1, 2, 3) for split in ("train", "test")} | {
        "model_train_acc", "model_test_acc"}
    assert all(0 <= v <= 100 for v in out.values())


def test_conventional_probe_option(data, tmp_path):
    spec = make_spec(conventional, TINY_K3, {"probe_epochs": 1})
    result = train_run(spec, conventional, RunContext(spec, data, 10, CPU), tmp_path)
    assert "stage3_probe_test_acc" in result["phase_metrics"]["end_to_end"]
    plain = make_spec(conventional, TINY_K3)
    assert plain.options == {"probe_epochs": 0, "probe_lr": 0.1, "probe_units": ["stage"]}
    with pytest.raises(ConfigError, match="probe_epochs"):
        conventional.validate_options({"probe_epochs": -1}, "x")


# --- per-stage analysis ----------------------------------------------------------------

def test_critical_stage():
    assert critical_stage([50, 60, 62, 62.5], threshold=1.0) == 3
    assert critical_stage([50, 60, 70], threshold=1.0) == 3  # never saturates: S
    assert critical_stage([50, 50.2, 50.1], threshold=1.0) == 1
    assert critical_stage([50, 60, 60.5, 65], threshold=1.0) == 4  # a late gain counts
    # a slow climb (0.6 a unit, each below the threshold) is not saturation: together they add 1.8
    assert critical_stage([50, 50.6, 51.2, 51.8], threshold=1.0) == 3
    with pytest.raises(ValueError):
        critical_stage([], 1.0)


def synthetic_phases() -> pd.DataFrame:
    rows = []

    def add(run, exp, method, seed, phase, metric, value):
        rows.append({"run": run, "experiment": exp, "method": method, "model": "p3", "dataset": "cifar10",
                     "seed": seed, "phase": phase, "metric": metric, "value": value})

    for seed in (0, 1, 2):
        lw_test, lw_train = [60 + seed, 70, 70.5, 71.2], [90, 92, 85, 80]
        pr_test, pr_train = [40, 55, 70, 80], [42, 58, 74, 86]
        lp_test, lp_train = [55, 65, 70, 71], [80, 85 + seed, 80, 78]
        for s in range(4):
            add(f"lw{seed}", "layerwise", "layerwise", seed, f"stage{s + 1}", "head_test_acc", lw_test[s])
            add(f"lw{seed}", "layerwise", "layerwise", seed, f"stage{s + 1}", "head_train_acc", lw_train[s])
            add(f"lw{seed}", "layerwise", "layerwise", seed, f"stage{s + 1}", "ensemble_test_acc", 0.0)
            add(f"e{seed}", "layerwise_e2e", "conventional", seed, "end_to_end", f"stage{s + 1}_probe_test_acc",
                pr_test[s])
            add(f"e{seed}", "layerwise_e2e", "conventional", seed, "end_to_end", f"stage{s + 1}_probe_train_acc",
                pr_train[s])
            # the layerwise network's own probes (P2-C2, probe vs probe), in its last phase
            add(f"lw{seed}", "layerwise", "layerwise", seed, "stage4", f"stage{s + 1}_probe_test_acc", lp_test[s])
            add(f"lw{seed}", "layerwise", "layerwise", seed, "stage4", f"stage{s + 1}_probe_train_acc", lp_train[s])
        add(f"e{seed}", "layerwise_e2e", "conventional", seed, "end_to_end", "model_test_acc", 85.0 + seed)
        # a pruned stage supersedes the unpruned measure
        add(f"lw{seed}", "layerwise", "layerwise", seed, "stage1_pruned", "head_test_acc", 50 + seed)
        add(f"lw{seed}", "layerwise", "layerwise", seed, "stage1_pruned", "head_train_acc", 91)
    return pd.DataFrame(rows)


def test_stage_table_and_measures():
    phases = synthetic_phases()
    t = stage_table(phases)
    assert len(t) == 3 * 12 and set(t.source) == {"layerwise", "probe"} and set(t.unit) == {"stage"}
    s1 = t[(t.source == "layerwise") & (t.stage == 1) & (t.seed == 2)].iloc[0]
    assert (s1.test_acc, s1.train_acc, s1.gap) == (52, 91, 39)
    lw, e2e = {"experiment": "layerwise", "model": "p3"}, {"experiment": "layerwise_e2e", "model": "p3"}
    sat = saturation(phases, e2e, lw, "cifar10", threshold=1.0)
    assert sat["n_stages"] == 4
    assert sat["layerwise_full"] == {0: 71.2, 1: 71.2, 2: 71.2}
    assert sat["end_to_end_full"] == {0: 85.0, 1: 86.0, 2: 87.0}
    assert sat["gap_full"][1] == pytest.approx(86.0 - 71.2)
    # curve 50+seed (pruned), 70, 70.5, 71.2: stages 3 and 4 together add 1.2 >= 1 to stage 2
    assert sat["critical_stage"] == {0: 3, 1: 3, 2: 3} and sat["probe_critical_stage"] == {0: 4, 1: 4, 2: 4}
    assert sat["window_gain"] == pytest.approx({0: 0.7, 1: 0.7, 2: 0.7})
    assert saturation(phases, e2e, lw, "cifar10", 1.0, window=2)["window_gain"] == pytest.approx({0: 1.2, 1: 1.2,
                                                                                                  2: 1.2})
    assert sat["critical_interval"] == {"median": 3, "low": 3, "high": 3, "coverage": 0.75, "n": 3}
    assert saturation(phases, e2e, lw, "cifar10", 1.0, unit="layer")["critical_stage"] == {}  # no layer runs
    ov = early_overfit(phases, lw, e2e, "cifar10")
    assert ov["early_stages"] == 2
    # probe vs probe: the layerwise network's probes against the end-to-end network's
    assert ov["layerwise_probe_gap"][1] == pytest.approx(((80 - 55) + (86 - 65)) / 2)
    assert ov["end_to_end_probe_gap"][0] == pytest.approx(((42 - 40) + (58 - 55)) / 2)
    assert ov["layerwise_head_gap"][0] == pytest.approx(((91 - 50) + (92 - 70)) / 2)  # descriptive
    assert early_overfit(phases, lw, e2e, "cifar10", early_stages=1)["end_to_end_probe_gap"][2] == pytest.approx(2)
    assert stage_pairs(phases) == [{"model": "p3", "dataset": "cifar10", "unit": "stage", "layerwise": "layerwise",
                                    "end_to_end": "layerwise_e2e"}]
    # the same runs per layer (phases layer{s}, metrics layer{s}_probe_*) give the same measures at unit layer
    layers = phases.assign(phase=phases.phase.str.replace("stage", "layer"),
                           metric=phases.metric.str.replace("stage", "layer"))
    assert saturation(layers, e2e, lw, "cifar10", 1.0, unit="layer")["critical_stage"] == sat["critical_stage"]
    assert early_overfit(layers, lw, e2e, "cifar10", unit="layer")["layerwise_probe_gap"] == ov["layerwise_probe_gap"]
    assert early_overfit(layers, lw, e2e, "cifar10")["layerwise_probe_gap"] == {}  # no stage units there
    missing = saturation(phases, {"experiment": "none", "model": "p3"}, lw, "cifar10", 1.0)
    assert missing["end_to_end_full"] == {} and missing["gap_full"] == {}


def _saturation_tables(e2e_rise: float, seeds=range(6)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Layerwise heads that saturate (last unit +0.1), an end-to-end network 8 points higher at full depth,
    whose probes gain `e2e_rise` points over the last unit."""
    rng = np.random.default_rng(1)
    rows, runs = [], []
    for seed in seeds:
        lw = [60, 70, 70.4, 70.5 + rng.normal(0, 0.1)]
        probes = [40, 55, 70, 70 + e2e_rise + rng.normal(0, 0.2)]
        full = 78.5 + rng.normal(0, 0.3)
        for s in range(4):
            rows.append({"run": f"lw{seed}", "experiment": "layerwise", "method": "layerwise", "model": "p3",
                         "dataset": "cifar10", "seed": seed, "phase": f"stage{s + 1}", "metric": "head_test_acc",
                         "value": lw[s]})
            rows.append({"run": f"e{seed}", "experiment": "layerwise_e2e", "method": "conventional", "model": "p3",
                         "dataset": "cifar10", "seed": seed, "phase": "end_to_end",
                         "metric": f"stage{s + 1}_probe_test_acc", "value": probes[s]})
        rows.append({"run": f"e{seed}", "experiment": "layerwise_e2e", "method": "conventional", "model": "p3",
                     "dataset": "cifar10", "seed": seed, "phase": "end_to_end", "metric": "model_test_acc", "value": full})
        runs += [{"run": f"lw{seed}", "experiment": "layerwise", "model": "p3", "dataset": "cifar10", "seed": seed,
                  "final_test_acc": lw[-1]},
                 {"run": f"e{seed}", "experiment": "layerwise_e2e", "model": "p3", "dataset": "cifar10", "seed": seed,
                  "final_test_acc": full}]
    return pd.DataFrame(runs), pd.DataFrame(rows)


@pytest.mark.parametrize("reading, e2e_rise, expected", [
    ("gap", 0.0, "supported"),              # the abstract's reading: a gap and a saturating layerwise curve
    ("keeps_improving", 3.0, "supported"),  # ... and the end-to-end probes still gain 3 points
    ("keeps_improving", 0.0, "contradicted"),  # they gain nothing: end-to-end does not keep improving
])
def test_saturation_end_to_end_readings(reading, e2e_rise, expected):
    claim = Claim("P2-X", "P2", "Trinh", "saturates", "saturation", "final_test_acc", "cifar10",
                  [Arm("a", "layerwise_e2e", "p3"), Arm("b", "layerwise", "p3")], "not public", "", min_effect=1.0,
                  extra={"threshold": 0.5, "end_to_end": reading})
    runs, phases = _saturation_tables(e2e_rise)
    rec = check([claim], runs, phases, None, "paper", alpha=0.05, min_seeds=3)[0]
    assert rec["verdict"] == expected, rec["reason"]
    assert rec["end_to_end"] == reading
    if reading == "keeps_improving":
        assert rec["end_to_end_probe_window_gain"][0] == pytest.approx(e2e_rise, abs=1)
    bad = Claim(**{**claim.__dict__, "extra": {"threshold": 0.5, "end_to_end": "rises"}})
    with pytest.raises(ValueError, match="end_to_end: expected one of gap, keeps_improving"):
        check([bad], runs, phases, None, "paper", alpha=0.05, min_seeds=3)


def test_stage_figure():
    fig = stage_figure(synthetic_phases(), "p3", "cifar10")
    ax_acc, ax_gap = fig.axes
    assert len(ax_acc.lines) >= 3 and len(ax_gap.lines) == 3  # heads, layerwise probes, end-to-end probes
    assert np.allclose(ax_acc.lines[0].get_ydata(), [51, 70, 70.5, 71.2])  # mean over seeds, pruned stage 1
    assert len(ax_acc.collections) >= 2  # the bands across seeds
    assert list(stage_figures(synthetic_phases())) == ["stages_p3_cifar10"]


# --- params.yaml -----------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["paper", "smoke"])
def test_profiles_plan_and_build(profile):
    params = shipped_params()
    specs = [s for s in plan_of(params, profile) if s.method == "layerwise" or s.options.get("probe_epochs")]
    assert {s.experiment for s in specs} >= {"layerwise", "layerwise_e2e", "compress_layerwise"}
    for s in {(s.method, s.model): s for s in specs}.values():
        with torch.device("meta"):
            assert METHODS[s.method].predictor(s, 10)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    if profile == "paper":
        k3 = next(s for s in specs if s.model == "p3_k3" and s.method == "layerwise")
        assert k3.train["epochs"] == 50 and k3.train["schedule"] == {"name": "step", "step_size": 15, "gamma": 0.2}
        assert k3.train["optimizer"]["lr"] == 0.1 and math.isclose(k3.train["optimizer"]["weight_decay"], 5e-4)


# --- claims records ----------------------------------------------------------------------

def test_claims_records_load_and_check(tmp_path):
    import yaml

    from l2l.claims import check, load_claims

    repo = Path(__file__).resolve().parents[1]
    doc = {"papers": yaml.safe_load((repo / "claims.yaml").read_text())["papers"],
           "claims": yaml.safe_load((repo / "claims" / "layerwise.yaml").read_text())}
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(doc))
    claims = {c.id: c for c in load_claims(config_of(shipped_params()), tmp_path / "claims.yaml")}
    assert {"P3-C1", "P3-C2", "P3-C3", "P3-C4", "P3-C5", "P2-C1-vgg16", "P2-C2-resnet20"} <= set(claims)
    assert claims["P3-C5"].margin == 1.0 and claims["P2-C1-p3cnn"].extra["threshold"] == 0.5

    phases = synthetic_phases().assign(model="p3_k1")
    runs = pd.DataFrame([{"run": f"{r}{s}", "experiment": e, "model": "p3_k1", "dataset": "cifar10", "seed": s,
                          "final_test_acc": 70.0 + s} for s in (0, 1, 2)
                         for r, e in (("lw", "layerwise"), ("e", "layerwise_e2e"))])
    picked = [claims["P2-C1-p3cnn"], claims["P2-C2-p3cnn"], claims["P2-C1-vgg16"]]
    recs = {r["id"]: r for r in check(picked, runs, phases, None, "paper", 0.05, 3)}
    # layerwise curve 51, 70, 70.5, 71.2: +0.7 at the last stage on every seed, above the threshold 0.5:
    # a curve that keeps improving contradicts saturation (exact: zero variance on 3 seeds)
    p2 = recs["P2-C1-p3cnn"]
    assert p2["window_gain"] == pytest.approx({0: 0.7, 1: 0.7, 2: 0.7}) and p2["verdict"] == "contradicted"
    assert recs["P2-C2-p3cnn"]["verdict"] == "supported"  # early probe gaps ~23 vs 2.5 points
    assert recs["P2-C1-vgg16"]["status"] == "not run"
    claims["P2-C1-p3cnn"].extra["threshold"] = 1.0  # now the curve saturates after stage 2
    rec = check([claims["P2-C1-p3cnn"]], runs, phases, None, "paper", 0.05, 3)[0]
    assert rec["critical_stage_of_mean"] == 3 and rec["verdict"] == "supported"


def test_report_section_and_claim_figure(tmp_path):
    from l2l.report import Doc

    synthetic_phases().to_csv(tmp_path / "phases.csv", index=False)
    doc = Doc()
    report_section(doc, tmp_path)
    assert list(doc.figures) == ["stages_p3_cifar10"]
    table = next(b[1] for b in doc.blocks if b[0] == "table")
    assert table["stage"].tolist() == ["1", "2", "3", "4"]
    assert table["layerwise head: test acc"].tolist() == pytest.approx([51, 70, 70.5, 71.2])
    report_section(empty := Doc(), tmp_path / "missing")  # no per-stage results: no section
    assert not empty.blocks
    rec = {"kind": "saturation", "status": "run", "dataset": "cifar10",
           "arms": {"a": {"experiment": "layerwise_e2e", "model": "p3"}, "b": {"experiment": "layerwise", "model": "p3"}}}
    assert len(record_stage_figure(rec, synthetic_phases()).axes) == 2
    assert record_stage_figure({**rec, "kind": "superiority"}, synthetic_phases()) is None


def test_p3_claims_declare_the_precision_bn_init_and_images_their_arms_train_with(tmp_path):
    """Each P3 record's protocol says fp32, BN gamma U(0,1) and all 50,000 images, and the paper
    profile's runs of its arms do exactly that; sensitivity records say why; provenance is filled in."""
    import yaml

    from l2l.claims import load_claims

    repo = Path(__file__).resolve().parents[1]
    doc = {"papers": yaml.safe_load((repo / "claims.yaml").read_text())["papers"],
           "claims": yaml.safe_load((repo / "claims" / "layerwise.yaml").read_text())}
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(doc))
    params = shipped_params()
    claims = [c for c in load_claims(config_of(params), tmp_path / "claims.yaml") if c.paper == "P3"]
    specs = plan_of(params, "paper")
    assert {c.id for c in claims if c.role == "sensitivity"} == {*(f"P3-C{k}-paper-text" for k in (1, 2, 3)),
                                                                 "P3-C5-iterative"}
    for c in claims:
        assert "fp32 with TF32 off" in c.protocol and "U(0,1)" in c.protocol and "50,000" in c.protocol, c.id
        assert c.stated_in != "unconfirmed" and c.harness_choices, c.id
        assert c.role == "primary" or c.role_reason, c.id
        runs = [s for s in specs if any((s.experiment, s.model) == (a.experiment, a.model) for a in c.arms)]
        assert runs and all(s.train["precision"] == "fp32" and s.train["tf32"] is False and s.data["val_size"] == 0
                            for s in runs), c.id
        for s in runs:
            assert s.model_cfg["arch"] == "layerwise_cnn" and s.model_cfg["preset"] in LAYERWISE_PRESETS
            assert LAYERWISE_PRESETS[s.model_cfg["preset"]]["bn_weight_init"] == "uniform"
            assert s.model_cfg["bn_weight_init"] is None  # the preset's, not overridden


@pytest.mark.parametrize("profile", ["paper", "smoke"])
def test_p2_arms_probe_at_equal_budgets_and_the_claims_unit(profile):
    """Every P2 per-unit claim compares like with like in the resolved plan: both arms' probes get the
    same budget (epochs, lr; probes on), the layerwise arm trains at the claim's unit and the
    end-to-end arm probes that unit."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    records = [r for r in yaml.safe_load((repo / "claims" / "layerwise.yaml").read_text())
               if r["kind"] in ("saturation", "early_overfit")]
    specs = plan_of(shipped_params(), profile)
    checked = 0
    for r in records:
        unit = r.get("unit", "stage")
        lw_name, e2e_name = ("b", "a") if r["kind"] == "saturation" else ("a", "b")
        arm_specs = {name: [s for s in specs if s.experiment == r["arms"][name]["experiment"]
                            and s.model == r["arms"][name]["model"]] for name in ("a", "b")}
        if not all(arm_specs.values()):
            continue  # not in this profile
        for lw, e2e in zip(arm_specs[lw_name], arm_specs[e2e_name]):
            assert lw.method == "layerwise" and e2e.method == "conventional"
            assert lw.options["unit"] == unit and unit in e2e.options["probe_units"], r["id"]
            if r["kind"] == "early_overfit":
                assert lw.options["probe_epochs"] == e2e.options["probe_epochs"] > 0, r["id"]
                assert lw.options["probe_lr"] == e2e.options["probe_lr"], r["id"]
        checked += 1
    assert checked >= (10 if profile == "paper" else 4)


def test_a_probing_runs_measures_are_those_it_declares(data, tmp_path):
    """The last stage's phase also records the network's probes: declared so, for claims to name them."""
    spec = make_spec(layerwise, TINY_K3, {"probe_epochs": 1})
    result = train_run(spec, layerwise, RunContext(spec, data, 10, CPU), tmp_path)
    declared = layerwise.phase_metrics(spec.options, spec.model_cfg)
    assert {p: set(m) for p, m in result["phase_metrics"].items()} == {p: set(m) for p, m in declared.items()}
    assert "stage3_probe_test_acc" in declared["stage3"] and "stage3_probe_test_acc" not in declared["stage2"]


def test_layer_units_only_where_they_exist():
    spec = make_spec(layerwise, {"arch": "densenet", "growth_rate": 4, "block_config": [1, 1], "num_init_features": 8,
                                 "bn_size": 2}, {"unit": "layer"})
    with pytest.raises(ConfigError, match=r"x\.unit: expected stage for this model"):
        layerwise.check(spec, 10, "x")
    e2e = make_spec(conventional, spec.model_cfg, {"probe_epochs": 1, "probe_units": ["layer"]})
    with pytest.raises(ConfigError, match=r"x\.probe_units: expected stage for this model"):
        conventional.check(e2e, 10, "x")
    with pytest.raises(ConfigError, match="probe_units"):
        conventional.validate_options({"probe_units": ["stage", "stage"]}, "x")


def test_layer_and_stage_probes_agree_where_a_stage_ends(data):
    """One set of probes serves both units: the stage probes equal the layer probes at stage ends."""
    cfg = {"arch": "cifar_resnet", "depth": 14, "width": 4}
    spec = make_spec(conventional, cfg, {"probe_epochs": 1, "probe_units": ["stage", "layer"]})
    ctx = RunContext(spec, data, 10, CPU)
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    both = probe_stages(model, ctx, epochs=1, lr=0.1, units=("stage", "layer"))
    alone = probe_stages(model, ctx, epochs=1, lr=0.1, units=("stage",))
    assert {k for k in both if k.startswith("layer")} == {f"layer{l}_probe_{s}_acc" for l in range(1, 7)
                                                          for s in ("train", "test")}
    for s, l in enumerate((2, 4, 6), start=1):  # stage s ends at residual block 2s
        for split in ("train", "test"):
            assert both[f"stage{s}_probe_{split}_acc"] == both[f"layer{l}_probe_{split}_acc"] == \
                alone[f"stage{s}_probe_{split}_acc"]


def test_the_analysis_knows_the_models_units():
    from l2l import layerwise_analysis, models

    assert layerwise_analysis.UNITS == models.UNITS

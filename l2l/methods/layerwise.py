"""Greedy layerwise training (P3: Belilovsky, Eickenberg, Oyallon 2019; P2 applies it across
architectures).

The network's greedy units are trained one after another, one phase per unit: option ``unit``
``stage`` (default: the stages of :func:`l2l.models.stage_ends`, P3's blocks; phases
``stage1..stageS``) or ``layer`` (each conv layer of a VGG / the regular CNN, each residual block
of a CIFAR ResNet, :func:`l2l.models.layer_view`; phases ``layer1..layerL``: P2's critical
*layer*). Below, "stage" means the unit. Stage s is trained with its own fresh auxiliary head on the
cross-entropy of the labels while stages < s are frozen: no gradient, eval mode (BatchNorm
statistics frozen too), recomputed on every batch (the augmentation differs each epoch). The
optimizer and its schedule are created anew for each stage; the head of stage s is left
behind (never trained again) when stage s+1 starts; there is no end-to-end fine-tuning.
Prediction: the trunk and the last stage's head, which is the model's own ``classifier``, so
the final network has exactly the architecture of its end-to-end twin (``conventional`` on
the same model). All heads are kept (frozen) for P3's ensemble. The model is built before
the heads, so for a given seed the trunk starts from its end-to-end twin's initialisation.

Heads: ``layerwise_cnn`` models bring their own (k-1 convs of width M_tilde, 2x2 average pool,
linear); any other architecture (vgg16, cifar_resnet) gets ``aux_convs`` convs of width
``aux_width`` with the same pooling and linear layer, and its own classifier at the last stage.

Per-stage measures (results/phases.csv, reporting only, nothing is selected on test):
``head_train_acc`` (un-augmented training split) and ``head_test_acc`` of the stage's predictor
(stages <= s and head s), ``ensemble_test_acc`` (heads 1..s, weights 2^j normalised) and
``params`` (of the stage's predictor, pruned filters removed). Its validation accuracy is the
phase's last ``val_acc`` in history.csv.

Probes (P2-C2 like with like, ``probe_epochs`` > 0): at the end of the last phase, linear probes
(:mod:`l2l.probe`, the budget ``probe_epochs`` / ``probe_lr`` that the end-to-end twin's probes
get) read every unit of the frozen layerwise-trained network; metrics ``<unit><s>_probe_*`` of the
last phase.

Compression (P3-C5, ``prune_to`` > 0, layerwise_cnn only): after stage s is trained, its block
is pruned to ``prune_to`` filters by Molchanov's first-order Taylor criterion (over the
un-augmented training split, block and head in eval mode), and its head is fine-tuned for
``prune_finetune_epochs`` with the block frozen: an extra phase ``stage{s}_pruned``. P3's text names
the criterion, not the schedule (``prune_schedule``): ``one_shot`` (default) removes every filter at
the phase's start; ``iterative`` (Molchanov et al.'s own procedure: prune, fine-tune, re-score)
removes them in ``prune_steps`` equal steps at evenly spaced epochs of the fine-tuning
(:func:`prune_plan`), each re-scored on the network as it is then (sensitivity claim P3-C5-iterative).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from l2l.checks import config_error
from l2l.engine import Phase, RunContext
from l2l.methods.base import Method
from l2l.methods.options import validate
from l2l.models import (LAYER_ARCHS, UNITS, ChannelMask, aux_head, build_model, layerwise_cnn_heads, stage_ends,
                        stage_outputs, unit_view)
from l2l.probe import OPTIONS as PROBE_OPTIONS, check_budget, probe_stages
from l2l.pruning import count_parameters, prune_lowest, slice_pruned, taylor_scores
from l2l.spec import RunSpec

OPTIONS: dict = {
    # The greedy unit (l2l.models.UNITS): "stage" (P3's blocks; VGG pooling blocks, ResNet stages) or
    # "layer" (each conv layer / residual block: P2 locates a critical *layer*; its units are not
    # public, this is the finest unit the architectures share). layerwise_cnn blocks are single
    # conv layers, so both units coincide there.
    "unit": "stage",
    # The run's predictor: "last" (trunk + last head, P3's prediction) or "ensemble" (all heads,
    # weights 2^j normalised; P3 reports it too, and it is always measured per stage).
    "predict": "last",
    # Heads of architectures without their own (not layerwise_cnn): number of 3x3 convs before the
    # 2x2 pooling and linear layer (0 = P3's k=1 head, the same form as the end-to-end probes) and
    # their width (0 = the stage's own width).
    "aux_convs": 0,
    "aux_width": 0,
    # P3's code re-creates the optimizer at every learning-rate drop (momentum restarts); the paper
    # is silent. true = the code; false = one optimizer per stage.
    "restart_optimizer_at_decay": True,
    # P3-C5 compression: filters kept per block after its training (0 = no pruning) and the epochs
    # of head fine-tuning that follow each pruning.
    "prune_to": 0,
    "prune_finetune_epochs": 20,
    # how the filters go (P3's text: Molchanov's criterion, not the schedule): "one_shot" at the start of
    # the fine-tuning, or "iterative" in prune_steps equal steps during it (prune_plan)
    "prune_schedule": "one_shot",
    "prune_steps": 4,
    # P2-C2's probes of this network (l2l.probe; 0 = none), at the budget of the end-to-end twin's.
    **PROBE_OPTIONS,
}
PREDICTS = ("last", "ensemble")
PRUNE_SCHEDULES = ("one_shot", "iterative")


def validate_options(options: dict, path: str) -> dict:
    out = validate(options, OPTIONS, path)
    check_budget(out, path)
    if out["unit"] not in UNITS:
        raise config_error(f"{path}.unit", "one of " + ", ".join(UNITS), out["unit"])
    if out["predict"] not in PREDICTS:
        raise config_error(f"{path}.predict", "one of " + ", ".join(PREDICTS), out["predict"])
    for key in ("aux_convs", "aux_width", "prune_to"):
        if out[key] < 0:
            raise config_error(f"{path}.{key}", "a non-negative integer", out[key])
    if out["prune_to"] and out["prune_finetune_epochs"] < 1:
        raise config_error(f"{path}.prune_finetune_epochs", "a positive integer with prune_to",
                           out["prune_finetune_epochs"])
    if out["prune_schedule"] not in PRUNE_SCHEDULES:
        raise config_error(f"{path}.prune_schedule", "one of " + ", ".join(PRUNE_SCHEDULES), out["prune_schedule"])
    if out["prune_steps"] < 1 or (out["prune_to"] and out["prune_schedule"] == "iterative"
                                  and out["prune_steps"] > out["prune_finetune_epochs"]):
        raise config_error(f"{path}.prune_steps", "a positive integer, at most prune_finetune_epochs "
                           "(one step per fine-tuning epoch at most)", out["prune_steps"])
    return out


def prune_plan(width: int, keep: int, epochs: int, schedule: str, steps: int) -> dict[int, int]:
    """{fine-tuning epoch: filters kept from then on} of one block of ``width`` filters pruned to
    ``keep``: one_shot {0: keep}; iterative ``steps`` equal steps at epochs floor(i * epochs / steps)
    (the last one exactly ``keep``)."""
    if schedule == "one_shot":
        return {0: keep}
    return {i * epochs // steps: width - round((width - keep) * (i + 1) / steps) for i in range(steps)}


def ensemble_weights(n: int) -> list[float]:
    """P3's ensemble weights of heads 0..n-1: 2^j / sum_i 2^i."""
    total = float(2 ** n - 1)
    return [2 ** j / total for j in range(n)]


class StageEnsemble(nn.Module):
    """Weighted sum of the logits of the heads of the first ``stages`` stages (default: all)."""

    def __init__(self, model: nn.Sequential, heads: nn.ModuleList, stages: int | None = None):
        super().__init__()
        self.model, self.heads = model, heads
        ends = stage_ends(model)
        self.ends = ends[:stages] if stages else ends
        self.weights = ensemble_weights(len(self.ends))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = [*self.heads, self.model.classifier]
        outs = stage_outputs(self.model, x, self.ends)
        return sum(w * heads[s](f) for s, (w, f) in enumerate(zip(self.weights, outs)))


def _model_cfg(spec: RunSpec, path: str | None = None) -> dict:
    if spec.options["prune_to"]:
        if spec.model_cfg["arch"] != "layerwise_cnn":
            raise config_error(f"{path or f'experiments.{spec.experiment}.options'}.prune_to",
                               "a layerwise_cnn model (pruning masks its blocks' channels)", spec.model)
        return {**spec.model_cfg, "channel_mask": True}
    return spec.model_cfg


def build(spec: RunSpec, num_classes: int) -> tuple[nn.Sequential, nn.Sequential, nn.ModuleList]:
    """The model, its view by greedy unit (:func:`l2l.models.unit_view`: the model itself for
    stages; the same modules, one block per layer) and the fresh auxiliary heads of all units but
    the last."""
    cfg = _model_cfg(spec)
    full = build_model(cfg, num_classes)
    model = unit_view(full, spec.options["unit"])
    if cfg["arch"] == "layerwise_cnn":
        heads = layerwise_cnn_heads(num_classes, **{k: v for k, v in cfg.items() if k != "arch"})
    else:
        with torch.no_grad():
            was = model.training
            widths = [f.shape[1] for f in stage_outputs(model.eval(), torch.zeros(1, 3, 32, 32))]
            model.train(was)
        o = spec.options
        bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        heads = [aux_head(c, num_classes, o["aux_convs"], o["aux_width"] or c, bn) for c in widths[:-1]]
    return full, model, nn.ModuleList(heads)


def predictor(spec: RunSpec, num_classes: int) -> nn.Module:
    full, model, heads = build(spec, num_classes)
    return StageEnsemble(model, heads) if spec.options["predict"] == "ensemble" else full


def _decay_epochs(train: dict, epochs: int) -> set[int]:
    """Epochs at whose start the step schedules have lowered the learning rate."""
    s = train["schedule"]
    if s["name"] == "step":
        return set(range(s["step_size"], epochs, s["step_size"]))
    if s["name"] == "multistep":
        return set(s["milestones"])
    return set()


def phases(spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
    o = spec.options
    full, model, heads = build(spec, ctx.num_classes)
    full, heads = ctx.prepare(full), ctx.prepare(heads)  # `model` (the unit view) shares full's modules
    all_heads = [*heads, model.classifier]
    ends = stage_ends(model)
    modules = {"model": full, "heads": heads}  # everything, so any phase's checkpoint restores the run
    final = StageEnsemble(model, heads) if o["predict"] == "ensemble" else full
    for s, end in enumerate(ends):
        start = ends[s - 1] if s else 0
        last = s == len(ends) - 1
        stage_pred = final if last else nn.Sequential(model[:end], all_heads[s])

        def on_end(s=s, end=end, probes=False):
            out = _stage_metrics(ctx, model, heads, s, end)
            if probes and o["probe_epochs"]:  # P2-C2: the final network's probes, at the twin's budget
                out.update(probe_stages(full, ctx, o["probe_epochs"], o["probe_lr"], (o["unit"],)))
            return out

        yield _train_phase(f"{o['unit']}{s + 1}", spec, ctx, modules, frozen=model[:start],
                           trained=nn.Sequential(model[start:end], all_heads[s]), predictor=stage_pred,
                           epochs=spec.train["epochs"],
                           on_end=lambda on_end=on_end, last=last: on_end(probes=last and not o["prune_to"]))
        if o["prune_to"]:
            block, head = model[start:end], all_heads[s]
            width = next(m for m in block.modules() if isinstance(m, ChannelMask)).mask.numel()
            plan = prune_plan(width, o["prune_to"], o["prune_finetune_epochs"], o["prune_schedule"], o["prune_steps"])
            at_epoch = {e: (lambda block=block, end=end, head=head, keep=keep: _prune(ctx, model[:end], block, head,
                                                                                        keep))
                        for e, keep in plan.items()}
            yield _train_phase(f"{o['unit']}{s + 1}_pruned", spec, ctx, modules, frozen=model[:end], trained=head,
                               predictor=stage_pred, epochs=o["prune_finetune_epochs"], at_epoch=at_epoch,
                               on_end=lambda on_end=on_end, last=last: on_end(probes=last))


def _train_phase(name: str, spec: RunSpec, ctx: RunContext, modules: dict, frozen: nn.Module, trained: nn.Module,
                 predictor: nn.Module, epochs: int, on_end, at_epoch: dict | None = None) -> Phase:
    """Train ``trained`` (a stage and its head, or a head alone) on the frozen ``frozen``'s output;
    ``at_epoch``: {epoch: a function run at that epoch's start} (the pruning steps)."""
    opt = ctx.optimizer(trained.parameters())
    restarts = _decay_epochs(spec.train, epochs) if spec.options["restart_optimizer_at_decay"] else set()
    frozen_forward = ctx.compiled(frozen) if len(frozen) else frozen  # stage 1: no prefix, nothing to compile
    trained_forward = ctx.compiled(trained)

    def step(x, y):
        with torch.no_grad(), ctx.autocast():
            h = frozen_forward(x)
        with ctx.autocast():
            logits = trained_forward(h)
            loss = F.cross_entropy(logits, y)
        ctx.update(opt, loss)
        return loss, logits

    def train_mode():
        for m in modules.values():
            m.eval()  # frozen stages and left-behind heads: BatchNorm statistics stay as they are
        trained.train()

    def on_epoch_start(epoch: int):
        if at_epoch and epoch in at_epoch:
            at_epoch[epoch]()  # once per run: a resumed phase restarts after its epoch with the state it left
        if epoch in restarts:
            opt.state.clear()  # a new optimizer at the new learning rate, as the official code does

    return Phase(name, epochs, modules, {"sgd": opt}, step, predictor, schedulers={"lr": ctx.scheduler(opt, epochs)},
                 train_mode=train_mode, on_epoch_start=on_epoch_start, on_end=on_end)


def _prune(ctx: RunContext, prefix: nn.Sequential, block: nn.Sequential, head: nn.Module, keep: int) -> None:
    mask = next(m for m in block.modules() if isinstance(m, ChannelMask))
    was = prefix.training, head.training
    prefix.eval(), head.eval()
    batches = ctx.data.eval_batches("train", ctx.spec.train["eval_batch_size"])
    prune_lowest(mask, taylor_scores(prefix, head, batches, ctx.autocast), keep)
    prefix.train(was[0]), head.train(was[1])


def _stage_metrics(ctx: RunContext, model: nn.Sequential, heads: nn.ModuleList, s: int, end: int) -> dict[str, float]:
    """Accuracy (%) of stage s's head and of the ensemble of heads 1..s; reporting only."""
    head = [*heads, model.classifier][s]
    pred = nn.Sequential(model[:end], head)
    ens = StageEnsemble(model, heads, stages=s + 1)
    # (The validation accuracy of the stage's predictor is the phase's last val_acc in history.csv.)
    out = {f"head_{split}_acc": ctx.evaluate(pred, split)["acc"] for split in ("train", "test")}
    out["ensemble_test_acc"] = ctx.evaluate(ens, "test")["acc"]
    out["params"] = float(count_parameters(slice_pruned(pred) if ctx.spec.options["prune_to"] else pred))
    return out


STAGE_MEASURES = ("head_train_acc", "head_test_acc", "ensemble_test_acc", "params")  # _stage_metrics' keys


def phase_metrics(options: dict, model_cfg: dict) -> dict[str, tuple[str, ...]]:
    """Phases <unit>1..<unit>S of the model (and <unit>s_pruned with pruning), each with _stage_metrics'
    keys; the last (its pruned phase with pruning) also with the probes' (probe_stages': <unit><s>_probe_*_acc,
    model_*_acc) when it probes."""
    with torch.device("meta"):  # the unit count only: no weights initialised
        units = len(stage_ends(unit_view(build_model(model_cfg, 10), options["unit"])))
    probes = tuple(f"{options['unit']}{s}_probe_{split}_acc" for s in range(1, units + 1) for split in ("train", "test")
                   ) + ("model_train_acc", "model_test_acc") if options["probe_epochs"] else ()  # probe_stages' keys
    out = {}
    for s in range(1, units + 1):
        names = [f"{options['unit']}{s}"] + ([f"{options['unit']}{s}_pruned"] if options["prune_to"] else [])
        for i, name in enumerate(names):  # the probes run at the network's end: its last phase
            out[name] = STAGE_MEASURES + (probes if s == units and i == len(names) - 1 else ())
    return out


def check(spec: RunSpec, num_classes: int, path: str) -> None:
    """Plan time: pruning only on a model whose blocks can be masked; layer units only where they exist."""
    _model_cfg(spec, path)
    if spec.options["unit"] == "layer" and spec.model_cfg["arch"] not in LAYER_ARCHS:
        raise config_error(f"{path}.unit", "stage for this model (layer units exist for "
                           + ", ".join(LAYER_ARCHS) + ")", spec.model)


METHOD = Method("layerwise", OPTIONS, phases, validate=validate_options, predictor=predictor, check=check,
                phase_metrics=phase_metrics, stackable=lambda options: None)

"""Layer-to-layer (L2L) training, P1 (Bhyravabhottla & Lee, arXiv 2303.15245).

The model's ordered blocks are split into a *student* (the first k blocks) and a *teacher*
(the rest, classifier included); ``student`` then ``teacher`` is exactly the unsplit model.
The paper's method is only known from its abstract ("we incrementally train the student
network to learn from the output of the teacher network, and vice versa"), so three
readings are offered (option ``reading``), each making two optimizer updates per batch:

- ``alternating``: update the student with the teacher frozen, then the teacher with the
  (updated) student frozen, both on the full network's cross-entropy;
- ``mutual``: the student gets a head (``student_head``); the student (with
  its head) learns the labels plus the teacher's, i.e. the full network's, softened output,
  then the teacher learns the labels plus the student head's softened output
  (deep-mutual-learning style); the prediction is the full network;
- ``incremental``: the split moves deeper over training on a schedule; at each split the
  per-batch updates are those of ``incremental_step`` (alternating or mutual).

"Frozen" means: no update of the part's parameters, of its BatchNorm running statistics and of
its optimizer state during the other part's update. Options (defaults in ``OPTIONS``):

- ``split``: the student's last block, as a block name (``stage2``) or the number of student
  blocks (``2``); default ``middle`` = the first floor(n/2) of the model's n blocks (classifier
  counted): cnn stage1-2 | stage3+classifier, vgg16 block1-3 | block4-5+classifier, resnext and
  densenet stem+stage1-2 | stage3-4+classifier. 0, n or more blocks, or an unknown name fail.
- ``frozen_bn``: how the frozen part's BatchNorm layers normalise during the other part's update:
  ``batch_stats`` (default: with the batch's statistics, as the full network does in training, so
  the student's gradient is exactly that of the full network's training loss; running statistics
  are not updated) or ``eval`` (eval mode: with its running statistics).
- ``student_head`` (mutual): the student's own classifier, which P1 does not describe: ``gap_linear``
  (default: global average pooling + linear, deep mutual learning's minimal head) or ``pool2x2_linear``
  (2x2 average pooling + linear: P3's k=1 auxiliary head, more spatial information; sensitivity
  claim P1-C2/cifar10/mutual/equal-epochs/pool2x2-head).
- ``temperature`` (4.0, Hinton et al.'s common CIFAR choice), ``student_kd_weight`` and
  ``teacher_kd_weight`` (0.5 each, DML's equal weighting): the mutual loss of a side is
  (1 - w) * CE(labels) + w * T^2 * KL(other side's softened output || own softened output).
- ``incremental_splits``: the split points in order (names, counts or ``middle``); default []:
  every block boundary from 1 to n-1. ``incremental_epochs``: the epochs at which the split moves
  to the next point (one fewer than the points); default []: evenly spaced, point i from epoch
  floor(i * epochs / points). ``incremental_step``: ``alternating`` (default) or ``mutual``.
- ``optimizer_state``: one SGD over all parameters whose per-parameter state (momentum) only a
  part's own updates touch, i.e. each part keeps its own state through the alternation; when the
  incremental split moves, ``keep`` (default) carries every parameter's momentum over, ``reset``
  clears all of it (as if each new student/teacher pair got fresh optimizers). The learning-rate
  schedule runs over the whole training either way.

The method is one phase of ``epochs`` epochs (the split moves inside it), so its data stream is
the conventional run's: the equal-epochs and compute-matched baselines (conventional training at
``epochs`` and ``2 * epochs``) see the same batches in their first ``epochs`` epochs. The second
is compute-matched, not update-matched: each of the two updates per batch moves one part only, so
per parameter the updates already match at equal epochs; the passes (two forwards, two partial
backwards per batch) are what L2L spends twice.
"""
from __future__ import annotations

import contextlib
import functools
import json
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from l2l.checks import ConfigError, config_error
from l2l.engine import Phase, RunContext
from l2l.losses import kd_objective
from l2l.methods.base import Method, model_predictor
from l2l.methods.options import validate
from l2l.models import block_names, build_model
from l2l.spec import RunSpec

READINGS = ("alternating", "mutual", "incremental")
STEPS = ("alternating", "mutual")
FROZEN_BN = ("batch_stats", "eval")
OPTIMIZER_STATES = ("keep", "reset")
STUDENT_HEADS = ("gap_linear", "pool2x2_linear")
MIDDLE = "middle"

OPTIONS: dict = {
    "reading": "alternating",
    "split": MIDDLE,
    "frozen_bn": "batch_stats",
    "student_head": "gap_linear",
    "temperature": 4.0,
    "student_kd_weight": 0.5,
    "teacher_kd_weight": 0.5,
    "incremental_splits": [],
    "incremental_epochs": [],
    "incremental_step": "alternating",
    "optimizer_state": "keep",
}


def _split_option(v, path: str):
    """A split point as written in params.yaml: a block name, ``middle`` or a positive count."""
    if isinstance(v, bool) or not isinstance(v, (int, str)) or v in (0, ""):
        raise ConfigError(f"params.yaml: {path}: expected a block name, 'middle' or a number of student blocks "
                          f">= 1, got {v!r}")
    if isinstance(v, int) and v < 0:
        raise ConfigError(f"params.yaml: {path}: expected a number of student blocks >= 1, got {v!r}")
    return v


def _choice(o: dict, key: str, choices: tuple[str, ...], path: str) -> None:
    if o[key] not in choices:
        raise config_error(f"{path}.{key}", "one of " + ", ".join(choices), o[key])


def validate_options(options: dict, path: str) -> dict:
    o = validate({k: v for k, v in options.items() if k != "split"}, OPTIONS, path)
    o["split"] = _split_option(options.get("split", MIDDLE), f"{path}.split")
    for key, choices in (("reading", READINGS), ("incremental_step", STEPS), ("frozen_bn", FROZEN_BN),
                         ("optimizer_state", OPTIMIZER_STATES), ("student_head", STUDENT_HEADS)):
        _choice(o, key, choices, path)
    if o["temperature"] <= 0:
        raise config_error(f"{path}.temperature", "a positive number", o["temperature"])
    for key in ("student_kd_weight", "teacher_kd_weight"):
        if not 0 <= o[key] <= 1:
            raise config_error(f"{path}.{key}", "a number in [0, 1]", o[key])
    o["incremental_splits"] = [_split_option(v, f"{path}.incremental_splits[{i}]")
                               for i, v in enumerate(o["incremental_splits"])]
    e = o["incremental_epochs"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in e) or e != sorted(set(e)):
        raise config_error(f"{path}.incremental_epochs", "an increasing list of positive epoch numbers", e)
    return o


def resolve_split(split, names: list[str], key: str = "options.split") -> int:
    """The number k of student blocks (1 <= k < n) a split option names, for blocks ``names``;
    ``key`` names the option in errors."""
    n = len(names)
    if split == MIDDLE:
        return n // 2
    if isinstance(split, str):
        if split not in names:
            raise ConfigError(f"params.yaml: {key}: unknown block {split!r} (the model's blocks: {', '.join(names)})")
        k = names.index(split) + 1
    else:
        k = split
    if not 1 <= k < n:
        raise ConfigError(f"params.yaml: {key}: {split!r} leaves no teacher: the student must end before "
                          f"the last block {names[-1]!r} (1 to {n - 1} of {n} blocks: {', '.join(names)})")
    return k


def split_schedule(options: dict, names: list[str], epochs: int, path: str = "options") -> list[int]:
    """The number of student blocks in each epoch (constant unless the reading is incremental);
    ``path`` names the options in errors."""
    if options["reading"] != "incremental":
        return [resolve_split(options["split"], names, f"{path}.split")] * epochs
    points = [resolve_split(s, names, f"{path}.incremental_splits") for s in options["incremental_splits"]]
    points = points or list(range(1, len(names)))
    if points != sorted(set(points)):
        raise ConfigError(f"params.yaml: {path}.incremental_splits: the split must move deeper (strictly "
                          f"increasing student sizes), got {points}")
    starts = options["incremental_epochs"] or [i * epochs // len(points) for i in range(1, len(points))]
    if len(starts) != len(points) - 1 or (starts and (starts != sorted(set(starts)) or starts[0] < 1
                                                      or starts[-1] >= epochs)):
        raise ConfigError(f"params.yaml: {path}.incremental_epochs: {len(points)} split points need "
                          f"{len(points) - 1} increasing move epochs within 1..{epochs - 1}, got {starts} "
                          f"(too few epochs for the points?)")
    return [points[sum(e >= s for s in starts)] for e in range(epochs)]


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _student_head(student: nn.Sequential, num_classes: int, image_size: int, form: str = "gap_linear"
                  ) -> nn.Sequential:
    """The student's head on its output channels (found by a forward in eval mode, which changes no
    state and draws no random numbers): global average pooling + linear (``gap_linear``), or 2x2
    average pooling + linear (``pool2x2_linear``; a map already smaller than 2x2 is pooled to its size)."""
    was_training = student.training
    student.eval()
    with torch.no_grad():
        shape = student(torch.zeros(1, 3, image_size, image_size)).shape
    student.train(was_training)
    side = 1 if form == "gap_linear" else min(2, shape[-1])
    return nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Flatten(), nn.Linear(shape[1] * side * side, num_classes))


class LayerToLayer:
    """The two updates of one batch at the current split; ``set_split(k)`` moves the split."""

    def __init__(self, model: nn.Sequential, heads: nn.ModuleDict, opt: torch.optim.Optimizer, ctx: RunContext,
                 options: dict, step: str):
        self.model, self.heads, self.opt, self.ctx, self.o = model, heads, opt, ctx, options
        self.mutual = step == "mutual"
        self.k: int | None = None
        self.parts: dict[int, tuple] = {}  # per split: the same module objects (and compiled forwards) each epoch

    def set_split(self, k: int) -> None:
        self.k = k
        if k not in self.parts:
            student, teacher = self.model[:k], self.model[k:]
            head = self.heads[str(k)] if self.mutual else None
            forwards = [self.ctx.compiled(m) if m is not None else None for m in (student, teacher, head)]
            self.parts[k] = (student, teacher, head, *forwards)
        self.student, self.teacher, self.head, self.student_fwd, self.teacher_fwd, self.head_fwd = self.parts[k]
        student_parts = [self.student] + ([self.head] if self.mutual else [])
        self.student_params = [p for m in student_parts for p in m.parameters()]
        self.teacher_params = list(self.teacher.parameters())
        self.student_bn, self.teacher_bn = _batch_norms(self.student), _batch_norms(self.teacher)

    @contextlib.contextmanager
    def frozen(self, part: nn.Module, bns: list) -> Iterator[None]:
        """The part's BatchNorm running statistics do not change inside (its parameters are kept
        out of the update by the caller)."""
        if self.o["frozen_bn"] == "eval":
            was = [m.training for m in part.modules()]
            part.eval()
            try:
                yield
            finally:
                for m, t in zip(part.modules(), was):
                    m.training = t
        else:  # batch statistics without tracking: BatchNorm then neither reads nor writes its buffers
            tracked = [m.track_running_stats for m in bns]
            for m in bns:
                m.track_running_stats = False
            try:
                yield
            finally:
                for m, t in zip(bns, tracked):
                    m.track_running_stats = t

    def _update(self, loss: torch.Tensor, params: list[nn.Parameter]) -> None:
        # Gradients only for the active part's parameters (backward(inputs=...) computes no others),
        # and the optimizer only steps parameters that have one: the frozen part's momentum stays.
        self.opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        self.opt.step()

    def student_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's loss, the full network's logits) with the teacher frozen."""
        with self.frozen(self.teacher, self.teacher_bn), self.ctx.autocast():
            h = self.student_fwd(x)
            if not self.mutual:
                logits = self.teacher_fwd(h)
                loss = F.cross_entropy(logits.float(), y)
                return loss, logits
            with torch.no_grad():
                logits = self.teacher_fwd(h)
            loss = self.distillation_loss(self.head_fwd(h), logits, y, self.o["student_kd_weight"])
        return loss, logits

    def teacher_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the teacher's loss, the full network's logits) with the student (and its head) frozen."""
        with self.ctx.autocast():
            with torch.no_grad(), self.frozen(self.student, self.student_bn):
                h = self.student_fwd(x)
                student_logits = self.head_fwd(h) if self.mutual else None
            logits = self.teacher_fwd(h)
            if not self.mutual:
                return F.cross_entropy(logits.float(), y), logits
            loss = self.distillation_loss(logits, student_logits, y, self.o["teacher_kd_weight"])
        return loss, logits

    def distillation_loss(self, logits: torch.Tensor, target_logits: torch.Tensor, y: torch.Tensor,
                          weight: float) -> torch.Tensor:
        """Mutual learning: (1 - w) * CE(labels) + w * T^2 * KL(softmax(target / T) || softmax(logits / T)),
        the target a constant (no gradient flows into the side that produced it)."""
        return kd_objective(logits, target_logits.detach(), F.cross_entropy(logits.float(), y),
                            self.o["temperature"], weight)

    def student_update(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.student_loss(x, y)
        self._update(loss, self.student_params)
        return loss, logits

    def teacher_update(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.teacher_loss(x, y)
        self._update(loss, self.teacher_params)
        return loss, logits

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student update, then teacher update. Reported: the full network's cross-entropy and
        logits before this batch's updates (as conventional training reports them)."""
        _, logits = self.student_update(x, y)
        self.teacher_update(x, y)
        return F.cross_entropy(logits.detach().float(), y), logits


def check(spec: RunSpec, num_classes: int, path: str) -> None:
    """Plan time: the split points name blocks of the run's model and fit its epochs."""
    split_schedule(spec.options, _block_names(json.dumps(spec.model_cfg, sort_keys=True)), spec.train["epochs"], path)


@functools.lru_cache(maxsize=None)
def _block_names(model_cfg: str) -> list[str]:
    with torch.device("meta"):  # the blocks' names only: nothing is allocated
        return block_names(build_model(json.loads(model_cfg), 10))


def phases(spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
    o, epochs = spec.options, spec.train["epochs"]
    model = model_predictor(spec, ctx.num_classes)  # first, so its initialisation is the conventional run's
    names = block_names(model)
    schedule = split_schedule(o, names, epochs, f"experiments.{spec.experiment}.options")
    step = o["incremental_step"] if o["reading"] == "incremental" else o["reading"]
    image_size = ctx.data.x["train"].shape[-1]
    heads = nn.ModuleDict({str(k): _student_head(model[:k], ctx.num_classes, image_size, o["student_head"])
                           for k in sorted(set(schedule))} if step == "mutual" else {})
    model, heads = ctx.prepare(model), ctx.prepare(heads)
    opt = ctx.optimizer([*model.parameters(), *heads.parameters()])
    l2l = LayerToLayer(model, heads, opt, ctx, o, step)

    def on_epoch_start(epoch: int) -> None:
        if epoch > 0 and schedule[epoch] != schedule[epoch - 1] and o["optimizer_state"] == "reset":
            opt.state.clear()  # also right after a resume: the checkpoint holds the pre-move state
        l2l.set_split(schedule[epoch])

    def on_end() -> dict[str, float]:
        metrics = {"final_split": float(l2l.k)}  # student blocks at the end
        if step == "mutual":
            metrics["student_head_val_acc"] = ctx.evaluate(nn.Sequential(l2l.student, l2l.head), "val")["acc"]
        return metrics

    moves = [f"{names[k - 1]}@{e}" for e, k in enumerate(schedule) if e == 0 or k != schedule[e - 1]]
    yield Phase(o["reading"], epochs, {"model": model, "heads": heads}, {"sgd": opt}, l2l.step, predictor=model,
                schedulers={"lr": ctx.scheduler(opt, epochs)}, updates_per_batch=2,
                on_epoch_start=on_epoch_start, on_end=on_end,
                tags={"l2l.reading": o["reading"], "l2l.split": ">".join(moves),
                      "l2l.split_index": ">".join(str(k) for k in dict.fromkeys(schedule))})


# Not stackable: a batch makes two updates (the student's, then the teacher's on the updated student's
# features, or the mutual pair's), and an incremental run moves its split between epochs.
METHOD = Method("l2l", OPTIONS, phases, validate=validate_options, check=check,  # single-label only
                stackable=lambda options: "two dependent updates per batch")

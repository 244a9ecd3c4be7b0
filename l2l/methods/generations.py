"""Training in generations with a (more or less) tolerant teacher (P4, Yang et al. 2019).

Generation 0, the patriarch, learns from the labels with the chosen teacher loss. Generation m
(m = 1..`generations`) has the same architecture and learns from the labels plus the softened
output of generation m-1 (Hinton KD), then teaches m+1. One phase per generation, named gen<m>.

Every earlier generation is a frozen module (no gradients, eval mode) inside each later phase's
`modules` ("gen0", ..., "gen<m-1>"; the one in training is "model"), so a resumed run reloads
the exact teacher from the checkpoint, and the ensemble of generations can be measured.

Options (params.yaml experiments.<name>.options). What the texts fix (read: the abstracts of
arXiv 1805.05551 v1 and v2, and the AAAI text's equations through a third-party transcription; the
experiments section with its values could not be read, docs/papers.md) is marked "text" with the AAAI
text's section; the rest are the harness's documented choices (l2l/fidelity.py lists each with its source):
- generations (2): the number of generations after the patriarch (2 = gen0, gen1, gen2); params.yaml
  runs the strict and tolerant lines with 4, enough for the strict line's rise, then plateau or decline
  (which the text reports of strict generations: accuracy rises over the first few, then saturates and falls).
- teacher_loss (tolerant): the patriarch's loss. strict: cross-entropy. tolerant: eta * CE + (1 - eta) * TSD
  (text, section "Towards High-Quality Secondary Information": the teacher loss; l2l.losses.tsd).
  label_smoothing: CE against smoothed labels (epsilon). confidence_penalty: CE - beta * entropy of the
  output (the text's two alternatives, LSR and CP).
- eta (0.5): the text's weight of CE in eta * CE + (1 - eta) * TSD (the form is the text's, its value is
  not readable). 0.5 weighs both terms alike: it holds the top-1 probability of a fitted training image
  near (K-1) / K = 0.8 (l2l.losses.tsd), the rest on the K-1 secondary classes: a visibly tolerant
  teacher that still ranks the label first. 1 is the strict loss.
- tsd_k (5): K, the classes TSD looks at (the primary one and K-1 secondary classes; text: a fixed K).
- tsd_norm ("K-1"): the divisor of the secondary classes' sum: "K-1" (their mean: text, 1/(K-1)) or "K".
- tsd_primary ("argmax"): TSD's primary class: the top-scored class (text: f_{a_1}, the largest score)
  or "label" (the v2 abstract: "a primary class (the ground-truth)"); experiment p4_tolerant_label
  runs the other reading (sensitivity claims P4-C1/label, P4-C2a/label).
- tsd_input ("probabilities"): the scores TSD compares: the softmax output (text: f(x; theta), the
  distribution whose log the cross-entropy takes) or "logits" (the abstract's "confidence scores" read as
  the raw scores; experiment p4_tolerant_logits, sensitivity claims P4-C1/logits, P4-C2a/logits).
- epsilon (0.1): label-smoothing weight (Szegedy et al.'s value).
- beta (0.1): confidence-penalty weight.
- temperature (1.0), kd_weight (0.9): student loss (1 - w) * label loss + w * T^2 KL at temperature T.
  Text (section "Teacher-Student Optimization"): lambda * CE + (1 - lambda) * KL[f_teacher || f_student] of
  the two networks' outputs, with no temperature: T = 1 (w = 1 - lambda). kd_weight is generation 1's w
  (the value is not readable; 0.9, the common CIFAR-100 KD weight, e.g. Tian et al. 2020's benchmark).
- kd_schedule ("linear"), kd_weight_step (0.1), kd_weights ([]): w of generation m = 1..G.
  linear: kd_weight - (m - 1) * kd_weight_step (0.9, 0.8, 0.7, ...: each generation fits the labels
  a little more, as the abstract of arXiv 1805.05551v2 says the students are "gradually fine-tuned to
  fit one-hot distributions"; the step is the harness's choice, the paper's weights are not public).
  constant: kd_weight in every generation (the harness's schedule before, Tian et al.'s constant
  weight). explicit: kd_weights, one weight per generation (exactly `generations` of them).
- tolerant_in_students (false): whether generations >= 1 keep the patriarch's extra term
  (their label loss becomes the teacher loss instead of plain CE). Default false: the text adds the
  term to the patriarch ("adding an extra loss term to a patriarch network", v2 abstract) and the
  students are "gradually fine-tuned to fit one-hot distributions".
- teacher_on_the_fly (true): the teacher's logits are computed on the student's augmented batch
  at every step. false: computed once per generation on the un-augmented training images and
  looked up per image (cheaper; the teacher then never sees the student's crops and flips).

Per-generation measures (results/phases.csv, phase gen<m>): final_val_acc, final_test_acc of
generation m after its last epoch; kd_weight, the w it was taught with (m >= 1); confidence (mean top-1 softmax probability) and entropy (mean,
nats) of its outputs on the un-augmented training images, i.e. how tolerant it is as the next
generation's teacher; ensemble_final_{val,test}_acc of the average softmax of generations 0..m;
params and flops of the architecture.
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch
import torch.nn as nn

from l2l.checks import config_error
from l2l.engine import Phase, RunContext
from l2l.losses import TSD_INPUTS, TSD_NORMS, TSD_PRIMARIES, confidence_penalty_ce, label_smoothing_ce, tsd
from l2l.methods.base import Method, model_predictor
from l2l.methods.options import validate
from l2l.methods.teaching import (LabelLoss, check_kd_options, check_number, compiled_teacher, final_accuracies,
                                  freeze, kd_step, loss_step, output_measures, train_mode)
from l2l.profiling import flops
from l2l.pruning import count_parameters
from l2l.spec import RunSpec
from l2l.tasks import SingleLabel

# the label loss and the top-1 metric of the single-label task (generations train on CIFAR only)
cross_entropy, accuracy = SingleLabel().loss, SingleLabel().score

log = logging.getLogger(__name__)

TEACHER_LOSSES = ("strict", "tolerant", "label_smoothing", "confidence_penalty")
KD_SCHEDULES = ("linear", "constant", "explicit")
OPTIONS: dict = {
    "generations": 2,
    "teacher_loss": "tolerant",
    "eta": 0.5,
    "tsd_k": 5,
    "tsd_norm": "K-1",
    "tsd_primary": "argmax",
    "tsd_input": "probabilities",
    "epsilon": 0.1,
    "beta": 0.1,
    "temperature": 1.0,
    "kd_weight": 0.9,
    "kd_schedule": "linear",
    "kd_weight_step": 0.1,
    "kd_weights": [],
    "tolerant_in_students": False,
    "teacher_on_the_fly": True,
}


def validate_options(options: dict, path: str) -> dict:
    o = validate(options, OPTIONS, path)
    if o["generations"] < 0:
        raise config_error(f"{path}.generations", "a non-negative integer", o["generations"])
    if o["teacher_loss"] not in TEACHER_LOSSES:
        raise config_error(f"{path}.teacher_loss", "one of " + ", ".join(TEACHER_LOSSES), o["teacher_loss"])
    if o["tsd_k"] < 2:
        raise config_error(f"{path}.tsd_k", "an integer >= 2 (the top class and at least one more)", o["tsd_k"])
    if o["tsd_norm"] not in TSD_NORMS:
        raise config_error(f"{path}.tsd_norm", "one of " + ", ".join(TSD_NORMS), o["tsd_norm"])
    for key, choices in (("tsd_primary", TSD_PRIMARIES), ("tsd_input", TSD_INPUTS)):
        if o[key] not in choices:
            raise config_error(f"{path}.{key}", "one of " + ", ".join(choices), o[key])
    check_number(o, "eta", path, 0.0, 1.0, low_open=True)
    check_number(o, "epsilon", path, 0.0, 1.0, high_open=True)
    check_number(o, "beta", path, 0.0)
    check_kd_options(o, path)
    if o["kd_schedule"] not in KD_SCHEDULES:
        raise config_error(f"{path}.kd_schedule", "one of " + ", ".join(KD_SCHEDULES), o["kd_schedule"])
    check_number(o, "kd_weight_step", path, 0.0)
    if o["kd_schedule"] == "explicit":
        w = o["kd_weights"]
        if len(w) != o["generations"] or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 and 0 <= x <= 1 for x in w):
            raise config_error(f"{path}.kd_weights", f"{o['generations']} numbers in [0, 1] (one per generation, "
                                                     "kd_schedule explicit)", w)
    elif o["kd_weights"]:
        raise config_error(f"{path}.kd_weights", "[] unless kd_schedule is explicit (it would not be read)",
                           o["kd_weights"])
    last = kd_weights(o)[-1:]
    if last and last[0] < 0:
        raise config_error(f"{path}.kd_weight_step", "a step that keeps the last generation's KD weight >= 0 "
                           "(kd_weight - (generations - 1) * kd_weight_step)", o["kd_weight_step"])
    return o


def kd_weights(o: dict) -> list[float]:
    """The KD weight w of generations 1..G under options `o` (kd_schedule)."""
    if o["kd_schedule"] == "explicit":
        return [float(x) for x in o["kd_weights"]]
    step = o["kd_weight_step"] if o["kd_schedule"] == "linear" else 0.0
    return [round(o["kd_weight"] - m * step, 12) for m in range(o["generations"])]  # 0.9 - 2 * 0.1 = 0.7, not 0.70...01


def teacher_loss(o: dict) -> LabelLoss:
    """The patriarch's label loss for options `o`."""
    name = o["teacher_loss"]
    if name == "tolerant":
        eta = o["eta"]
        return lambda logits, y: eta * cross_entropy(logits, y) + (1 - eta) * tsd(
            logits, o["tsd_k"], o["tsd_norm"], o["tsd_primary"], y, o["tsd_input"])
    if name == "label_smoothing":
        return lambda logits, y: label_smoothing_ce(logits, y, o["epsilon"])
    if name == "confidence_penalty":
        return lambda logits, y: confidence_penalty_ce(logits, y, o["beta"])
    return cross_entropy


class CachedTeacher:
    """The teacher's logits on the un-augmented training images, computed once per phase (after
    a resume too) and served in the order in which the engine streams each epoch
    (DeviceData.epoch_plan(seed, phase, epoch), the plan train_batches follows)."""

    def __init__(self, ctx: RunContext, teacher: nn.Module, phase_index: int):
        self.ctx, self.teacher, self.phase_index = ctx, teacher, phase_index
        self.logits: torch.Tensor | None = None
        self.order, self.pos, self.checked = None, 0, False

    def on_epoch_start(self, epoch: int) -> None:
        if self.logits is None:
            self.logits = self.ctx.split_logits(self.teacher, "train")
        self.order = self.ctx.data.epoch_plan(self.ctx.spec.seed, self.phase_index, epoch)[0]
        self.pos, self.checked = 0, False

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        idx = self.order[self.pos:self.pos + len(x)]
        self.pos += len(x)
        if not self.checked:  # once per epoch (one host sync): the stream must be the plan's
            if not torch.equal(self.ctx.data.y["train"][idx], y):
                raise RuntimeError("generations: the training stream does not follow DeviceData.epoch_plan; "
                                   "cached teacher outputs would be misaligned (use teacher_on_the_fly: true)")
            self.checked = True
        return self.logits[idx]


def _measures(ctx: RunContext, models: list[nn.Module], g: int, probs: dict, weights: list[float]) -> dict[str, float]:
    """Generation g's measures. `probs` keeps each finished generation's val/test softmax for the
    later ensembles (after a resume, missing ones are recomputed from the checkpointed models)."""
    model = models[g]
    out, logits = final_accuracies(ctx, model)
    if g >= 1:
        out["kd_weight"] = weights[g - 1]
    out.update(output_measures(ctx.split_logits(model, "train")))
    for split in ("val", "test"):
        probs[g, split] = logits[split].softmax(1)
        for i in range(g):
            if (i, split) not in probs:
                probs[i, split] = ctx.split_logits(models[i], split).softmax(1)
        ensemble = sum(probs[i, split] for i in range(g + 1))
        out[f"ensemble_final_{split}_acc"] = accuracy(ensemble, ctx.data.y[split])
    out["params"] = float(count_parameters(model))
    out["flops"] = float(flops(model, tuple(ctx.data.x["train"].shape[1:])))
    log.info("gen%d: test acc %.2f (ensemble of %d: %.2f), confidence %.3f, entropy %.3f, %d params, %.3g FLOPs",
             g, out["final_test_acc"], g + 1, out["ensemble_final_test_acc"], out["confidence"], out["entropy"],
             out["params"], out["flops"])
    return out


GENERATION_MEASURES = ("final_val_acc", "final_test_acc", "confidence", "entropy", "ensemble_final_val_acc",
                       "ensemble_final_test_acc", "params", "flops")  # _measures' keys (+ kd_weight from gen1 on)


def phase_metrics(options: dict, model_cfg: dict) -> dict[str, tuple[str, ...]]:
    """Phases gen0..gen<generations>, each with _measures' keys (what a claim's arm may name)."""
    return {f"gen{g}": GENERATION_MEASURES + (("kd_weight",) if g else ()) for g in range(options["generations"] + 1)}


def check(spec: RunSpec, num_classes: int, path: str) -> None:
    """Plan time: TSD's top-k fits the dataset's classes."""
    if spec.options["tsd_k"] > num_classes:
        raise config_error(f"{path}.tsd_k", f"at most the {num_classes} classes of {spec.dataset}", spec.options["tsd_k"])


def phases(spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
    o = spec.options
    check(spec, ctx.num_classes, f"experiments.{spec.experiment}.options")
    # All generations are built up front: each one's initialisation depends on the seed only
    # (gen0's equals a conventional run's), never on how long the earlier ones trained.
    models = [ctx.prepare(model_predictor(spec, ctx.num_classes)) for _ in range(o["generations"] + 1)]
    patriarch_loss = teacher_loss(o)
    student_loss = patriarch_loss if o["tolerant_in_students"] else cross_entropy
    epochs = spec.train["epochs"]
    probs: dict[tuple[int, str], torch.Tensor] = {}
    weights = kd_weights(o)
    for g, model in enumerate(models):
        elders = [freeze(m) for m in models[:g]]
        opt = ctx.optimizer(model.parameters())
        on_epoch_start = None
        if g == 0:
            step = loss_step(ctx, model, opt, patriarch_loss)
        else:
            teacher = elders[-1]
            if o["teacher_on_the_fly"]:
                teacher_fn = compiled_teacher(ctx, teacher)
            else:
                teacher_fn = CachedTeacher(ctx, teacher, g)
                on_epoch_start = teacher_fn.on_epoch_start
            step = kd_step(ctx, model, opt, teacher_fn, student_loss, o["temperature"], weights[g - 1])
        yield Phase(f"gen{g}", epochs, {**{f"gen{i}": m for i, m in enumerate(elders)}, "model": model},
                    {"sgd": opt}, step, predictor=model, schedulers={"lr": ctx.scheduler(opt, epochs)},
                    train_mode=train_mode(model, elders), on_epoch_start=on_epoch_start,
                    on_end=lambda g=g: _measures(ctx, models, g, probs, weights),
                    # the cached teacher serves logits by a host-side position: a CUDA graph would replay one batch's
                    graph_safe=g == 0 or o["teacher_on_the_fly"])


def stackable(o: dict) -> str | None:
    # the cached teacher's outputs are served in the member's own data order, inside its step
    return None if o["teacher_on_the_fly"] else "teacher_on_the_fly false (its step reads its own data order)"


METHOD = Method("generations", OPTIONS, phases, validate=validate_options, check=check,  # single-label only
                phase_metrics=phase_metrics, stackable=stackable)

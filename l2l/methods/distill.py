"""Knowledge distillation from a trained teacher into a student (P5, Zhou et al. 2024; Hinton KD).

The run's model (spec.model) is the student. The teacher is trained inside the same run as
phase "teacher" (cross-entropy, the run's training settings), then frozen while the student
learns in phase "student" from (1 - w) * CE + w * T^2 KL(teacher || student) at temperature T.
On a multi-label dataset (Pascal VOC, l2l/tasks.py) CE is the per-class binary cross-entropy and
the KD term the binary KL between per-class sigmoids at temperature T (l2l.losses.multilabel_kd_loss).
Training the teacher in the run keeps the run self-contained (its identity covers the teacher);
the teacher's initialisation and data stream depend on the seed only, so the students of one
seed are taught by the same teacher (bit-identical on a deterministic device), which is also
what a conventional run of the teacher's architecture with that seed trains. The price: each
student run trains its own copy of the teacher.

Options (the paper's values are not public; the harness's documented choices):
- teacher ({arch: cifar_resnet, depth: 110}): the teacher's architecture, as a models entry
  (ResNet-110, He et al.'s deepest common CIFAR ResNet).
- temperature (4.0), kd_weight (0.9): the common CIFAR-100 KD setting (Tian et al. 2020).
- latency_batches ([1, 256]), latency_warmup (10), latency_repeats (30): the latency
  measurement (l2l.profiling.latency) at the end of the run, on the run's device and precision.

Measures (results/phases.csv): phase "teacher": the teacher's final_{val,test}_acc. Phase "student": the student's final_{val,test}_acc, params, flops,
latency_<dtype>_b<N>_ms (+ _iqr_ms); the same for the teacher prefixed teacher_; and the
student / teacher ratios flops_ratio, params_ratio, latency_ratio_b<N>. The run's tags (result.json,
MLflow) stamp latency_device and latency_dtype.
"""
from __future__ import annotations

import inspect
import logging
from typing import Iterator

import torch
import torch.nn as nn

from l2l.config import RunSpec
from l2l.engine import Phase, RunContext, device_info
from l2l.methods.options import validate
from l2l.methods.teaching import (check_kd_options, final_accuracies, freeze, kd_step, loss_step, option_error,
                                  profile, train_mode)
from l2l.tasks import MULTI_LABEL, SINGLE_LABEL
from l2l.models import ARCHS, build_model

log = logging.getLogger(__name__)

OPTIONS: dict = {
    "teacher": {"arch": "cifar_resnet", "depth": 110},
    "temperature": 4.0,
    "kd_weight": 0.9,
    "latency_batches": [1, 256],
    "latency_warmup": 10,
    "latency_repeats": 30,
}


def supported_tasks(options: dict) -> tuple[str, ...]:
    return SINGLE_LABEL, MULTI_LABEL


def validate_options(options: dict, path: str) -> dict:
    o = validate(options, OPTIONS, path)
    t = o["teacher"]
    if t.get("arch") not in ARCHS:
        raise option_error(path, "teacher.arch", "one of " + ", ".join(ARCHS), t.get("arch"))
    try:
        inspect.signature(ARCHS[t["arch"]]).bind(1, **{k: v for k, v in t.items() if k != "arch"})
    except TypeError as e:
        raise option_error(path, "teacher", f"keyword arguments of {t['arch']} ({e})", t) from None
    b = o["latency_batches"]
    if not b or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in b):
        raise option_error(path, "latency_batches", "a non-empty list of positive batch sizes", b)
    if o["latency_warmup"] < 0:
        raise option_error(path, "latency_warmup", "a non-negative integer", o["latency_warmup"])
    if o["latency_repeats"] < 1:
        raise option_error(path, "latency_repeats", "a positive integer", o["latency_repeats"])
    check_kd_options(o, path)
    return o


def predictor(spec: RunSpec, num_classes: int) -> nn.Module:
    return build_model(spec.model_cfg, num_classes)


def _teacher_measures(ctx: RunContext, teacher: nn.Module) -> dict[str, float]:
    out, _ = final_accuracies(ctx, teacher)
    log.info("teacher: test acc %.2f", out["final_test_acc"])
    return out


def _student_measures(ctx: RunContext, student: nn.Module, teacher: nn.Module) -> dict[str, float]:
    o = ctx.spec.options
    out, _ = final_accuracies(ctx, student)
    measure = dict(batches=o["latency_batches"], warmup=o["latency_warmup"], repeats=o["latency_repeats"])
    costs = profile(ctx, {"student": student, "teacher": teacher}, **measure)
    s, t = costs["student"], costs["teacher"]
    out.update(s)
    out.update({f"teacher_{k}": v for k, v in t.items()})
    out["params_ratio"], out["flops_ratio"] = s["params"] / t["params"], s["flops"] / t["flops"]
    for k in s:
        if k.startswith("latency_") and not k.endswith("_iqr_ms"):
            out["latency_ratio_b" + k.split("_b")[-1].removesuffix("_ms")] = s[k] / t[k]
    log.info("student: test acc %.2f, %.3g FLOPs (x%.2f of the teacher's), %s", out["final_test_acc"], s["flops"],
             out["flops_ratio"], ", ".join(f"{k} {v:.3g}" for k, v in out.items() if k.startswith("latency_ratio")))
    return out


def phases(spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
    o = spec.options
    # The student first, from the engine's seeded stream: its initialisation equals that of a
    # conventional run of the same model and seed (the no-distillation baseline).
    student = ctx.prepare(build_model(spec.model_cfg, ctx.num_classes))
    with torch.random.fork_rng(devices=[]):  # the teacher's initialisation: the seed's, whatever the student
        torch.default_generator.manual_seed(spec.seed)  # CPU: models are built there
        teacher = ctx.prepare(build_model(o["teacher"], ctx.num_classes))
    epochs = spec.train["epochs"]

    opt = ctx.optimizer(teacher.parameters())
    yield Phase("teacher", epochs, {"teacher": teacher}, {"sgd": opt}, loss_step(ctx, teacher, opt, ctx.task.loss),
                predictor=teacher, schedulers={"lr": ctx.scheduler(opt, epochs)},
                on_end=lambda: _teacher_measures(ctx, teacher))

    freeze(teacher)
    opt = ctx.optimizer(student.parameters())
    step = kd_step(ctx, student, opt, lambda x, y: teacher(x), ctx.task.loss, o["temperature"], o["kd_weight"])
    yield Phase("student", epochs, {"teacher": teacher, "student": student}, {"sgd": opt}, step,
                predictor=student, schedulers={"lr": ctx.scheduler(opt, epochs)},
                train_mode=train_mode(student, [teacher]), on_end=lambda: _student_measures(ctx, student, teacher),
                tags={"latency_device": device_info(ctx.device)["device_name"],
                      "latency_dtype": "bf16" if ctx.amp else "fp32"})

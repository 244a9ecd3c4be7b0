"""Knowledge distillation from a trained teacher into a student (P5, Zhou et al. 2024; Hinton KD).

The run's model (spec.model) is the student. The teacher is a run of its own (option teacher:
a reference {experiment, model} to a run of the plan, on the same dataset and seed), trained once
and distilled into every student of its dataset and seed, as the paper distils one trained
teacher into three students. The plan (l2l.config.plan, via ``requires``) resolves the reference
and puts the teacher run's identity into this run's options as teacher_run {hash, model_cfg}, so
a student's identity covers its teacher's (a retrained teacher retrains its students), and the
train stage trains the teacher before its students (l2l.executor.run_plan's waves). Here the
teacher is built from teacher_run.model_cfg, loaded from runs/<hash>/final.pt (weights only,
checked against the final_sha256 of the teacher's result.json), frozen, and the student learns in
phase "student" from (1 - w) * CE + w * T^2 KL(teacher || student) at temperature T. On a
multi-label dataset (Pascal VOC, l2l/tasks.py) CE is the per-class binary cross-entropy and the KD
term the binary KL between per-class sigmoids at temperature T (l2l.losses.multilabel_kd_loss).
The teacher loads at the first epoch of the phase (the phase generator can be replayed without
any checkpoint: l2l.cost.planned_epochs); a resumed run reloads it with the phase's state.

Options (the paper's values are not public; the harness's documented choices):
- teacher ({experiment: p5_teacher, model: p5_teacher}): the teacher run, by experiment and
  model (params.yaml's p5_teacher: ResNet-110, He et al.'s deepest common CIFAR ResNet, trained
  conventionally with the profile's training settings).
- temperature (4.0), kd_weight (0.9): the common CIFAR-100 KD setting (Tian et al. 2020).
- latency_batches ([1, 256]), latency_warmup (10), latency_repeats (30): the latency
  measurement (l2l.profiling.latencies) at the end of the run, on the run's device and precision.
- latency_mode ("cuda_graph"): how each timed forward runs (l2l.profiling.LATENCY_MODES). cuda_graph:
  captured once as a CUDA graph and replayed, timed by CUDA events, so the figure is the device's
  execution of the network (P5's "response time"), not eager PyTorch's per-kernel launch overhead,
  which at batch 1 makes small CIFAR ResNets launch-bound (their time then follows their operator
  count: the narrow-deep student has 0.125 of the teacher's FLOPs but half its operators). The eager
  pass is timed too (latency_eager_*, ratios latency_eager_ratio_b<N>: descriptive). On a CPU, which
  has no CUDA graphs, both are the eager pass (tag latency_mode says which ran). eager: eager only.

Measures (results/phases.csv, phase "student"): the student's final_{val,test}_acc, params, flops,
latency_<dtype>_b<N>_ms (+ _iqr_ms); the same for the teacher prefixed teacher_ (its
final_{val,test}_acc measured here on this run's data, so the report needs no other run); and the
student / teacher ratios flops_ratio, params_ratio, latency_ratio_b<N> (and latency_eager_ratio_b<N> where the
eager pass was timed beside the graph). The run's tags (result.json, MLflow) stamp latency_device,
latency_dtype and latency_mode.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from l2l.checks import ConfigError, config_error
from l2l.datasets import MULTI_LABEL, SINGLE_LABEL
from l2l.engine import Phase, RunContext, device_info, load_checkpoint
from l2l.io import read_record
from l2l.methods.base import Method, model_predictor
from l2l.methods.options import validate
from l2l.methods.teaching import (check_kd_options, compiled_teacher, final_accuracies, freeze, kd_step, profile,
                                  train_mode)
from l2l.models import build_model
from l2l.profiling import LATENCY_MODES, latency_mode
from l2l.spec import RunSpec

log = logging.getLogger(__name__)

OPTIONS: dict = {
    "teacher": {"experiment": "p5_teacher", "model": "p5_teacher"},
    "temperature": 4.0,
    "kd_weight": 0.9,
    "latency_batches": [1, 256],
    "latency_warmup": 10,
    "latency_repeats": 30,
    "latency_mode": "cuda_graph",
}


def supported_tasks(options: dict) -> tuple[str, ...]:
    return SINGLE_LABEL, MULTI_LABEL


def requires(options: dict) -> dict[str, dict]:
    """The runs of the plan this run needs finished first (same dataset and seed): name -> {experiment,
    model}. The plan adds each one's identity as options[<name>_run] = {hash, model_cfg}."""
    return {"teacher": options["teacher"]}


def validate_options(options: dict, path: str) -> dict:
    o = validate(options, OPTIONS, path)
    t = o["teacher"]
    if set(t) != {"experiment", "model"} or not all(isinstance(v, str) for v in t.values()):
        raise config_error(f"{path}.teacher", "a run of the plan as {experiment: <name>, model: <name>}", t)
    b = o["latency_batches"]
    if not b or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in b):
        raise config_error(f"{path}.latency_batches", "a non-empty list of positive batch sizes", b)
    if o["latency_warmup"] < 0:
        raise config_error(f"{path}.latency_warmup", "a non-negative integer", o["latency_warmup"])
    if o["latency_mode"] not in LATENCY_MODES:
        raise config_error(f"{path}.latency_mode", "one of " + ", ".join(LATENCY_MODES), o["latency_mode"])
    if o["latency_repeats"] < 1:
        raise config_error(f"{path}.latency_repeats", "a positive integer", o["latency_repeats"])
    check_kd_options(o, path)
    return o


def teacher_checkpoint(spec: RunSpec, runs: Path) -> tuple[Path, str]:
    """The teacher run's final.pt and its sha256 (from its result.json); one-line error if unfinished."""
    h = spec.options["teacher_run"]["hash"]
    result = runs / h / "result.json"
    if not result.exists():
        raise RuntimeError(f"run {spec.hash} ({spec.label}): its teacher run {h} has not finished ({result} missing); the train stage trains it first")
    return runs / h / "final.pt", read_record(result, check=())["final_sha256"]  # its seal verified


def _student_measures(ctx: RunContext, student: nn.Module, teacher: nn.Module) -> dict[str, float]:
    o = ctx.spec.options
    out, _ = final_accuracies(ctx, student)
    t_acc, _ = final_accuracies(ctx, teacher)
    measure = dict(batches=o["latency_batches"], warmup=o["latency_warmup"], repeats=o["latency_repeats"],
                   mode=o["latency_mode"])
    costs, _ = profile(ctx, {"student": student, "teacher": teacher}, **measure)
    s, t = costs["student"], costs["teacher"]
    out.update(s)
    out.update({f"teacher_{k}": v for k, v in {**t_acc, **t}.items()})
    out["params_ratio"], out["flops_ratio"] = s["params"] / t["params"], s["flops"] / t["flops"]
    for k in s:
        if k.startswith("latency_") and not k.endswith("_iqr_ms"):
            ratio = "latency_eager_ratio_b" if k.startswith("latency_eager_") else "latency_ratio_b"
            out[ratio + k.split("_b")[-1].removesuffix("_ms")] = s[k] / t[k]
    log.info("student: test acc %.2f (teacher %.2f), %.3g FLOPs (x%.2f of the teacher's), %s", out["final_test_acc"],
             out["teacher_final_test_acc"], s["flops"], out["flops_ratio"],
             ", ".join(f"{k} {v:.3g}" for k, v in out.items() if k.startswith("latency_ratio")))
    return out


def phases(spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
    o = spec.options
    if "teacher_run" not in o:
        raise ConfigError(f"run {spec.hash} ({spec.experiment}): options.teacher_run missing: distill runs come "
                          "from l2l.config.plan, which resolves options.teacher to the teacher run")
    # The student from the engine's seeded stream: its initialisation equals that of a conventional
    # run of the same model and seed (the no-distillation baseline); the teacher's shell (its weights
    # are loaded) does not move that stream.
    student = ctx.prepare(model_predictor(spec, ctx.num_classes))
    with torch.random.fork_rng(devices=[]):
        teacher = freeze(ctx.prepare(build_model(o["teacher_run"]["model_cfg"], ctx.num_classes)))
    epochs = spec.train["epochs"]
    loaded: list[Path] = []

    def load_teacher(epoch: int) -> None:
        # at the phase's first trained epoch, not when the phase is built: l2l.cost replays the
        # phases without any checkpoint (a resumed run loads it again: the same verified file)
        if not loaded:
            path, sha256 = teacher_checkpoint(spec, ctx.runs)
            teacher.load_state_dict(load_checkpoint(path, sha256=sha256))
            loaded.append(path)

    opt = ctx.optimizer(student.parameters())
    step = kd_step(ctx, student, opt, compiled_teacher(ctx, teacher), ctx.task.loss, o["temperature"],
                   o["kd_weight"])
    yield Phase("student", epochs, {"teacher": teacher, "student": student}, {"sgd": opt}, step,
                predictor=student, schedulers={"lr": ctx.scheduler(opt, epochs)},
                train_mode=train_mode(student, [teacher]), on_epoch_start=load_teacher,
                on_end=lambda: _student_measures(ctx, student, teacher),
                tags={"latency_device": device_info(ctx.device)["device_name"],
                      "latency_dtype": "bf16" if ctx.amp else "fp32",
                      "latency_mode": latency_mode(o["latency_mode"], ctx.device)})


METHOD = Method("distill", OPTIONS, phases, validate=validate_options, supported_tasks=supported_tasks,
                requires=requires, stackable=lambda options: None)

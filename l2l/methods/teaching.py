"""What the teacher-student methods (generations, distill) share: frozen teachers, the
supervised and the distillation step, whole-split outputs and their measures, model profiles,
and the checks of their common options."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from l2l.checks import number
from l2l.engine import RunContext, StepFn
from l2l.losses import entropy, kd_objective
from l2l.profiling import flops, latencies, latency_mode
from l2l.pruning import count_parameters

LabelLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (normalised images, labels) -> teacher logits


def check_number(o: dict, key: str, path: str, low: float, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """o[key] must lie in the interval low..high (open ends where asked)."""
    number(o[key], f"{path}.{key}", low, high, low_open, high_open)


def check_kd_options(o: dict, path: str) -> None:
    check_number(o, "temperature", path, 0.0, low_open=True)
    check_number(o, "kd_weight", path, 0.0, 1.0)


def freeze(module: nn.Module) -> nn.Module:
    """A finished model used as a teacher: no gradients, eval mode (BatchNorm statistics fixed)."""
    module.requires_grad_(False)
    return module.eval()


def train_mode(trainable: nn.Module, frozen: list[nn.Module]) -> Callable[[], None]:
    def set_modes() -> None:
        trainable.train()
        for m in frozen:
            m.eval()
    return set_modes


def loss_step(ctx: RunContext, model: nn.Module, opt: torch.optim.Optimizer, label_loss: LabelLoss) -> StepFn:
    """One update of `model` on a label loss (plain or regularised cross-entropy)."""
    forward = ctx.compiled(model)

    def step(x, y):
        with ctx.autocast():
            logits = forward(x)
        loss = label_loss(logits, y)
        ctx.update(opt, loss)
        return loss, logits
    return step


def kd_step(ctx: RunContext, student: nn.Module, opt: torch.optim.Optimizer, teacher: TeacherFn,
            label_loss: LabelLoss, temperature: float, kd_weight: float) -> StepFn:
    """One update of `student` on (1 - w) * label loss + w * KD from the teacher's logits (Hinton's
    softmax KD, or its per-class sigmoid form on a multi-label dataset: the run's task). A teacher
    computed on the fly should come through ctx.compiled (compiled_teacher) like the student here."""
    forward = ctx.compiled(student)

    def step(x, y):
        with torch.no_grad(), ctx.autocast():
            t = teacher(x, y)
        with ctx.autocast():
            logits = forward(x)
        loss = kd_objective(logits, t, label_loss(logits, y), temperature, kd_weight, kd=ctx.task.kd)
        ctx.update(opt, loss)
        return loss, logits
    return step


def compiled_teacher(ctx: RunContext, teacher: nn.Module) -> TeacherFn:
    """A frozen teacher's logits on the student's batch, through train.compile's forward."""
    forward = ctx.compiled(teacher)
    return lambda x, y: forward(x)


def output_measures(logits: torch.Tensor) -> dict[str, float]:
    """How peaked a model's outputs are: mean top-1 softmax probability and mean entropy (nats)."""
    return {"confidence": logits.softmax(1).max(1).values.mean().item(),
            "entropy": entropy(logits).mean().item()}


def final_accuracies(ctx: RunContext, model: nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """final_{val,test}_acc of a model at the end of its phase (same names as results/runs.csv: the
    task's metric), and its logits on those splits."""
    logits = {s: ctx.split_logits(model, s) for s in ("val", "test")}
    return {f"final_{s}_acc": ctx.task.score(v, ctx.data.y[s]) for s, v in logits.items()}, logits


def profile(ctx: RunContext, models: dict[str, nn.Module], batches: list[int], warmup: int, repeats: int,
            mode: str = "eager") -> tuple[dict[str, dict[str, float]], str]:
    """Per model: params, FLOPs per image, and latency per batch size on the run's device in its
    precision (models timed in turn, l2l.profiling.latencies, in `mode`). The latency keys carry the
    dtype (latency_fp32_b1_ms, latency_bf16_b256_ms, ...); the device is the run's (results/runs.csv:
    device, device_name). Where the mode used is cuda_graph, the eager pass is timed too, as
    latency_eager_<dtype>_b<N>_ms: how much of the eager time is launch overhead. -> (per model, the mode
    used: cuda_graph, or eager where the device has no CUDA graphs)."""
    shape = tuple(ctx.data.x["train"].shape[1:])
    dtype = "bf16" if ctx.amp else "fp32"
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    out = {name: {"params": float(count_parameters(m)), "flops": float(flops(m, shape))} for name, m in models.items()}
    used = latency_mode(mode, ctx.device)
    for prefix, m in (("latency", used), ("latency_eager", "eager")):
        if prefix == "latency_eager" and used == "eager":
            continue
        for b in batches:
            for name, t in latencies(models, b, shape, warmup, repeats, autocast=ctx.autocast, memory_format=fmt,
                                     mode=m).items():
                out[name][f"{prefix}_{dtype}_b{b}_ms"] = t["median_ms"]
                out[name][f"{prefix}_{dtype}_b{b}_iqr_ms"] = t["iqr_ms"]
    return out, used

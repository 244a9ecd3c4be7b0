"""The one training engine every method drives.

A method yields *phases* (one for conventional training; one per block for layerwise; one
per generation for teacher-student...). A phase says what is optimised and how one batch is
stepped; the engine owns everything else: device, data stream, epochs, schedule, validation,
checkpoint/resume, metrics and progress. Metrics are accumulated on the device and read back
once per epoch, so the step has no host sync.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from l2l.compiling import RunCompiler, set_determinism
from l2l.config import RunSpec
from l2l.device_data import DeviceData
from l2l.tasks import Task, task_of

log = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Phase:
    """One stretch of training with a fixed set of trainable parts.

    step(x, y) performs the phase's optimizer update(s) for one batch and returns
    (loss, logits) of the network being trained, detached or not; the engine only reads them.
    predictor maps normalised images to logits: validated every epoch, saved as the run's
    model when this is the last phase.
    """

    name: str
    epochs: int
    modules: dict[str, nn.Module]  # every module whose state this phase needs (checkpointed)
    optimizers: dict[str, torch.optim.Optimizer]
    step: StepFn
    predictor: nn.Module
    schedulers: dict[str, Any] = field(default_factory=dict)  # stepped once per epoch
    updates_per_batch: int = 1
    train_mode: Callable[[], None] | None = None  # default: every module in train mode
    on_epoch_start: Callable[[int], None] | None = None
    on_end: Callable[[], dict[str, float]] | None = None  # extra metrics recorded for the phase
    tags: dict[str, str] = field(default_factory=dict)  # what the method resolved (e.g. a split point): MLflow tags


class Method(Protocol):
    OPTIONS: dict

    def validate_options(self, options: dict, path: str) -> dict: ...
    def phases(self, spec: RunSpec, ctx: "RunContext") -> Iterator[Phase]: ...
    def predictor(self, spec: RunSpec, num_classes: int) -> nn.Module: ...


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": device.type, "device_name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "python": platform.python_version()}


class RunContext:
    """What a method needs from the engine: device, data, the dataset's task (loss, KD loss, metric:
    l2l/tasks.py), optimizer/scheduler factories, and where the plan's runs live (``runs``: the
    folder of runs/<hash>/, for a method that reads another run's checkpoint, e.g. distill's teacher)."""

    def __init__(self, spec: RunSpec, data: DeviceData, num_classes: int, device: torch.device,
                 runs: Path = Path("runs")):
        self.spec, self.data, self.num_classes, self.device, self.runs = spec, data, num_classes, device, Path(runs)
        self.task: Task = task_of(spec.data)
        precision = spec.train.get("precision", "auto")
        self.amp = device.type == "cuda" and precision in ("auto", "bf16")
        self.channels_last = device.type == "cuda"
        self.compile = bool(spec.train.get("compile", False))
        self.deterministic = bool(spec.train.get("deterministic", False))
        set_determinism(self.deterministic, device)
        # meta: shapes only (l2l.cost counts a step's FLOPs), nothing to compile
        self.compiler = RunCompiler(spec.hash) if self.compile and device.type != "meta" else None

    # --- building blocks for methods ---
    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compiled(self, module: nn.Module) -> nn.Module:
        """`module` through torch.compile when train.compile is on (l2l/compiling.py): the same
        parameters and buffers, a compiled forward. Checkpoint and return the original module, call
        this one; build it once per module (each call is one more entry of the run's compile cache)."""
        return self.compiler(module) if self.compiler is not None else module

    def speed_record(self) -> dict:
        """What the run's speed and reproducibility settings were (result.json and its tags)."""
        return {"compile": self.compiler.summary() if self.compiler is not None else None,
                "deterministic": self.deterministic}

    def optimizer(self, params, train: dict | None = None) -> torch.optim.Optimizer:
        o = (train or self.spec.train)["optimizer"]
        # CUDA: the fused kernel (one launch for all parameters); CPU keeps the default for bit-stable results.
        return torch.optim.SGD(params, lr=o["lr"], momentum=o.get("momentum", 0.0),
                               weight_decay=o.get("weight_decay", 0.0), nesterov=o.get("nesterov", False),
                               fused=True if self.device.type == "cuda" else None)

    def scheduler(self, opt: torch.optim.Optimizer, epochs: int, train: dict | None = None):
        s = (train or self.spec.train)["schedule"]
        sched = torch.optim.lr_scheduler
        if s["name"] == "step":
            return sched.StepLR(opt, s["step_size"], s["gamma"])
        if s["name"] == "multistep":
            return sched.MultiStepLR(opt, s["milestones"], s["gamma"])
        if s["name"] == "cosine":
            return sched.CosineAnnealingLR(opt, T_max=epochs)
        return sched.ConstantLR(opt, factor=1.0, total_iters=0)

    @staticmethod
    def update(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def supervised_step(self, model: nn.Module, opt: torch.optim.Optimizer) -> StepFn:
        """The plain supervised step: forward, the task's loss (cross-entropy for CIFAR), one update."""
        forward = self.compiled(model)

        def step(x, y):
            with self.autocast():
                logits = forward(x)
            loss = self.task.loss(logits, y)
            self.update(opt, loss)
            return loss, logits
        return step

    @torch.no_grad()
    def split_logits(self, model: nn.Module, split: str) -> torch.Tensor:
        """float32 logits of `model` (eval mode) for every image of a split, un-augmented, in order."""
        was_training = model.training
        model.eval()
        out = []
        for x, _ in self.data.eval_batches(split, self.spec.train.get("eval_batch_size", 1000)):
            with self.autocast():
                out.append(model(x).float())
        model.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, predictor: nn.Module, split: str) -> dict:
        """Loss, the task's metric ("acc": top-1 accuracy or mAP, in %) and per-example predictions
        (class ids or per-class scores) of `predictor` on a split."""
        logits, y = self.split_logits(predictor, split), self.data.y[split]
        return {"loss": self.task.loss(logits, y).item(), "acc": self.task.score(logits, y),
                "pred": self.task.predictions(logits)}


# --- checkpoints ------------------------------------------------------------------------

def atomic_save(obj: Any, path: Path) -> str:
    """torch.save to a temporary file then rename; returns the file's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: Path, sha256: str | None = None) -> Any:
    """weights_only load; with sha256 given, the file must match it first."""
    if sha256 is not None and sha256_file(path) != sha256:
        raise RuntimeError(f"{path}: checksum mismatch (expected sha256 {sha256[:12]}...): refusing to load")
    return torch.load(path, map_location="cpu", weights_only=True)


def _phase_state(phase: Phase) -> dict:
    return {"modules": {k: m.state_dict() for k, m in phase.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in phase.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in phase.schedulers.items()}}


def _load_phase_state(phase: Phase, state: dict) -> None:
    for k, m in phase.modules.items():
        m.load_state_dict(state["modules"][k])
    for k, o in phase.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in phase.schedulers.items():
        s.load_state_dict(state["schedulers"][k])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the loop ---------------------------------------------------------------------------

class Progress:
    """A tqdm bar on a terminal; one log line per epoch otherwise (CI logs stay readable)."""

    def __init__(self, label: str, total: int, initial: int):
        self.label = label
        self.bar = tqdm(total=total, initial=initial, desc=label, unit="ep", leave=False, dynamic_ncols=True,
                        file=sys.stderr) if sys.stderr.isatty() else None

    def update(self, row: dict) -> None:
        msg = (f"loss {row['train_loss']:.3f} acc {row['train_acc']:.1f} val {row['val_acc']:.1f} "
               f"{row['images_per_s']:.0f} img/s")
        if self.bar is not None:
            self.bar.set_postfix_str(msg, refresh=False)
            self.bar.update(1)
        else:
            log.info("%s %s ep %d/%d: %s", self.label, row["phase"], row["epoch"] + 1, row["phase_epochs"], msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_run(spec: RunSpec, method: Method, ctx: RunContext, run_dir: Path,
              on_epoch: Callable[[dict], None] | None = None,
              on_resume: Callable[[list[dict]], None] | None = None,
              stop_after_epochs: int | None = None) -> dict:
    """Train one run to completion (resuming from run_dir/last.pt if present).

    Writes run_dir/{history.csv, final.pt, best.pt, result.json}; returns the result dict.
    stop_after_epochs simulates an interruption (tests): return after that many epochs.
    """
    import pandas as pd

    from l2l.io import write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    last_path = run_dir / "last.pt"
    resume = load_checkpoint(last_path) if last_path.exists() else None
    history: list[dict] = resume["history"] if resume else []
    best = resume["best"] if resume else {"phase": -1, "val_acc": -1.0}
    phase_metrics: dict = resume["phase_metrics"] if resume else {}
    if resume:
        log.info("%s: resuming after phase %d epoch %d", spec.hash, resume["phase"], resume["epoch"] + 1)
        if on_resume is not None:
            on_resume(history)

    torch.manual_seed(spec.seed)  # initialisation; data order and augmentation have their own streams
    epochs_done_now = 0
    phase = None
    tags: dict[str, str] = {}
    updates = history[-1]["updates"] if history else 0
    for pi, phase in enumerate(method.phases(spec, ctx)):
        tags.update(phase.tags)
        start_epoch = 0
        if resume is not None:
            if pi < resume["phase"]:
                continue  # trained already; its results live in the modules' state loaded below
            if pi == resume["phase"]:
                _load_phase_state(phase, resume["state"])
                _set_rng_state(resume["rng"])
                start_epoch = resume["epoch"] + 1
        progress = Progress(f"{spec.experiment}/{spec.model}/{spec.dataset}/s{spec.seed}", phase.epochs, start_epoch)
        for epoch in range(start_epoch, phase.epochs):
            if stop_after_epochs is not None and epochs_done_now >= stop_after_epochs:
                progress.close()
                return {"interrupted": True}
            row = _train_epoch(spec, ctx, phase, pi, epoch)
            if ctx.compiler is not None:
                ctx.compiler.check()
            updates += row["batches"] * phase.updates_per_batch
            row["updates"] = updates
            row["global_epoch"] = len(history)
            history.append(row)
            if pi != best["phase"] or row["val_acc"] > best["val_acc"]:
                # best-on-validation within the current phase (its predictor is the final one at the end)
                best = {"phase": pi, "epoch": epoch, "val_acc": row["val_acc"],
                        "sha256": atomic_save(phase.predictor.state_dict(), run_dir / "best.pt")}
            atomic_save({"phase": pi, "epoch": epoch, "state": _phase_state(phase), "rng": _rng_state(),
                         "history": history, "best": best, "phase_metrics": phase_metrics}, last_path)
            if on_epoch is not None:
                on_epoch(row)
            progress.update(row)
            epochs_done_now += 1
        progress.close()
        if phase.on_end is not None:
            phase_metrics[phase.name] = phase.on_end()
    if phase is None:
        raise RuntimeError(f"method {spec.method} yielded no phase")

    final_sha = atomic_save(phase.predictor.state_dict(), run_dir / "final.pt")
    pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)
    last = history[-1]
    result = {"spec": spec.to_dict(), "hash": spec.hash, **device_info(ctx.device),
              "final": {k: last[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
              "best": best, "final_sha256": final_sha, "epochs": len(history), "updates": updates,
              "train_seconds": float(sum(r["epoch_seconds"] for r in history)),
              "images_per_s": float(np.median([r["images_per_s"] for r in history])),
              "phase_metrics": phase_metrics, **ctx.speed_record()}
    result["tags"] = {**tags, "train.compile": str(ctx.compile).lower(),
                      "train.deterministic": str(ctx.deterministic).lower()}
    if ctx.compiler is not None:
        ctx.compiler.close()
    write_json(run_dir / "result.json", result)
    last_path.unlink()  # the run is complete; the resume state (with optimizer moments) is no longer needed
    return result


def _train_epoch(spec: RunSpec, ctx: RunContext, phase: Phase, pi: int, epoch: int) -> dict:
    if phase.on_epoch_start is not None:
        phase.on_epoch_start(epoch)
    if phase.train_mode is not None:
        phase.train_mode()
    else:
        for m in phase.modules.values():
            m.train()
    lr = next(iter(phase.optimizers.values())).param_groups[0]["lr"] if phase.optimizers else 0.0
    dev = ctx.device
    _sync(dev)
    t0 = time.perf_counter()
    loss_sum, meter, seen, batches = step_batches(
        phase.step, ctx.data.train_batches(spec.seed, pi, epoch, spec.train["batch_size"]), dev, ctx.task.meter(dev))
    _sync(dev)
    seconds = time.perf_counter() - t0
    for s in phase.schedulers.values():
        s.step()
    val = ctx.evaluate(phase.predictor, "val")
    return {"phase": phase.name, "phase_index": pi, "epoch": epoch, "phase_epochs": phase.epochs,
            "train_loss": loss_sum.item() / seen, "train_acc": meter.value(),
            "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr,
            "epoch_seconds": seconds, "images_per_s": seen / seconds, "batches": batches}


def step_batches(step: StepFn, batches, device: torch.device, meter=None) -> tuple[torch.Tensor, Any, int, int]:
    """Every batch's update; the loss sum and the metric's meter (l2l/tasks.py; default: top-1
    accuracy) stay on the device (no host sync). Returns (loss_sum, meter, images, batches).
    The benchmark times exactly this loop."""
    from l2l.tasks import TopOneMeter

    meter = meter if meter is not None else TopOneMeter(device)
    loss_sum, seen, n = torch.zeros((), device=device), 0, 0
    for x, y in batches:
        loss, logits = step(x, y)
        loss_sum += loss.detach().float() * len(y)
        meter.add(logits, y)
        seen += len(y)
        n += 1
    return loss_sum, meter, seen, n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""The one training engine every method drives.

A method yields *phases* (one for conventional training; one per block for layerwise; one
per generation for teacher-student...). A phase says what is optimised and how one batch is
stepped; the engine owns everything else: device, data stream, epochs, schedule, validation,
checkpoint/resume, metrics and progress. Metrics are accumulated on the device and read back
once per epoch, so the step has no host sync.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from l2l.compiling import RunCompiler, set_determinism, set_fp32_precision
from l2l.device_data import DeviceData
from l2l.checks import IntegrityError
from l2l.graphs import StepGraphs
from l2l.optim import load_state, sgd
from l2l.io import read_json, read_record, run_lock, sha256_file, write_atomic, write_json, write_record, write_text
from l2l.progress import RunProgress
from l2l.spec import RunSpec
from l2l.tasks import Task, TopOneMeter, task_of

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
    graph_safe: bool = True  # the step is static and sync-free (CUDA graphs may replay it: l2l/graphs.py)


class PhaseSource(Protocol):
    """What the engine needs of a method (its whole contract: l2l.methods.base.Method)."""

    def phases(self, spec: RunSpec, ctx: "RunContext") -> Iterator[Phase]: ...


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
    folder of runs/<hash>/, for a method that reads another run's checkpoint, e.g. distill's teacher).

    cuda_branches: the engine's CUDA path (bf16 autocast under precision auto/bf16, channels_last,
    fused SGD); default: on a CUDA device. True on a CPU takes the same branches there (torch has
    all three on CPUs): the rehearsal of a GPU run that the tests and benchmarks/gpu_check.py run
    (the data should then be channels_last too, DeviceData(channels_last=True), as on CUDA).
    cuda_graphs: executor.cuda_graphs, each epoch's step captured once and replayed (l2l/graphs.py;
    eager on a device without CUDA graphs); graph_backend: a replay backend other than CUDA's
    (l2l.graphs.Rehearsal, the CPU rehearsal)."""

    def __init__(self, spec: RunSpec, data: DeviceData, num_classes: int, device: torch.device,
                 runs: Path = Path("runs"), cuda_branches: bool | None = None, cuda_graphs: bool = False,
                 graph_backend=None):
        self.spec, self.data, self.num_classes, self.device, self.runs = spec, data, num_classes, device, Path(runs)
        self.task: Task = task_of(spec.data)
        precision = spec.train["precision"]
        self.cuda_branches = device.type == "cuda" if cuda_branches is None else cuda_branches
        self.amp = self.cuda_branches and precision in ("auto", "bf16")
        self.channels_last = self.cuda_branches
        self.fused = self.cuda_branches
        self.compile = spec.train["compile"]
        self.deterministic = spec.train["deterministic"]
        set_determinism(self.deterministic, device)
        self.tf32 = spec.train["tf32"]
        self.fp32_precision = set_fp32_precision(self.tf32)
        self.graphs = StepGraphs(device, graph_backend, spec.label) if cuda_graphs else None
        # meta: shapes only (l2l.cost counts a step's FLOPs), nothing to compile
        self.compiler = RunCompiler(spec.hash) if self.compile and device.type != "meta" else None

    # --- building blocks for methods ---
    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def autocast(self):
        if self.amp:
            # no cast cache under CUDA graphs: cached casts must not outlive a captured region (torch.cuda.graphs)
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                  cache_enabled=self.graphs is None)
        return contextlib.nullcontext()

    def compiled(self, module: nn.Module) -> nn.Module:
        """`module` through torch.compile when train.compile is on (l2l/compiling.py): the same
        parameters and buffers, a compiled forward. Checkpoint and return the original module, call
        this one; build it once per module (each call is one more entry of the run's compile cache)."""
        return self.compiler(module) if self.compiler is not None else module

    def speed_record(self) -> dict:
        """What the run's speed and reproducibility settings were (result.json and its tags)."""
        return {"compile": self.compiler.summary() if self.compiler is not None else None,
                "deterministic": self.deterministic, "tf32": self.tf32, "fp32_precision": self.fp32_precision,
                "cuda_branches": self.cuda_branches,
                "cuda_graphs": self.graphs.summary() if self.graphs is not None else None}

    def optimizer(self, params, train: dict | None = None) -> torch.optim.Optimizer:
        o = (train or self.spec.train)["optimizer"]
        # CUDA: the fused kernel (one launch for all parameters; l2l/optim.py); CPU keeps the default for
        # bit-stable results.
        return sgd(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                   nesterov=o["nesterov"], fused=self.fused)

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
        for x, _ in self.data.eval_batches(split, self.spec.train["eval_batch_size"]):
            with self.autocast():
                out.append(model(x).float())
        model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.num_classes, device=self.device)

    @torch.no_grad()
    def evaluate(self, predictor: nn.Module, split: str, predictions: bool = True) -> dict:
        """Loss, the task's metric ("acc": top-1 accuracy or mAP, in %) and, with `predictions`,
        per-example predictions (class ids or per-class scores, copied to the host) of `predictor` on a split."""
        logits, y = self.split_logits(predictor, split), self.data.y[split]
        pred = {"pred": self.task.predictions(logits)} if predictions else {}
        if not len(y):  # no such images (a run whose validation images joined training): undefined, not 0
            return {"loss": float("nan"), "acc": float("nan"), **pred}
        return {"loss": self.task.loss(logits, y).item(), "acc": self.task.score(logits, y), **pred}

    @property
    def images(self) -> dict[str, int]:
        """Images per split the run sees (its train split includes the validation images when its
        experiment's split.val_size is 0; then val is 0 and nothing is selected on validation)."""
        return {s: len(y) for s, y in self.data.y.items()}


# --- checkpoints ------------------------------------------------------------------------
# A run folder holds, while it trains, its resume states: last.pt (the newest) and previous.pt (the one
# before), each with a sidecar <name>.json holding its sha256, written after the checkpoint's rename.
# A resume state is trusted only if its sha256 matches: else the one before it, else a clean restart.
# The files a finished run's result depends on are hashed once, as they are written, into result.json.

LAST, PREVIOUS = "last.pt", "previous.pt"


def atomic_save(obj: Any, path: Path) -> str:
    """torch.save to a temporary file then rename; returns the file's sha256 (hashed while written)."""
    return write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path, sha256: str | None = None) -> Any:
    """weights_only load; with sha256 given, the file must match it first."""
    if sha256 is not None and sha256_file(path) != sha256:
        raise IntegrityError(f"{path}: checksum mismatch (expected sha256 {sha256[:12]}...): refusing to load; "
                             f"delete {Path(path).parent}/ and re-run to retrain it")
    return torch.load(path, map_location="cpu", weights_only=True)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _save_resume(state: dict, run_dir: Path) -> None:
    last, prev = run_dir / LAST, run_dir / PREVIOUS
    if last.exists():  # keep the newest good state until the next one is complete
        os.replace(last, prev)
        if _sidecar(last).exists():
            os.replace(_sidecar(last), _sidecar(prev))
        else:
            _sidecar(prev).unlink(missing_ok=True)
    digest = atomic_save(state, last)
    write_json(_sidecar(last), {"sha256": digest, "phase": state["phase"], "epoch": state["epoch"]})


def _resume_problem(path: Path) -> str | None:
    side = _sidecar(path)
    if not side.exists():
        return f"no recorded sha256 ({side.name} missing: interrupted while saving, or an older l2l)"
    try:
        expected = read_json(side).get("sha256")
    except (IntegrityError, AttributeError):
        return f"its record {side.name} is not valid"
    if sha256_file(path) != expected:
        return f"sha256 does not match {side.name} (truncated or corrupt)"
    return None


def load_resume(run_dir: Path) -> dict | None:
    """The newest resume state of run_dir whose sha256 matches its record; a state that fails is
    removed with a warning naming it (then the one before it, then a restart from the first epoch)."""
    for name in (LAST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        problem = _resume_problem(path)
        if problem is None:
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 (a hash-verified file torch cannot read: treated as corrupt)
                problem = f"unreadable ({type(e).__name__})"
        then = ("resuming from previous.pt" if name == LAST and (run_dir / PREVIOUS).exists()
                else "restarting this run from its first epoch")
        log.warning("%s: %s; removed it, %s", path, problem, then)
        path.unlink()
        _sidecar(path).unlink(missing_ok=True)
    return None


def _clear_resume(run_dir: Path) -> None:
    for name in (LAST, PREVIOUS):
        (run_dir / name).unlink(missing_ok=True)
        _sidecar(run_dir / name).unlink(missing_ok=True)


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _phase_state(phase: Phase) -> dict:
    return {"modules": {k: m.state_dict() for k, m in phase.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in phase.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in phase.schedulers.items()}}


def _load_phase_state(phase: Phase, state: dict) -> None:
    for k, m in phase.modules.items():
        m.load_state_dict(state["modules"][k])
    for k, o in phase.optimizers.items():
        load_state(o, state["optimizers"][k])  # fused or not as built on this device, whatever saved it
    for k, s in phase.schedulers.items():
        s.load_state_dict(state["schedulers"][k])


def _rng_state(device: torch.device) -> dict:
    """The random state a resume restores: the CPU generator's and, on CUDA, the run's own device's only
    (a state per visible GPU would not restore where fewer are visible; no run draws from another GPU)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    # a CPU resume of a CUDA state draws nothing from CUDA; an older per-GPU list is not restored (no run draws from it)
    if device.type == "cuda" and isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda, device)


# --- the loop ---------------------------------------------------------------------------

def train_run(spec: RunSpec, method: PhaseSource, ctx: RunContext, run_dir: Path,
              on_epoch: Callable[[dict], None] | None = None,
              on_resume: Callable[[list[dict]], None] | None = None,
              stop_after_epochs: int | None = None, checkpoint_every: int = 1,
              progress: RunProgress | None = None, checkpoint_min_seconds: float = 0.0) -> dict:
    """Train one run to completion (resuming from its last verified resume state if there is one),
    holding run_dir's lock (l2l.io.run_lock: a second trainer of the same run is refused).

    Writes run_dir/{history.csv, final.pt, best.pt} and last, result.json recording their sha256
    (no best.pt without a validation split: best-validation is then undefined, result["best"]["sha256"] None);
    returns the result dict. A resume state is saved at the end of every phase, and after an epoch when
    at least `checkpoint_every` epochs and `checkpoint_min_seconds` seconds have passed since the last
    one (or since this process started the run): params' executor settings, no effect on results.
    stop_after_epochs simulates an interruption (tests): return after that many epochs.
    progress: the run's bar or epoch lines (default: a bar on a terminal, l2l.progress).
    """
    progress = progress or RunProgress(spec.label)
    with run_lock(run_dir):
        try:
            return _train_locked(spec, method, ctx, run_dir, on_epoch, on_resume, stop_after_epochs,
                                 checkpoint_every, progress, checkpoint_min_seconds)
        finally:
            progress.close()


def _train_locked(spec, method, ctx, run_dir, on_epoch, on_resume, stop_after_epochs, checkpoint_every,
                  progress, checkpoint_min_seconds=0.0) -> dict:
    if (run_dir / "result.json").exists():  # finished by another trainer while this one waited: not twice
        return read_record(run_dir / "result.json", check=())
    started = time.perf_counter()
    resume = load_resume(run_dir)
    history: list[dict] = resume["history"] if resume else []
    best = resume["best"] if resume else {"phase": -1, "val_acc": -1.0 if ctx.images["val"] else float("nan")}
    best_state: dict | None = resume["best_state"] if resume else None  # the best predictor's weights (CPU)
    phase_metrics: dict = resume["phase_metrics"] if resume else {}
    if resume:
        log.info("%s: resuming after phase %d epoch %d", spec.hash, resume["phase"], resume["epoch"] + 1)
    if on_resume is not None:
        on_resume(history)  # what the store may still miss (empty on a fresh start)

    torch.manual_seed(spec.seed)  # initialisation; data order and augmentation have their own streams
    epochs_done_now = 0
    saved = {"epochs": 0, "at": time.monotonic()}  # epochs and time since the last resume state
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
                _set_rng_state(resume["rng"], ctx.device)
                start_epoch = resume["epoch"] + 1
        progress.phase(phase.name, phase.epochs, start_epoch)
        for epoch in range(start_epoch, phase.epochs):
            if stop_after_epochs is not None and epochs_done_now >= stop_after_epochs:
                return {"interrupted": True}
            row = _train_epoch(spec, ctx, phase, pi, epoch)
            if ctx.compiler is not None:
                ctx.compiler.check()
            updates += row["batches"] * phase.updates_per_batch
            row["updates"] = updates
            row["global_epoch"] = len(history)
            history.append(row)
            if ctx.images["val"] and (pi != best["phase"] or row["val_acc"] > best["val_acc"]):
                # best-on-validation within the current phase (its predictor is the final one at the end)
                best = {"phase": pi, "epoch": epoch, "val_acc": row["val_acc"]}
                best_state = _cpu_copy(phase.predictor.state_dict())
            saved["epochs"] += 1
            if epoch == phase.epochs - 1 or (saved["epochs"] >= checkpoint_every
                                             and time.monotonic() - saved["at"] >= checkpoint_min_seconds):
                saved.update(epochs=0, at=time.monotonic())
                _save_resume({"phase": pi, "epoch": epoch, "state": _phase_state(phase), "rng": _rng_state(ctx.device),
                              "history": history, "best": best, "best_state": best_state,
                              "phase_metrics": phase_metrics}, run_dir)
            if on_epoch is not None:
                on_epoch(row)
            progress.epoch(row)
            epochs_done_now += 1
        if phase.on_end is not None:
            phase_metrics[phase.name] = phase.on_end()
    if phase is None:
        raise RuntimeError(f"method {spec.method} yielded no phase")

    # The files the result depends on, each hashed once as it is written.
    files = {"final.pt": atomic_save(phase.predictor.state_dict(), run_dir / "final.pt"),
             "history.csv": write_text(run_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))}
    if best_state is not None:  # none without a validation split: nothing was selected
        files["best.pt"] = atomic_save(best_state, run_dir / "best.pt")
    last = history[-1]
    result = {"spec": spec.to_dict(), "hash": spec.hash, **device_info(ctx.device),
              "final": {k: last[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
              "best": {**best, "sha256": files.get("best.pt")}, "final_sha256": files["final.pt"],
              "images": ctx.images, "epochs": len(history), "updates": updates,
              "train_seconds": float(sum(r["epoch_seconds"] for r in history)),
              "images_per_s": float(np.median([r["images_per_s"] for r in history])),
              "phase_metrics": phase_metrics, **ctx.speed_record(),
              # the run's wall time in this process (building, every epoch, validation, checkpoints, a method's
              # own measurements): what l2l plan's calibration fits; None for a resumed run (part of it is elsewhere)
              "run_seconds": None if resume else time.perf_counter() - started}
    result["tags"] = {**tags, "train.compile": str(ctx.compile).lower(),
                      "train.deterministic": str(ctx.deterministic).lower(), "train.tf32": str(ctx.tf32).lower(),
                      "fp32_precision": ",".join(f"{k}={v}" for k, v in ctx.fp32_precision.items()),
                      "executor.cuda_graphs": "off" if ctx.graphs is None else
                      "on" if result["cuda_graphs"]["used"] else "eager fallback"}
    if ctx.compiler is not None:
        ctx.compiler.close()
    result = write_record(run_dir / "result.json", result, files)
    _clear_resume(run_dir)  # the run is complete; the resume states (with optimizer moments) are no longer needed
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
    step = ctx.graphs.epoch_step(phase) if ctx.graphs is not None else phase.step
    loss_sum, meter, seen, batches = step_batches(
        step, ctx.data.train_batches(spec.seed, pi, epoch, spec.train["batch_size"]), dev, ctx.task.meter(dev))
    _sync(dev)
    seconds = time.perf_counter() - t0
    for s in phase.schedulers.values():
        s.step()
    val = ctx.evaluate(phase.predictor, "val", predictions=False)  # nothing reads them: no copy to the host
    return {"phase": phase.name, "phase_index": pi, "epoch": epoch, "phase_epochs": phase.epochs,
            "train_loss": loss_sum.item() / seen, "train_acc": meter.value(),
            "val_loss": val["loss"], "val_acc": val["acc"], "lr": lr,
            "epoch_seconds": seconds, "images_per_s": seen / seconds, "batches": batches}


def step_batches(step: StepFn, batches, device: torch.device, meter=None) -> tuple[torch.Tensor, Any, int, int]:
    """Every batch's update; the loss sum and the metric's meter (l2l/tasks.py; default: top-1
    accuracy) stay on the device (no host sync). Returns (loss_sum, meter, images, batches).
    The benchmark times exactly this loop."""
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

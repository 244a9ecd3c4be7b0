"""CUDA graphs for the training step (``executor.cuda_graphs``): one capture per epoch, replayed.

The small ResNets are launch-bound on a GPU: a ResNet-20 step is ~266 kernels, a ResNet-110 step
~1,256, each costing the CPU 4-8 us to launch while the GPU computes far less than that (issue 21).
A CUDA graph launches a captured step's kernels at once. The whole step is captured (forward,
backward, the fused SGD update, every method's extra forwards and updates), not one module:
then the optimizer's one kernel is inside too and nothing a method does between its forwards
(l2l's frozen parts, a teacher's forward) needs special treatment.

How (``torch.cuda.graph``, torch's whole-network capture; https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs):
- per epoch, the first ``WARMUP`` full batches run eagerly on the capture stream (cuDNN autotuning
  and cuBLAS handles of that stream, and the optimizer's momentum buffers: a step captured before
  they exist would replay SGD's first step, momentum dropped, every time); then the step is
  captured once on static input buffers and replayed for every further batch of that shape,
  each batch copied into the buffers. A batch of another shape (an epoch's last, smaller one)
  runs eagerly.
- a new capture every epoch: the learning rate is a number baked into the captured update, and a
  method may change its optimizer or parts at an epoch's start (layerwise's restarts, l2l's split
  moves, a reset optimizer state).
- the step's outputs (loss, logits) are the graph's static tensors, overwritten by the next
  replay: the engine reads them before the next step (its device-side sums; a meter that keeps
  outputs copies them, l2l/tasks.py ScoreMeter).
- same kernels, same order: the numbers are those of the eager step, so this is how a run is
  executed, not what it is (executor setting, no part of the run's identity).
- a phase whose step is not static (``Phase.graph_safe`` false: generations' cached teacher reads
  its logits by a host-side position) runs eagerly, and the result says so.

Fallback: on a device without CUDA graphs (a CPU), steps run eagerly and the run's result records
``used: false`` with the reason. A capture that fails (an operation CUDA cannot capture) is logged
as an error naming the run and phase, and that phase runs eagerly from then on (a capture executes
nothing, so the batch is then trained eagerly, once); the result lists it under ``failed_phases``.
:class:`Rehearsal` replays by running the captured Python again on
the static buffers: on a CPU it exercises everything above except the capture itself (warm-up,
static buffers, reading outputs before the next step, eager odd batches, recapture per epoch),
so the bookkeeping is tested where no GPU is (tests/test_rehearsal.py).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

WARMUP = 3  # eager full batches per epoch before the capture (torch's examples warm up 3 iterations)

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CudaBackend:
    """torch.cuda.graph captures on one side stream (the warm-up runs there too, so that its library
    handles exist before the capture), memory from one pool shared by a run's captures (an old capture
    is never replayed again)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, fn: Callable[[], Any]) -> Any:
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = fn()
        main.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], tuple]) -> tuple[Callable[[], None], tuple]:
        """(replay, the static outputs each replay overwrites); nothing runs until the first replay."""
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()
        return graph.replay, out


class Rehearsal:
    """The bookkeeping without a GPU: a replay runs the captured function again (a real one runs only the
    recorded kernels), and writes its outputs into the first replay's tensors, as a graph overwrites its
    static outputs (so a reader that keeps an output past the next step sees it change, as on a GPU)."""

    def run(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def capture(self, fn: Callable[[], tuple]) -> tuple[Callable[[], None], list]:
        static: list[torch.Tensor] = []

        def replay() -> None:
            out = fn()
            with torch.no_grad():
                if not static:
                    static.extend(t.detach() for t in out)
                else:
                    for s, t in zip(static, out):
                        s.copy_(t)
        return replay, static


class _EpochGraph:
    """One epoch's steps through one capture (see the module's docstring); on_failure(error) is told of a
    failed capture, after which the epoch runs eagerly."""

    def __init__(self, step: StepFn, backend, counts: dict[str, int], on_failure: Callable[[Exception], None]):
        self.step, self.backend, self.counts, self.on_failure = step, backend, counts, on_failure
        self.failed = False
        self.shape: tuple | None = None  # (x shape, x strides, y shape) of the epoch's full batches
        self.warm = 0
        self.replay: Callable[[], None] | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None  # the input buffers
        self.out: tuple | list = ()  # the static outputs (loss, logits)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (tuple(x.shape), x.stride(), tuple(y.shape))
        if self.shape is None:
            self.shape = shape
        if shape != self.shape or self.failed:
            self.counts["eager_steps"] += 1
            return self.step(x, y)
        if self.warm < WARMUP:
            self.warm += 1
            self.counts["eager_steps"] += 1
            return self.backend.run(lambda: self.step(x, y))
        if self.replay is None:
            self.static = (x.clone(), y.clone())  # preserve_format: channels_last stays channels_last
            try:
                self.replay, self.out = self.backend.capture(lambda: self.step(*self.static))
            except RuntimeError as e:  # torch's capture errors; nothing was executed
                self.failed = True
                self.on_failure(e)
                self.counts["eager_steps"] += 1
                return self.step(x, y)
            self.counts["captures"] += 1
        else:
            self.static[0].copy_(x)
            self.static[1].copy_(y)
        self.replay()
        self.counts["replayed_steps"] += 1
        return self.out[0], self.out[1]


class StepGraphs:
    """executor.cuda_graphs for one run: each epoch's step (:meth:`epoch_step`) captured and replayed,
    or eager where that cannot be (:attr:`fallback`); :meth:`summary` goes into result.json."""

    def __init__(self, device: torch.device, backend=None, label: str = "run"):
        if backend is None and device.type == "cuda":
            backend = CudaBackend(device)
        self.backend, self.label = backend, label
        self.fallback = None if backend is not None else f"{device.type} device (CUDA graphs need CUDA): eager steps"
        self.counts = {"captures": 0, "replayed_steps": 0, "eager_steps": 0}
        self.eager_phases: list[str] = []
        self.failed_phases: dict[str, str] = {}  # phase -> the capture's error

    def epoch_step(self, phase) -> StepFn:
        """The step for one epoch of `phase` (an l2l.engine.Phase); call at the epoch's start."""
        if self.backend is None:
            return phase.step
        if not phase.graph_safe:
            if phase.name not in self.eager_phases:
                self.eager_phases.append(phase.name)
            return phase.step
        if phase.name in self.failed_phases:
            return phase.step

        def failed(e: Exception) -> None:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.failed_phases[phase.name] = reason
            log.error("%s: phase %s: its step could not be captured as a CUDA graph (%s); it runs eagerly "
                      "(the same numbers, without the graphs' speed)", self.label, phase.name, reason)

        return _EpochGraph(phase.step, self.backend, self.counts, failed)

    def summary(self) -> dict:
        return {"requested": True, "used": self.counts["replayed_steps"] > 0, "fallback": self.fallback,
                **self.counts, "eager_phases": self.eager_phases, "failed_phases": self.failed_phases}

"""Compute and speed of a model: FLOPs (torch.utils.flop_counter) and measured latency.

FLOPs follow torch.utils.flop_counter's rules: 2 per multiply-accumulate of convolutions and
matrix products (the linear layer included); BatchNorm, activations, pooling and the residual
additions are not counted (a few per cent of a ResNet's). One correction (FLOP_RULES): the weight
gradient of a grouped convolution, which torch counts ``groups`` times too high (it multiplies
all input channels by all output channels, where each output channel only sees its group's).

Latency is the time of one forward pass in inference mode on the model's device, in the
precision the run trains in: warm-up passes first (allocator, cuDNN algorithm choice, caches),
then `repeats` passes each timed alone; the median is reported with the spread (interquartile
range), so one slow outlier does not move it. Two ways to run the pass (LATENCY_MODES):

- ``cuda_graph`` (CUDA): the whole forward captured once as a CUDA graph and replayed, each replay
  timed between two CUDA events. The host then issues one launch per pass instead of one per
  kernel, so what is timed is the device's execution of the network: the response time a deployed
  model has on that device, not the Python and kernel-launch overhead of eager PyTorch (at batch 1
  a small CIFAR ResNet in eager mode is launch-bound: its time follows its number of operators,
  not its compute). On a CPU there is no CUDA graph: the pass runs eagerly (``eager``), and the
  mode used is returned with every figure.
- ``eager``: the forward called as it is, timed between device synchronisations (wall clock):
  what an unoptimised PyTorch deployment sees, launch overhead included.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, ContextManager

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """aten.convolution_backward: the input gradient as torch counts it (the transposed convolution
    of the output gradient with the weights), and the weight gradient at the forward convolution's
    cost: each of the weight's prod(w_shape) entries (C_out x C_in/groups x kernel) sums one product
    per image and output position, exactly the forward's multiply-accumulates."""
    n = 0
    if output_mask[0]:
        n += conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed)
    if output_mask[1]:
        n += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return n


FLOP_RULES = {torch.ops.aten.convolution_backward: conv_backward_flop}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with this module's corrections; use as a context, then .get_total_flops()."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_RULES)


def flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of ONE input of shape `input_shape` (C, H, W), model in eval mode."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=_device(model))
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LATENCY_MODES = ("cuda_graph", "eager")


def latency_mode(requested: str, device: torch.device) -> str:
    """The mode a latency measurement runs in on `device`: cuda_graph needs CUDA (else eager)."""
    if requested not in LATENCY_MODES:
        raise ValueError(f"latency: mode must be one of {LATENCY_MODES}, got {requested!r}")
    return requested if device.type == "cuda" else "eager"


def _graph_autocast(autocast: Callable[[], ContextManager]) -> Callable[[], ContextManager]:
    """The run's precision context, with autocast's weight-cast cache off: a cast cached before a
    CUDA graph's capture would be freed after it while the graph still reads it (torch's CUDA graphs
    notes); without the cache the casts are recorded in the graph and redone on every replay."""
    probe = autocast()
    if isinstance(probe, torch.autocast):
        return lambda: torch.autocast(device_type=probe.device, dtype=probe.fast_dtype, cache_enabled=False)
    return autocast


def _eager_pass(m: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    """A timed eager forward: milliseconds between device synchronisations."""
    device = x.device

    def timed() -> float:
        _sync(device)
        t0 = time.perf_counter()
        m(x)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3
    return timed


def _graph_pass(m: nn.Module, x: torch.Tensor, autocast: Callable[[], ContextManager]) -> Callable[[], float]:
    """The forward of `m` on the static input `x`, captured as a CUDA graph (after three warm-up
    passes on a side stream, as torch.cuda.graph requires); each call replays it between two CUDA
    events and returns their elapsed milliseconds."""
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side), torch.inference_mode(), autocast():
        for _ in range(3):
            m(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), autocast(), torch.cuda.graph(graph):
        m(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return timed


def latencies(models: dict[str, nn.Module], batch_size: int, input_shape: tuple[int, ...], warmup: int = 5,
              repeats: int = 20, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
              memory_format: torch.memory_format = torch.contiguous_format, mode: str = "eager"
              ) -> dict[str, dict[str, float | str]]:
    """Median (and interquartile range) in milliseconds of one forward pass of a batch of
    `batch_size` random inputs, per model, after `warmup` untimed passes, run in `mode`
    (LATENCY_MODES; cuda_graph falls back to eager off CUDA: :func:`latency_mode`, returned as
    "mode"). The models are timed in turn within each repetition (A, B, A, B, ...), so a slow spell
    of a shared machine hits all of them alike and their ratios stay fair. `autocast` is the run's
    precision context (RunContext.autocast): the timing is of the precision the run trains in."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    training = {name: m.training for name, m in models.items()}
    g = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(batch_size, *input_shape, generator=g).to(_device(m))
              .contiguous(memory_format=memory_format) for name, m in models.items()}
    used = {name: latency_mode(mode, _device(m)) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        passes = {name: _graph_pass(m, inputs[name], _graph_autocast(autocast)) if used[name] == "cuda_graph"
                  else _eager_pass(m, inputs[name]) for name, m in models.items()}
        with torch.inference_mode(), autocast():
            for i in range(warmup + repeats):
                for name in models:
                    t = passes[name]()
                    if i >= warmup:
                        times[name].append(t)
    finally:
        for name, m in models.items():
            m.train(training[name])
    out: dict[str, dict[str, float | str]] = {}
    for name in models:
        t = times[name]
        q1, _, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0],) * 3
        out[name] = {"median_ms": statistics.median(t), "iqr_ms": q3 - q1, "mode": used[name]}
    return out


def latency(model: nn.Module, batch_size: int, input_shape: tuple[int, ...], **kwargs) -> dict[str, float]:
    """latencies() of one model."""
    return latencies({"model": model}, batch_size, input_shape, **kwargs)["model"]

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
import math
import statistics
import time
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.optim.optimizer as optimizer_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
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


# --- a step's FLOPs and kernel launches, counted on the meta device -----------------------------

# Ops that launch no kernel on a GPU: tensor metadata queries, allocations, and views (every op whose
# result aliases an input without writing it, and aten._unsafe_view, a view autograd does not track).
_NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "detach", "lift_fresh",
              "alias", "is_same_size", "_has_compatible_shallow_copy_type", "_local_scalar_dense"}
_METADATA = {"is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "size", "sym_size", "stride",
             "sym_stride", "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim"}
# torch's multi_tensor_apply (fused SGD on CUDA: parameters, gradients, momentum buffers) launches one kernel
# per at most 48 tensor triples and 320 chunks of 65,536 elements (ATen/native/cuda/MultiTensorApply.cuh)
FUSED_TENSORS_PER_LAUNCH, FUSED_ELEMENTS_PER_LAUNCH = 48, 320 * 65536
_MEMO: dict = {}  # (op, argument shapes/strides/dtypes...) -> (output shapes/strides/dtypes, FLOPs): meta only


class _Meta:
    __slots__ = ("shape", "stride", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype = tuple(t.shape), t.stride(), t.dtype

    def tensor(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def _key(a):
    if isinstance(a, torch.Tensor):
        if a.device.type != "meta":
            raise TypeError("not a meta tensor")
        return (tuple(a.shape), a.stride(), a.dtype)
    if isinstance(a, (list, tuple)):
        return tuple(_key(x) for x in a)
    if isinstance(a, dict):
        return tuple((k, _key(v)) for k, v in sorted(a.items()))
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return a
    raise TypeError(type(a).__name__)


class StepCounter(TorchDispatchMode):
    """FLOPs and GPU kernel launches of what runs under it (a training step on the meta device).

    FLOPs: torch.utils.flop_counter's formulas with this module's FLOP_RULES (the same figures as
    :func:`flop_counter`), without its decomposition of every other op into prims (which made a meta
    step cost ~1.5 s). Launches: every dispatched op that is not a view, an allocation or a metadata
    query counts one kernel (``torch.profiler`` on a CPU lists the same ops: tests/test_plan.py); an
    optimizer's step counts as fused SGD's launches on CUDA (FUSED_*), not its per-tensor ops. Ops on
    meta tensors are memoised by their arguments' shapes, so a network's repeated blocks are shape-
    inferred once per process."""

    def __init__(self):
        super().__init__()
        self.flops, self.launches = 0, 0
        self.registry = flop_counter().flop_registry
        self._in_step, self._hooks = 0, []

    def __enter__(self):
        self._hooks = [optimizer_hooks.register_optimizer_step_pre_hook(self._pre),
                       optimizer_hooks.register_optimizer_step_post_hook(self._post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def _pre(self, opt, args, kwargs) -> None:
        self._in_step += 1

    def _post(self, opt, args, kwargs) -> None:
        self._in_step -= 1
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if params:
            self.launches += max(math.ceil(len(params) / FUSED_TENSORS_PER_LAUNCH),
                                 math.ceil(sum(p.numel() for p in params) / FUSED_ELEMENTS_PER_LAUNCH))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in _METADATA or func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        alias = [r.alias_info for r in func._schema.returns if r.alias_info is not None]
        functional = not alias and not any(a.alias_info is not None and a.alias_info.is_write and a.kwarg_only
                                           for a in func._schema.arguments)  # no out= argument
        key = None
        if functional and any(isinstance(t, torch.Tensor) for t in tree_flatten((args, kwargs))[0]):
            try:  # (an op with no tensor argument may follow the default device: never memoised)
                key = (func, _key(args), _key(kwargs))
            except TypeError:
                key = None
        if key is not None and key in _MEMO:
            metas, n = _MEMO[key]
            out = tree_map(lambda m: m.tensor() if isinstance(m, _Meta) else m, metas)
        else:
            out = func(*args, **kwargs)
            f = self.registry.get(func._overloadpacket)
            n = f(*args, **kwargs, out_val=out) if f is not None else 0
            if key is not None and all(isinstance(t, torch.Tensor) or t is None for t in tree_flatten(out)[0]):
                _MEMO[key] = (tree_map(lambda t: _Meta(t) if isinstance(t, torch.Tensor) else t, out), n)
        self.flops += n
        if not self._in_step and name not in _NO_KERNEL and not (alias and not any(a.is_write for a in alias)):
            self.launches += 1
        return out


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

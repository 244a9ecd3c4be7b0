"""train.compile and train.deterministic: how a run's steps are compiled and how reproducible
its kernels are.

Compile: every method builds its step's forward passes through ``RunContext.compiled`` (the
trained network, frozen prefixes, teachers, the layer-to-layer parts), so torch.compile reaches
each method's real step. torch keeps one compile cache per function: every ``nn.Sequential``
instance shares ``Sequential.forward``'s, and each module, batch shape (a CIFAR epoch has two: full
batches and the last one) and guard state (grad mode, BatchNorm tracking, train/eval) is one entry
of it. So a run starts from an empty cache (runs that share a process, as the local executor's
in-process runs do, no longer fill each other's) and its limit grows with the modules it compiles
(RECOMPILES_PER_MODULE each). If torch still hits a limit it runs that function eagerly from then
on: that is logged as an error naming the run, and counted in the run's result (``compile``).

Deterministic (default false): cuDNN's autotuner picks the fastest algorithm per shape, and
several CUDA kernels (atomic-add reductions in convolution and pooling backward passes, index
scatter) sum in a varying order, so on CUDA the same seed, or a resumed run, is not bit-identical.
True turns the autotuner off and asks torch for deterministic kernels
(``torch.use_deterministic_algorithms(True, warn_only=True)``: an op without one warns rather
than fails). On the CPU the same seed gives the same numbers either way
(tests/test_engine.py::test_same_seed_same_numbers_on_cpu).

TF32 (``train.tf32``, default false): on Ampere and later GPUs torch runs fp32 convolutions on TF32
tensor cores by default (``torch.backends.cudnn.allow_tf32`` is true: a 10-bit mantissa for the
products) while fp32 matmuls stay IEEE, so ``precision: fp32`` alone did not say what a run computed.
A run sets both explicitly, every time (a previous run's choice must not leak): false, IEEE fp32
convolutions and matmuls; true, TF32 for both. It matters for fp32 math on CUDA: under bf16
autocast the convolutions and matmuls are bf16 anyway, and with false (every profile's CPU runs)
CPU kernels compute IEEE fp32 as before. result.json records the switch and what torch reports
(``fp32_precision``).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# static shapes: a recompile per batch shape instead of dynamic-shape kernels
COMPILE_OPTIONS: dict = {"dynamic": False}
# cache entries one compiled module may need: 2 batch shapes x up to 4 guard states
RECOMPILES_PER_MODULE = 8
# torch logs this (torch._dynamo.convert_frame, torch 2.0-2.14) when it gives up compiling a function
LIMIT_MESSAGE = "torch._dynamo hit config."


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Set the process's kernel choice for one run (both ways: a previous run's choice must not leak)."""
    if deterministic:
        # cuBLAS's deterministic workspace; read when its handle is created (before the first matmul)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        # fixed CIFAR shapes: unless asked for determinism, let cuDNN pick its fastest algorithms once per shape
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def set_fp32_precision(tf32: bool) -> dict[str, str]:
    """TF32 on or off for fp32 matmuls (cuBLAS) and convolutions (cuDNN). Through torch's long-standing
    setters, not the per-backend ``fp32_precision`` flags of torch >= 2.9: with those, CUDA's matmul flag
    set apart from oneDNN's makes ``torch.get_float32_matmul_precision()`` raise (torch 2.14), and Inductor
    reads it for every compile (torch/_inductor/codecache.py). The float32 matmul precision is process-wide,
    so "high" (TF32) would also let oneDNN use TF32 for CPU matmuls on a CPU that has it; no profile sets
    tf32 on a CPU. Returns the precision torch now reports for each (recorded in result.json)."""
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    return {"matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
            "conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"}


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _LimitWatch(logging.Filter):
    """Sees torch's recompile-limit warnings (it keeps them; they are re-raised loudly by the run)."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(LIMIT_MESSAGE):
            self.hits.append(record.getMessage().splitlines()[0])
        return True


class RunCompiler:
    """torch.compile for one run: an empty cache at the start, a limit sized to what it compiles,
    and a count of graphs and of fallbacks to eager."""

    def __init__(self, label: str):
        import torch._dynamo

        torch._dynamo.reset()
        self.label = label
        self.modules = 0
        self.graphs_at_start = graphs_compiled()
        self.default_limit = torch._dynamo.config.recompile_limit
        self.watch = _LimitWatch()
        self.reported = 0
        logging.getLogger("torch._dynamo.convert_frame").addFilter(self.watch)

    def __call__(self, module: nn.Module) -> nn.Module:
        import torch._dynamo

        self.modules += 1
        torch._dynamo.config.recompile_limit = max(self.default_limit, RECOMPILES_PER_MODULE * self.modules)
        return torch.compile(module, **COMPILE_OPTIONS)

    def check(self) -> None:
        """Log every new fallback to eager as an error (called once per epoch)."""
        for hit in self.watch.hits[self.reported:]:
            log.error("%s: torch.compile gave up on a function and runs it eagerly from now on (%s, with %d "
                      "compiled modules): this run trains slower than compiled; TORCH_LOGS=recompiles says why",
                      self.label, hit, self.modules)
        self.reported = len(self.watch.hits)

    def summary(self) -> dict:
        self.check()
        return {"modules": self.modules, "graphs": graphs_compiled() - self.graphs_at_start,
                "fallbacks_to_eager": len(self.watch.hits)}

    def close(self) -> None:
        import torch._dynamo

        logging.getLogger("torch._dynamo.convert_frame").removeFilter(self.watch)
        torch._dynamo.config.recompile_limit = self.default_limit

"""One command that turns a short GPU window into figures: run it, commit what it writes.

    PYTHONPATH=. python benchmarks/gpu_check.py --data data/gpu_check/cifar10_subset.npz --out $OUT

It needs only torch, torchvision, numpy, scipy, pandas and pyyaml (no mlflow, no dvc, no install:
the checkout and the machine's own torch). Sections run cheapest and most decisive first; after
each one the results so far are written to OUT/gpu_check.json, OUT/gpu_check.md (the table for
benchmarks/RESULTS.md) and OUT/throughput.json (the format `l2l plan` reads), so a kill leaves
everything measured until then. A section that would not fit the remaining --budget is skipped
and says so.

  1 stamp: device, driver, torch, CUDA, cuDNN; the bf16 (CPU: fp32) matmul ceiling, measured here.
  latency: P5's planned students and teacher (paper sizes, 100 classes, bf16 + channels_last on CUDA):
    forward latency at batch 1 and 256, eager and as CUDA-graph replays (the measure P5-C1 decides on),
    each student's latency ratio to the teacher beside its FLOPs ratio and operator count.
  2 methods: every method for 2 epochs at smoke sizes on the device (fused SGD with frozen parts,
    bf16, channels_last, phase switches); an interrupted and resumed run against an uninterrupted
    one; the same seed twice, with train.deterministic off and on (largest parameter difference).
  3 throughput: images/s of the engine and of the naive torchvision DataLoader reference per model
    family at paper sizes, batch 128 (and the engine at --large-batch), achieved TFLOP/s and share
    of the measured ceiling, peak memory.
  4 compile: torch.compile off/on per model (compile seconds, steady images/s) and for every
    method's step (graphs compiled, fallbacks to eager, epoch seconds).
  5 concurrency: aggregate images/s of 1, 2, 4 runs of a small model in spawned processes (CUDA).
  6 slice: a few real epochs of the conventional ResNet-20 and of P3's k=2 first block on the
    CIFAR-10 subset: accuracy and seconds per epoch.
  stacking (after throughput): per launch-bound model family of the paper profile (the ResNets of
    P4/P5 first), aggregate training images/s, peak memory and achieved TFLOP/s of one run at a time
    (separate), K runs stacked as one computation (stacked_K, K = 1, 2, 4, 8, 16: l2l/stacking.py)
    and N runs in N processes (runs_per_gpu_N, N = 2, 4): throughput.json's ``modes``, from which the
    executor and `l2l plan` take the fastest mode per family (l2l/modes.py).
  cuda_graphs (after stacking): per launch-bound model family of the paper profile (its CIFAR
    ResNets: P4, P5, P2), images/s of the engine's step eager and replayed as a CUDA graph
    (executor.cuda_graphs, l2l/graphs.py), peak memory, TFLOP/s, the largest parameter difference
    after the same steps; every method for one epoch with graphs on and off (train.deterministic on:
    the same kernels, so the same numbers are expected), captures and replays counted. Writes the
    `cuda_graphs` mode of throughput.json's `modes` (benchmarks/RESULTS.md).
  tf32: P3's fp32 networks (k=1, 2, 3) with train.tf32 off (IEEE fp32, the harness's default, as
    P3's code ran) and on: images/s, TFLOP/s, and how far one forward's logits move.

Every run here takes the engine's CUDA branches (bf16 autocast, channels_last, fused SGD) on any
device: with --device cpu the command is a CPU rehearsal of the GPU run (the test suite's; CUDA
graphs then go through l2l.graphs.Rehearsal, which replays by running the step again).

Data: --make-subset PATH --source NPZ writes a stratified subset of the offline CIFAR-10 arrays NPZ (or
$L2L_CIFAR10_NPZ; default 14,000 images, 41 MiB: under the 64 MiB that travels with the working tree to the
device machine).
The exact device-tool call (command, carry, timeout) and what to do with its files: benchmarks/RESULTS.md.
--merge FILE folds a fetched throughput.json into benchmarks/throughput.json.
--scale tiny runs the same sections at toy sizes on any device (the test suite's CPU rehearsal).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import throughput as tp  # noqa: E402  (benchmarks/throughput.py: the engine and naive paths)
from l2l.compiling import COMPILE_OPTIONS  # noqa: E402
from l2l.config import load_params, resolve_config  # noqa: E402
from l2l.spec import RunSpec  # noqa: E402
from l2l.cost import train_flops_per_image  # noqa: E402
from l2l.device_data import DeviceData  # noqa: E402
from l2l import engine  # noqa: E402
from l2l.compiling import set_fp32_precision  # noqa: E402
from l2l.engine import RunContext, load_checkpoint, step_batches, train_run  # noqa: E402
from l2l.graphs import WARMUP as GRAPH_WARMUP, Rehearsal  # noqa: E402
from l2l.methods import METHODS  # noqa: E402
from l2l.models import build_model  # noqa: E402
from l2l.profiling import flops, latencies, latency_mode  # noqa: E402
from l2l.pruning import count_parameters  # noqa: E402
from l2l.stacking import MemberContext, Recorder, StackedPhase  # noqa: E402

# The offline CIFAR-10 arrays the subset is drawn from: --source, or this environment variable (as in .ci/run)
SOURCE_ENV = "L2L_CIFAR10_NPZ"
# Model families at the paper profile's sizes (params.yaml profiles.paper.models), and toy ones.
PAPER_MODELS = {"cnn": {"arch": "cnn", "width": 64}, "vgg16": {"arch": "vgg16", "width": 1.0},
                "resnet20": {"arch": "cifar_resnet", "depth": 20},
                "p3_k2": {"arch": "layerwise_cnn", "preset": "k2"},
                "resnext": {"arch": "resnext", "layers": [3, 4, 6, 3], "groups": 32, "width_per_group": 4,
                            "planes": 64},
                "densenet": {"arch": "densenet", "growth_rate": 32, "block_config": [6, 12, 24, 16],
                             "num_init_features": 64, "bn_size": 4},
                "p4_resnet": {"arch": "cifar_resnet", "depth": 110}}
TINY_MODELS = {"cnn": {"arch": "cnn", "width": 4}, "resnet8": {"arch": "cifar_resnet", "depth": 8, "width": 4}}
# P5's teacher and planned students (params.yaml profiles.paper.models and the smoke profile's; the first is the
# teacher; tests/test_gpu_check.py checks that they agree with params.yaml)
P5_MODELS = {"p5_teacher": {"arch": "cifar_resnet", "depth": 110},
             "p5_resnet20": {"arch": "cifar_resnet", "depth": 20},
             "p5_wide_resnet20": {"arch": "cifar_resnet", "depth": 20, "width": 32},
             "p5_narrow_deep": {"arch": "cifar_resnet", "depth": 56, "width": 8}}
TINY_P5_MODELS = {"p5_teacher": {"arch": "cifar_resnet", "depth": 8, "width": 8},
                  "p5_resnet20": {"arch": "cifar_resnet", "depth": 8, "width": 3},
                  "p5_wide_resnet20": {"arch": "cifar_resnet", "depth": 8, "width": 6},
                  "p5_narrow_deep": {"arch": "cifar_resnet", "depth": 14, "width": 2}}
SCALES = {  # per scale: models, the methods section's model (smoke sizes), images per split, methods-section
    # epochs, timed batches, slice epochs, matmul size, concurrent runs
    "paper": dict(models=PAPER_MODELS, small={"arch": "cnn", "width": 16}, train=12000, val=1000, test=1000,
                  method_images=2048, epochs=2,
                  batch=128, warmup=10, steps=40, slice_epochs=3, matmul=8192, concurrency=[1, 2, 4],
                  graph_models=None, p3_models=None,  # from params.yaml's paper profile (paper_models)
                  tf32_warmup=3, tf32_steps=10,
                  latency_models=P5_MODELS, latency_batches=[1, 256], latency_warmup=10, latency_repeats=30),
    # tiny: enough real images and steps for every method to learn above chance (the CPU rehearsal)
    "tiny": dict(models=TINY_MODELS, small={"arch": "cnn", "width": 8}, train=640, val=300, test=64,
                 method_images=640, epochs=3, batch=32, compile_models=["cnn"],
                 compile_methods=["l2l_alternating"],  # the rest: tests/test_compile.py
                 warmup=1, steps=2, slice_epochs=1, matmul=256, concurrency=[1, 2],
                 graph_models={"resnet8": {"arch": "cifar_resnet", "depth": 8, "width": 4}},
                 p3_models={"p3_k2_narrow": {"arch": "layerwise_cnn", "preset": "k2", "M": 8, "M_tilde": 8}},
                 tf32_warmup=1, tf32_steps=2,
                 latency_models=TINY_P5_MODELS, latency_batches=[1, 8], latency_warmup=1, latency_repeats=3),
}
SECTIONS = ["stamp", "latency", "methods", "throughput", "stacking", "cuda_graphs", "tf32", "compile", "concurrency",
            "slice"]
# a rough floor of each section's seconds: skipped when less than this is left of the budget
NEEDS = {"stamp": 5, "latency": 30, "methods": 60, "throughput": 60, "stacking": 45, "cuda_graphs": 30, "tf32": 15,
         "compile": 90, "concurrency": 60, "slice": 60}
# the most seconds a section may take (its per-model loops stop there; the whole command: benchmarks/RESULTS.md)
SECTION_BUDGET_S = {"cuda_graphs": 75, "tf32": 35}
# the share of the budget by whose end the per-model loops of a section stop (later sections keep theirs)
ENDS_AT = {"throughput": 0.45, "stacking": 0.7, "compile": 0.8}
# The stacking section's model families (names of the paper profile's models), most GPU-hours first; a
# family with another's configuration (p5_teacher = p4_resnet, resnet20 = p5_resnet20) is that family
# (l2l.modes.family_modes). Tiny: the CPU rehearsal's.
STACK_FAMILIES = {"paper": ["p4_resnet", "p5_resnet20", "p5_narrow_deep", "p5_wide_resnet20", "vgg16", "cnn"],
                  "tiny": ["resnet8"]}
STACK_SIZES = {"paper": [1, 2, 4, 8, 16], "tiny": [1, 2]}
RUNS_PER_GPU = [2, 4]


PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
P3_FP32 = ("p3_k1", "p3_k2", "p3_k3")  # P3's networks as its code configures them: the fp32 experiments (tf32)
LAUNCH_BOUND_ARCHS = ("cifar_resnet",)  # ~266 (ResNet-20) to ~1,256 (ResNet-110) kernels a step (issue 21)


def paper_models() -> dict[str, dict]:
    """params.yaml's paper profile models (name -> builder config): the names throughput.json's modes use."""
    import yaml

    return yaml.safe_load(PARAMS.read_text())["profiles"]["paper"]["models"]


def graph_families(models: dict[str, dict]) -> dict[str, dict]:
    """The launch-bound models, one entry per distinct configuration: {first name: {"cfg", "names"}} (P4's
    ResNet-110 is also P5's teacher; P2's resnet20 is P5's ResNet-20)."""
    out: dict[str, dict] = {}
    for name, cfg in models.items():
        if cfg["arch"] in LAUNCH_BOUND_ARCHS:
            same = next((v for v in out.values() if v["cfg"] == cfg), None)
            if same:
                same["names"].append(name)
            else:
                out[name] = {"cfg": cfg, "names": [name]}
    return out


# --- data ---------------------------------------------------------------------------------

def make_subset(path: Path, n: int, source: str, seed: int = 0) -> dict:
    """A stratified subset of CIFAR-10's training images (n / 10 per class, drawn with `seed`) as
    x_train (n, 3, 32, 32) uint8 and y_train int64, written via a temporary file."""
    with np.load(source) as z:
        x, y = z["x_train"].reshape(-1, 3, 32, 32), z["y_train"].astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n // 10, replace=False) for c in range(10)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, x_train=x[idx], y_train=y[idx])
    os.replace(tmp, path)
    return {"path": str(path), "images": len(idx), "mib": round(path.stat().st_size / 2 ** 20, 1)}


def load_splits(path: str | None, s: dict) -> dict:
    """train/val/test arrays from the subset (or random images when none is given: --scale tiny)."""
    need = s["train"] + s["val"] + s["test"]
    if path:
        with np.load(path) as z:
            x, y = z["x_train"], z["y_train"].astype(np.int64)
        if len(y) < need:
            raise SystemExit(f"{path}: {len(y)} images, this scale needs {need}")
        order = np.random.default_rng(0).permutation(len(y))[:need]
        x, y = x[order], y[order]
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (need, 3, 32, 32), dtype=np.uint8), np.arange(need) % 10
    a, b = s["train"], s["train"] + s["val"]
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


# --- helpers ------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_data(arrays: dict, device: torch.device, train_images: int | None = None) -> DeviceData:
    """channels_last on every device: the CUDA branches' data layout (a CPU rehearses them)."""
    if train_images is not None:
        arrays = {**arrays, "train": tuple(a[:train_images] for a in arrays["train"])}
    return DeviceData(arrays, "cifar10", device, crop_padding=4, flip=True, channels_last=True)


def spec_for(method: str, cfg: dict, s: dict, epochs: int, options: dict | None = None, **train) -> RunSpec:
    opts = METHODS[method].validate_options(options or {}, f"gpu_check.{method}")
    return RunSpec("gpu_check", method, cfg["arch"], "cifar10", 0, cfg,
                   {**tp.TRAIN, "epochs": epochs, "batch_size": s["batch"], **train}, opts,
                   {"fingerprint": "gpu_check"})


def run(spec: RunSpec, data: DeviceData, device: torch.device, root: Path, name: str, cuda_graphs: bool = False,
        **kw) -> dict:
    """Train a run through the engine's CUDA branches (a CPU takes them too: the rehearsal)."""
    ctx = RunContext(spec, data, 10, device, runs=root, cuda_branches=True, cuda_graphs=cuda_graphs,
                     graph_backend=None if device.type == "cuda" else Rehearsal())
    return train_run(spec, METHODS[spec.method], ctx, root / name, **kw)


def step_runner(cfg: dict, x, y, device: torch.device, batch: int, graphs: bool = False, **train):
    """run(n): n training batches of the conventional step through the engine's CUDA branches (and, with
    graphs, captured and replayed as executor.cuda_graphs does: the first GRAPH_WARMUP eager, then one
    capture; l2l.graphs.Rehearsal on a CPU). x: whole batches only (one shape). run.phase: its modules."""
    spec = RunSpec("gpu_check", "conventional", cfg["arch"], "cifar10", 0, cfg,
                   {**tp.TRAIN, "batch_size": batch, **train},
                   METHODS["conventional"].validate_options({}, "gpu_check"),
                   {"fingerprint": "gpu_check"})
    data = DeviceData({"train": (x, y)}, "cifar10", device, crop_padding=4, flip=True, channels_last=True)
    torch.manual_seed(0)
    ctx = RunContext(spec, data, 10, device, cuda_branches=True, cuda_graphs=graphs,
                     graph_backend=None if device.type == "cuda" else Rehearsal())
    phase = next(METHODS["conventional"].phases(spec, ctx))
    step = ctx.graphs.epoch_step(phase) if graphs else phase.step  # one capture for the whole measurement
    batches = itertools.chain.from_iterable(data.train_batches(0, 0, e, batch) for e in itertools.count())

    def runner(n: int):
        return step_batches(step, itertools.islice(batches, n), device)

    runner.phase, runner.ctx = phase, ctx
    return runner


def param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())


def max_param_diff(a: Path, b: Path) -> float:
    x, y = load_checkpoint(a), load_checkpoint(b)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].is_floating_point())


def epoch_summary(result: dict) -> dict:
    return {"val_acc": result["final"]["val_acc"], "train_loss": result["final"]["train_loss"],
            "train_seconds": result["train_seconds"], "images_per_s": result["images_per_s"],
            "epochs": result["epochs"], "updates": result["updates"], "compile": result.get("compile")}


def method_runs(s: dict) -> list[tuple[str, str, dict, dict]]:
    """(label, method, model cfg, options) of the methods section: every method and l2l reading."""
    m = s["small"]
    return [("conventional", "conventional", m, {}), ("layerwise", "layerwise", m, {}),
            ("l2l_alternating", "l2l", m, {"reading": "alternating"}), ("l2l_mutual", "l2l", m, {"reading": "mutual"}),
            ("generations", "generations", m, {"generations": 1}), ("distill", "distill", m, {})]


# --- sections -------------------------------------------------------------------------------

def section_stamp(args, s, device, arrays) -> dict:
    out = tp.stamp(device, os.getloadavg()[0])
    if device.type == "cuda":
        out["driver"] = _driver()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = s["matmul"] if device.type == "cuda" else min(s["matmul"], 1024)  # a CPU rehearsal needs no ceiling
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # random data: zeros run faster
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    out["matmul_dtype"] = str(dtype).removeprefix("torch.")
    out["matmul_tflops"] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    out["datasheet_bf16_tflops"] = tp.peak_tflops(out["device_name"]) if device.type == "cuda" else None
    return out


def _driver() -> str:
    with contextlib.suppress(Exception):
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    return "unknown"


def section_latency(args, s, device) -> dict:
    """P5-C1's cost side on this device, before any P5 run: params, FLOPs and leaf-module count of the
    teacher and each planned student, forward latency (median ms) per batch size in eager mode and as
    CUDA-graph replays (l2l.profiling.latencies, the distill method's measure: bf16 autocast and
    channels_last on CUDA, fp32 on a CPU, which has no graphs), and each student / teacher ratio."""
    names = list(s["latency_models"])
    teacher = names[0]
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    models = {n: build_model(cfg, 100).to(device, memory_format=fmt) for n, cfg in s["latency_models"].items()}

    def autocast():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    out = {"dtype": "bf16" if cuda else "fp32", "classes": 100, "teacher": teacher,
           "models": {n: {"cfg": s["latency_models"][n], "params": count_parameters(m), "flops": flops(m, (3, 32, 32)),
                          "leaf_modules": sum(1 for x in m.modules() if not list(x.children()))}
                      for n, m in models.items()},
           "modes": {}}
    for mode in dict.fromkeys(latency_mode(m, device) for m in ("eager", "cuda_graph")):
        per = {}
        for b in s["latency_batches"]:
            t = latencies(models, b, (3, 32, 32), s["latency_warmup"], s["latency_repeats"], autocast=autocast,
                          memory_format=fmt, mode=mode)
            per[f"b{b}"] = {n: {"median_ms": r["median_ms"], "iqr_ms": r["iqr_ms"],
                                "ratio": r["median_ms"] / t[teacher]["median_ms"]} for n, r in t.items()}
        out["modes"][mode] = per
    for n, row in out["models"].items():
        row["flops_ratio"] = row["flops"] / out["models"][teacher]["flops"]
        row["leaf_module_ratio"] = row["leaf_modules"] / out["models"][teacher]["leaf_modules"]
    return out


def section_methods(args, s, device, arrays, root: Path) -> dict:
    data = device_data(arrays, device, s["method_images"])
    # what a predictor that ignores the image scores: the validation split's largest class share
    out = {"chance_val_acc": 100.0 * float(np.bincount(arrays["val"][1]).max()) / len(arrays["val"][1])}
    teacher = spec_for("conventional", {"arch": "cifar_resnet", "depth": 8, "width": 4}, s, s["epochs"])
    run(teacher, data, device, root, teacher.hash)
    for label, method, cfg, options in method_runs(s):
        if method == "distill":
            options = {**options, "latency_batches": [1, 8], "latency_warmup": 1, "latency_repeats": 3}
        spec = spec_for(method, cfg, s, s["epochs"], options)
        if method == "distill":
            spec = dataclasses.replace(spec, options={**spec.options, "teacher_run": {"hash": teacher.hash,
                                                                                      "model_cfg": teacher.model_cfg}})
        out[label] = epoch_summary(run(spec, data, device, root, f"{label}-{spec.hash}"))
    # resume: interrupted after 1 of 2 epochs, then resumed, against the uninterrupted run
    spec = spec_for("conventional", s["small"], s, 2)
    whole = run(spec, data, device, root, "whole")
    run(spec, data, device, root, "resumed", stop_after_epochs=1)
    resumed = run(spec, data, device, root, "resumed")
    out["resume"] = {"max_param_diff": max_param_diff(root / "whole/final.pt", root / "resumed/final.pt"),
                     "val_acc_whole": whole["final"]["val_acc"], "val_acc_resumed": resumed["final"]["val_acc"]}
    for det in (False, True):  # the same seed twice
        spec = spec_for("conventional", s["small"], s, s["epochs"], deterministic=det)
        a = run(spec, data, device, root, f"seed-a-{det}")
        b = run(spec, data, device, root, f"seed-b-{det}")
        out[f"same_seed_deterministic_{str(det).lower()}"] = {
            "max_param_diff": max_param_diff(root / f"seed-a-{det}/final.pt", root / f"seed-b-{det}/final.pt"),
            "val_acc": [a["final"]["val_acc"], b["final"]["val_acc"]],
            "train_seconds": [a["train_seconds"], b["train_seconds"]]}
    torch.use_deterministic_algorithms(False)
    return out


def section_cuda_graphs(args, s, device, arrays, root: Path, deadline: float) -> dict:
    """executor.cuda_graphs measured: per launch-bound family the step eager and replayed (images/s, peak
    memory, TFLOP/s, parameter difference after the same batches), then every method one epoch with graphs
    on and off (deterministic kernels: the same numbers expected)."""
    x, y = arrays["train"]
    n = len(y) // s["batch"] * s["batch"]
    warmup = max(s["warmup"], GRAPH_WARMUP + 1)  # the eager warm-up steps and the capture stay untimed
    families = s["graph_models"] or graph_families(paper_models())
    out = {"backend": "torch.cuda.graph" if device.type == "cuda" else
           "l2l.graphs.Rehearsal (no capture on a CPU: replays run the step again)", "models": {}, "methods": {}}
    for name, fam in families.items():
        fam = fam if "cfg" in fam else {"cfg": fam, "names": [name]}
        if time.monotonic() > deadline:
            out["models"][name] = {"names": fam["names"], "skipped": "budget"}
            continue
        row = {"cfg": fam["cfg"], "names": fam["names"], "batch_size": s["batch"],
               "train_gflop_per_image": train_flops_per_image(fam["cfg"], 10, s["batch"]) / 1e9}
        runners = {}
        for graphs in (False, True):
            key = "graphs" if graphs else "eager"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runners[key] = step_runner(fam["cfg"], x[:n], y[:n], device, s["batch"], graphs=graphs)
            secs = tp._timed(runners[key], warmup, s["steps"], device)
            row[f"{key}_images_per_s"] = s["steps"] * s["batch"] / secs
            row[f"{key}_achieved_tflops"] = row[f"{key}_images_per_s"] * row["train_gflop_per_image"] / 1e3
            if device.type == "cuda":
                row[f"{key}_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        row["speedup"] = row["graphs_images_per_s"] / row["eager_images_per_s"]
        # executor.checkpoint_min_seconds' basis on this device: one resume state (copied to the host, written,
        # hashed) against an epoch of 50,000 images at the faster rate
        state = {"phase": 0, "epoch": 0, "state": engine._phase_state(runners["graphs"].phase),
                 "rng": engine._rng_state(device), "history": [], "best": {},
                 "best_state": engine._cpu_copy(runners["graphs"].phase.predictor.state_dict()), "phase_metrics": {}}
        (root / f"checkpoint-{name}").mkdir(exist_ok=True)
        t0 = time.perf_counter()
        engine._save_resume(state, root / f"checkpoint-{name}")
        row["checkpoint_seconds"] = time.perf_counter() - t0
        row["epoch_seconds_50k"] = 50000 / max(row["eager_images_per_s"], row["graphs_images_per_s"])
        # the same initialisation and batches: how far apart the two are after warm-up + timed steps
        row["max_param_diff"] = param_diff(runners["eager"].phase.predictor, runners["graphs"].phase.predictor)
        row["graphs"] = runners["graphs"].ctx.graphs.summary()
        out["models"][name] = row
    data = device_data(arrays, device, s["method_images"])
    teacher = spec_for("conventional", {"arch": "cifar_resnet", "depth": 8, "width": 4}, s, 1, deterministic=True)
    run(teacher, data, device, root, teacher.hash)
    for label, method, cfg, options in method_runs(s):
        if time.monotonic() > deadline:
            out["methods"][label] = {"skipped": "budget"}
            continue
        if method == "distill":
            options = {**options, "latency_batches": [1], "latency_warmup": 1, "latency_repeats": 2}
        spec = spec_for(method, cfg, s, 1, options, deterministic=True)
        if method == "distill":
            spec = dataclasses.replace(spec, options={**spec.options, "teacher_run": {"hash": teacher.hash,
                                                                                      "model_cfg": teacher.model_cfg}})
        r = {g: run(spec, data, device, root, f"graphs-{label}-{g}", cuda_graphs=g) for g in (False, True)}
        out["methods"][label] = {
            "max_param_diff": max_param_diff(root / f"graphs-{label}-False/final.pt",
                                             root / f"graphs-{label}-True/final.pt"),
            "val_acc_eager": r[False]["final"]["val_acc"], "val_acc_graphs": r[True]["final"]["val_acc"],
            "train_seconds_eager": r[False]["train_seconds"], "train_seconds_graphs": r[True]["train_seconds"],
            "graphs": r[True]["cuda_graphs"]}
    torch.use_deterministic_algorithms(False)
    return out


def section_tf32(args, s, device, arrays, deadline: float) -> dict:
    """train.tf32 on P3's fp32 networks (the official configuration, trained end to end: an upper bound of a
    layerwise phase's cost): images/s and TFLOP/s with TF32 off (IEEE) and on; the largest difference of one
    forward's logits (eval mode, the same weights and batch) relative to their largest magnitude."""
    x, y = arrays["train"]
    n = len(y) // s["batch"] * s["batch"]
    models = s["p3_models"] or {k: v for k, v in paper_models().items() if k in P3_FP32}
    rows = {}
    for name, cfg in models.items():
        if time.monotonic() > deadline:
            rows[name] = {"skipped": "budget"}
            continue
        row = {"cfg": cfg, "batch_size": s["batch"],
               "train_gflop_per_image": train_flops_per_image(cfg, 10, s["batch"]) / 1e9}
        for tf32 in (False, True):
            key = "tf32" if tf32 else "ieee"
            runner = step_runner(cfg, x[:n], y[:n], device, s["batch"], precision="fp32", tf32=tf32)
            secs = tp._timed(runner, s["tf32_warmup"], s["tf32_steps"], device)
            row[f"{key}_images_per_s"] = s["tf32_steps"] * s["batch"] / secs
            row[f"{key}_achieved_tflops"] = row[f"{key}_images_per_s"] * row["train_gflop_per_image"] / 1e3
        row["tf32_speedup"] = row["tf32_images_per_s"] / row["ieee_images_per_s"]
        torch.manual_seed(0)
        model = build_model(cfg, 10).to(device, memory_format=torch.channels_last).eval()
        batch = device_data({"train": arrays["train"]}, device).normalise(
            torch.from_numpy(np.ascontiguousarray(x[:s["batch"]])).to(device))
        logits = {}
        with torch.no_grad():
            for tf32 in (False, True):
                set_fp32_precision(tf32)
                logits[tf32] = model(batch).double()
        row["max_rel_logit_diff"] = float((logits[True] - logits[False]).abs().max() / logits[False].abs().max())
        rows[name] = row
    set_fp32_precision(False)
    return rows


def section_throughput(args, s, device, arrays, deadline: float, ceiling: float | None) -> dict:
    x, y = arrays["train"]
    naive = tp.naive_dataset(x, y, None)
    rows = {}
    for name, cfg in s["models"].items():
        if time.monotonic() > deadline:
            rows[name] = {"cfg": cfg, "skipped": "budget"}
            continue
        row = {"cfg": cfg, "batch_size": s["batch"]}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        secs = tp._timed(tp.engine_runner(cfg, x, y, device, s["batch"], False), s["warmup"], s["steps"], device)
        row["engine_images_per_s"] = s["steps"] * s["batch"] / secs
        if device.type == "cuda":
            row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        big = args.large_batch if s is SCALES["paper"] else 2 * s["batch"]
        n_big = len(y) // big * big
        if n_big:
            secs = tp._timed(tp.engine_runner(cfg, x[:n_big], y[:n_big], device, big, False), 2, s["steps"] // 2 or 1,
                             device)
            row[f"engine_b{big}_images_per_s"] = (s["steps"] // 2 or 1) * big / secs
        secs = tp._timed(tp.naive_runner(cfg, naive, device, s["batch"], args.naive_workers), s["warmup"], s["steps"],
                         device)
        row["naive_images_per_s"] = s["steps"] * s["batch"] / secs
        row["ratio"] = row["engine_images_per_s"] / row["naive_images_per_s"]
        row["train_gflop_per_image"] = train_flops_per_image(cfg, 10, s["batch"]) / 1e9
        row["achieved_tflops"] = row["engine_images_per_s"] * row["train_gflop_per_image"] / 1e3
        row["share_of_measured_ceiling"] = row["achieved_tflops"] / ceiling if ceiling else None
        rows[name] = row
    return rows


def section_compile(args, s, device, arrays, root: Path, deadline: float) -> dict:
    x, y = arrays["train"]
    models = {}
    for name, cfg in s["models"].items():
        if name not in s.get("compile_models", s["models"]):
            continue
        if time.monotonic() > deadline:
            models[name] = {"skipped": "budget"}
            continue
        runner = tp.engine_runner(cfg, x, y, device, s["batch"], True)
        t0 = time.perf_counter()
        runner(2)  # the two shapes of the first batches: the cold compile
        sync(device)
        compile_seconds = time.perf_counter() - t0
        secs = tp._timed(runner, s["warmup"], s["steps"], device)
        models[name] = {"compile_seconds": compile_seconds, "compiled_images_per_s": s["steps"] * s["batch"] / secs}
    methods = {}
    data = device_data(arrays, device, s["method_images"])
    for label, method, cfg, options in method_runs(s):
        if method == "distill" or label not in s.get("compile_methods", [label]):
            continue  # distill's step is kd_step, which generations has too
        if time.monotonic() > deadline:
            methods[label] = {"skipped": "budget"}
            continue
        out = {}
        for c in (False, True):
            spec = spec_for(method, cfg, s, 1, options, compile=c)
            r = run(spec, data, device, root, f"compile-{label}-{c}")
            out["compiled" if c else "eager"] = {"train_seconds": r["train_seconds"], "compile": r["compile"]}
        methods[label] = out
    return {"models": models, "methods": methods}


def section_concurrency(args, s, device, arrays) -> dict:
    if device.type != "cuda":
        return {"skipped": "needs CUDA (runs share one GPU)"}
    x, y = arrays["train"]
    ns = argparse.Namespace(batch_size=s["batch"], warmup=s["warmup"], steps=s["steps"])
    cfg = s["models"]["cnn"]
    return {"model": "cnn", "images_per_s": {str(k): tp.concurrent_images_per_s(cfg, x, y, k, ns, False)
                                             for k in s["concurrency"]}}


def section_slice(args, s, device, arrays, root: Path) -> dict:
    data = device_data(arrays, device)
    out = {}
    cfgs = {"resnet20": {"arch": "cifar_resnet", "depth": 20},
            "p3_k2_block1": {"arch": "layerwise_cnn", "preset": "k2"}}
    if s is SCALES["tiny"]:
        cfgs = {"resnet8": TINY_MODELS["resnet8"], "p3_k2_narrow_block1": {"arch": "layerwise_cnn", "preset": "k2",
                                                                            "M": 8, "M_tilde": 8}}
    for name, cfg in cfgs.items():
        method = "layerwise" if cfg["arch"] == "layerwise_cnn" else "conventional"
        spec = spec_for(method, cfg, s, s["slice_epochs"])
        # layerwise: its first block only (the run stops after that phase's epochs)
        rows: list[dict] = []
        run(spec, data, device, root, f"slice-{name}", on_epoch=rows.append,
            stop_after_epochs=s["slice_epochs"] if method == "layerwise" else None)
        r = {"final": rows[-1], "epoch_seconds": [row["epoch_seconds"] for row in rows]}
        out[name] = {"val_acc": r["final"]["val_acc"], "train_loss": r["final"]["train_loss"],
                     "phase": r["final"]["phase"],
                     "epoch_seconds": r["epoch_seconds"], "train_images": len(arrays["train"][1])}
    return out


def _family_cfgs(scale: str) -> dict[str, dict]:
    if scale == "tiny":
        return {"resnet8": TINY_MODELS["resnet8"]}
    params = {**load_params(Path(__file__).resolve().parents[1] / "params.yaml"), "profile": "paper"}
    return {n: c for n, c in resolve_config(params).profile.models.items() if n in STACK_FAMILIES["paper"]}


def _stacked_runner(cfg: dict, data: DeviceData, device: torch.device, batch: int, k: int):
    """run(n): n stacked training steps of k conventional runs (seeds 0..k-1) of `cfg`, each on its own seed's
    batches, as the executor trains a stack (l2l.stacking.StackedPhase)."""
    specs = [spec_for("conventional", cfg, {"batch": batch}, 1) for _ in range(k)]
    specs = [dataclasses.replace(s, seed=i) for i, s in enumerate(specs)]
    rec = Recorder(specs)
    phases = []
    for s in specs:
        torch.manual_seed(s.seed)
        ctx = MemberContext(s, data, 10, device, runs=Path(os.devnull), stack=rec, member=s.seed)
        phases.append(next(METHODS["conventional"].phases(s, ctx)))
    stacked = StackedPhase(phases, rec)
    plans, epoch, pos = None, 0, [len(data)]

    def run(n: int) -> None:
        nonlocal plans, epoch
        for _ in range(n):
            if pos[0] + batch > len(data):  # whole batches only: one shape
                plans = tuple(torch.stack(t) for t in zip(*(data.epoch_by_position(s.seed, 0, epoch) for s in specs)))
                epoch, pos[0] = epoch + 1, 0
            x, y = data.stacked_batch(plans, pos[0], pos[0] + batch)
            stacked.step(x, y)
            pos[0] += batch
    return run


def _rpg_worker(cfg_q, out_q, arrays, device_name: str) -> None:
    """A persistent process of the runs_per_gpu measurement: per job, an engine runner warmed up, then timed
    when the parent says go (every job's processes start their timed steps together)."""
    device = torch.device(device_name)
    x, y = arrays
    while (job := cfg_q.get()) is not None:
        cfg, batch, warmup, steps = job
        run = tp.engine_runner(cfg, x, y, device, batch, False)
        run(warmup)
        sync(device)
        out_q.put("ready")
        cfg_q.get()  # go
        t0 = time.monotonic()
        run(steps)
        sync(device)
        out_q.put((steps * batch, t0, time.monotonic()))


class _Processes:
    """N persistent worker processes sharing the GPU (runs_per_gpu): started once for every family."""

    def __init__(self, n: int, arrays, device: torch.device):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.qs = [ctx.Queue() for _ in range(n)]
        self.out = ctx.Queue()
        self.procs = [ctx.Process(target=_rpg_worker, args=(q, self.out, arrays, str(device)), daemon=True)
                      for q in self.qs]
        for p in self.procs:
            p.start()

    def images_per_s(self, cfg: dict, n: int, batch: int, warmup: int, steps: int) -> float:
        for q in self.qs[:n]:
            q.put((cfg, batch, warmup, steps))
        for _ in range(n):
            assert self.out.get(timeout=600) == "ready"
        for q in self.qs[:n]:
            q.put("go")
        done = [self.out.get(timeout=600) for _ in range(n)]
        return sum(i for i, _, _ in done) / (max(e for _, _, e in done) - min(t for _, t, _ in done))

    def close(self) -> None:
        for q in self.qs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=60)


def section_stacking(args, s, device, arrays, deadline: float) -> dict:
    """Per family: separate, stacked_K and runs_per_gpu_N, each as aggregate training images/s (all runs in
    flight), peak memory and achieved TFLOP/s: the modes of throughput.json (l2l/modes.py)."""
    scale = args.scale
    x, y = arrays["train"]
    n_train = len(y) // s["batch"] * s["batch"]
    data = device_data({**arrays, "train": (x[:n_train], y[:n_train])}, device)
    cuda = device.type == "cuda"
    procs = _Processes(max(RUNS_PER_GPU), (x[:n_train], y[:n_train]), device) if cuda else None
    warmup, steps = max(2, s["warmup"] // 2), max(2, s["steps"] // 2)
    out, skipped = {}, []
    try:
        for name, cfg in _family_cfgs(scale).items():
            if time.monotonic() > deadline:
                skipped.append(name)
                continue
            gflop = train_flops_per_image(cfg, 10, s["batch"]) / 1e9
            modes = {}

            def record(mode: str, runs: int, seconds_or_rate, peak: float | None, rate: bool = False) -> None:
                ips = seconds_or_rate if rate else runs * steps * s["batch"] / seconds_or_rate
                modes[mode] = {"images_per_s": ips, "peak_memory_gib": peak, "achieved_tflops": ips * gflop / 1e3,
                               "runs": runs}

            def peak() -> float | None:
                return torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None

            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            secs = tp._timed(tp.engine_runner(cfg, x[:n_train], y[:n_train], device, s["batch"], False), warmup,
                             steps, device)
            record("separate", 1, secs, peak())
            for k in STACK_SIZES[scale]:
                if time.monotonic() > deadline:
                    break
                try:
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    secs = tp._timed(_stacked_runner(cfg, data, device, s["batch"], k), warmup, steps, device)
                    record(f"stacked_{k}", k, secs, peak())
                except torch.OutOfMemoryError:
                    modes[f"stacked_{k}"] = {"skipped": "out of memory"}
                    break
            for n in RUNS_PER_GPU if cuda else []:
                if time.monotonic() > deadline:
                    break
                record(f"runs_per_gpu_{n}", n, procs.images_per_s(cfg, n, s["batch"], warmup, steps), None, rate=True)
            best = max((m for m in modes if "images_per_s" in modes[m]), key=lambda m: modes[m]["images_per_s"])
            out[name] = {"cfg": cfg, "train_gflop_per_image": gflop, "modes": modes, "fastest": best}
    finally:
        if procs is not None:
            procs.close()
    return {"families": out, "skipped_for_budget": skipped,
            "runs_per_gpu": "measured" if cuda else "skipped: needs CUDA (runs share one GPU)"}


# --- outputs --------------------------------------------------------------------------------

def throughput_doc(results: dict, s: dict) -> dict:
    """The measurement in benchmarks/throughput.json's format (one device), from sections 1, 3 and 4."""
    st = dict(results["stamp"])
    models = {}
    for name, row in results.get("throughput", {}).items():
        if "skipped" in row:
            continue
        comp = results.get("compile", {}).get("models", {}).get(name, {})
        models[name] = {**row, "engine_compiled_images_per_s": comp.get("compiled_images_per_s"),
                        "share_of_bf16_peak": row["share_of_measured_ceiling"]}
    conc = results.get("concurrency") or {}
    # execution modes per family (l2l/modes.py): every measured mode of every family, CUDA graphs' beside them
    modes = {name: {m: f for m, f in fam["modes"].items() if "images_per_s" in f}
             for name, fam in (results.get("stacking") or {}).get("families", {}).items()}
    return {"stamp": st, "data": results["data"], "images": s["train"], "warmup": s["warmup"], "steps": s["steps"],
            "naive_workers": results["naive_workers"], "peak_bf16_tflops": st.get("matmul_tflops"),
            "peak_source": "bf16 matmul measured by benchmarks/gpu_check.py", "models": models,
            "concurrency": conc if "images_per_s" in conc else None,
            "modes": merge_modes(modes, cuda_graphs_modes(results)),
            "source": "benchmarks/gpu_check.py"}


def cuda_graphs_modes(results: dict) -> dict[str, dict]:
    """throughput.json's mode `cuda_graphs` per profile model name (l2l/modes.py's format: images/s, peak memory
    GiB, achieved TFLOP/s, runs in flight), from the cuda_graphs section: CUDA measurements only (a CPU
    rehearsal replays by running the step again, which says nothing of a graph's speed)."""
    sec = results.get("cuda_graphs") or {}
    if results.get("stamp", {}).get("device") != "cuda":
        return {}
    out = {}
    for row in sec.get("models", {}).values():
        if "skipped" in row or not row["graphs"]["used"]:
            continue
        mode = {"images_per_s": row["graphs_images_per_s"], "peak_memory_gib": row.get("graphs_peak_memory_gib"),
                "achieved_tflops": row["graphs_achieved_tflops"], "runs": 1}
        for name in row["names"]:
            out[name] = {"cuda_graphs": mode}
    return out


def merge_modes(*parts: dict[str, dict]) -> dict[str, dict]:
    """Each section's measured modes ({model: {mode: figures}}) merged per model."""
    out: dict[str, dict] = {}
    for part in parts:
        for model, modes in part.items():
            out.setdefault(model, {}).update(modes)
    return out


def markdown(results: dict) -> str:
    st = results["stamp"]
    f = lambda v, fmt="{:.0f}": "-" if v is None else fmt.format(v)  # noqa: E731
    lines = [f"{st['date']} | {st['device_name']} ({st['device']}), driver {st.get('driver', '-')} | torch "
             f"{st['torch']}, CUDA {st['cuda']}, cuDNN {st['cudnn']} | measured {st['matmul_dtype']} matmul "
             f"{st['matmul_tflops']:.3g} TFLOP/s (datasheet {f(st.get('datasheet_bf16_tflops'), '{:.0f}')}) | "
             f"scale {results['scale']}, data {results['data']}", ""]
    if "methods" in results:
        epochs = SCALES[results["scale"]]["epochs"]
        lines += [f"| method ({epochs} epochs, small model) | val acc | train s | img/s | updates |",
                  "|---|---|---|---|---|"]
        for k, r in results["methods"].items():
            if isinstance(r, dict) and "updates" in r:
                lines.append(f"| {k} | {r['val_acc']:.1f} | {r['train_seconds']:.1f} | {r['images_per_s']:.0f} | "
                             f"{r['updates']} |")
        m = results["methods"]
        lines += ["", f"Chance (the validation split's largest class): {m['chance_val_acc']:.1f}%. "
                  f"Resume: largest parameter difference {m['resume']['max_param_diff']:.3g}; same seed twice: "
                  f"{m['same_seed_deterministic_false']['max_param_diff']:.3g} (deterministic off), "
                  f"{m['same_seed_deterministic_true']['max_param_diff']:.3g} (on).", ""]
    lat = results.get("latency")
    if lat:
        modes = list(lat["modes"])
        batches = list(next(iter(lat["modes"].values())))
        cols = [f"{m} {b} ms (ratio)" for m in modes for b in batches]
        lines += [f"P5 latency ({lat['dtype']}, {lat['classes']} classes; ratio = model / {lat['teacher']}; P5-C1 "
                  "decides on the cuda_graph b256 ratio, P5-C1/b1 on b1, both at most 0.5):", "",
                  "| model | params | MFLOPs | FLOPs ratio | leaf modules (ratio) | " + " | ".join(cols) + " |",
                  "|" + "---|" * (5 + len(cols))]
        for n, r in lat["models"].items():
            cells = [f"{lat['modes'][m][b][n]['median_ms']:.3g} ({lat['modes'][m][b][n]['ratio']:.2f})"
                     for m in modes for b in batches]
            lines.append(f"| {n} | {r['params']:,} | {r['flops'] / 1e6:.1f} | {r['flops_ratio']:.3f} | "
                         f"{r['leaf_modules']} ({r['leaf_module_ratio']:.2f}) | " + " | ".join(cells) + " |")
        lines.append("")
    comp = results.get("compile", {}).get("models", {})
    if "throughput" in results:
        lines += ["| model | batch | engine img/s | engine+compile img/s | compile s | naive img/s | ratio | "
                  "large-batch img/s | GFLOP/img | TFLOP/s | % measured ceiling | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["throughput"].items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped ({r['skipped']}) |")
                continue
            c = comp.get(name, {})
            big = next((v for k, v in r.items() if k.startswith("engine_b")), None)
            share = None if r["share_of_measured_ceiling"] is None else 100 * r["share_of_measured_ceiling"]
            lines.append(f"| {name} | {r['batch_size']} | {f(r['engine_images_per_s'])} | "
                         f"{f(c.get('compiled_images_per_s'))} | {f(c.get('compile_seconds'), '{:.1f}')} | "
                         f"{f(r['naive_images_per_s'])} | {r['ratio']:.2f} | {f(big)} | "
                         f"{r['train_gflop_per_image']:.3f} | {r['achieved_tflops']:.2f} | {f(share, '{:.1f}')} | "
                         f"{f(r.get('peak_memory_mib'))} |")
    fams = (results.get("stacking") or {}).get("families", {})
    if fams:
        lines += ["", "| family | mode | runs | aggregate img/s | x separate | peak GiB | TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        for name, fam in fams.items():
            sep = fam["modes"]["separate"]["images_per_s"]
            for mode, m in fam["modes"].items():
                if "images_per_s" not in m:
                    lines.append(f"| {name} | {mode} | skipped ({m.get('skipped')}) |")
                    continue
                lines.append(f"| {name} | {mode}{' (fastest)' if mode == fam['fastest'] else ''} | {m['runs']} | "
                             f"{m['images_per_s']:.0f} | {m['images_per_s'] / sep:.2f} | "
                             f"{f(m['peak_memory_gib'], '{:.1f}')} | {m['achieved_tflops']:.2f} |")
    for label, r in results.get("compile", {}).get("methods", {}).items():
        if "skipped" in r:
            lines.append(f"- compile {label}: skipped ({r['skipped']})")
            continue
        e, c = r["eager"], r["compiled"]
        lines.append(f"- compile {label}: 1 epoch {e['train_seconds']:.1f} s eager, {c['train_seconds']:.1f} s "
                     f"compiled (cold), {c['compile']['graphs']} graphs, {c['compile']['fallbacks_to_eager']} "
                     "fallbacks")
    lines += cuda_graphs_markdown(results.get("cuda_graphs")) + tf32_markdown(results.get("tf32"))
    conc = results.get("concurrency")
    if conc:
        lines += ["", "Concurrency: " + (conc.get("skipped") or ", ".join(
            f"{k} runs {v:.0f} img/s" for k, v in conc["images_per_s"].items()))]
    for name, r in results.get("slice", {}).items():
        secs = ", ".join(f"{x:.2f}" for x in r["epoch_seconds"])
        lines.append(f"- slice {name} ({r['phase']}, {r['train_images']} images): val acc {r['val_acc']:.1f}, "
                     f"seconds per epoch {secs}")
    lines += ["", "Sections: " + ", ".join(f"{k} {v}" for k, v in results["sections"].items())]
    return "\n".join(lines) + "\n"


def cuda_graphs_markdown(sec: dict | None) -> list[str]:
    if not sec:
        return []
    f = lambda v, fmt="{:.0f}": "-" if v is None else fmt.format(v)  # noqa: E731
    lines = ["", f"CUDA graphs ({sec['backend']}): the step eager and replayed", "",
             "| model (profile names) | batch | eager img/s | graphs img/s | speedup | graphs TFLOP/s | "
             "graphs peak GiB | max param diff | checkpoint s | epoch s (50k) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sec["models"].items():
        if "skipped" in r:
            lines.append(f"| {name} ({', '.join(r['names'])}) | skipped ({r['skipped']}) |")
            continue
        lines.append(f"| {name} ({', '.join(r['names'])}) | {r['batch_size']} | {f(r['eager_images_per_s'])} | "
                     f"{f(r['graphs_images_per_s'])} | {r['speedup']:.2f} | {r['graphs_achieved_tflops']:.2f} | "
                     f"{f(r.get('graphs_peak_memory_gib'), '{:.2f}')} | {r['max_param_diff']:.3g} | "
                     f"{r['checkpoint_seconds']:.3f} | {r['epoch_seconds_50k']:.1f} |")
    for label, r in sec["methods"].items():
        if "skipped" in r:
            lines.append(f"- graphs {label}: skipped ({r['skipped']})")
            continue
        g = r["graphs"]
        eager = f", eager phases {','.join(g['eager_phases'])}" if g["eager_phases"] else ""
        failed = f", failed captures {g['failed_phases']}" if g["failed_phases"] else ""
        lines.append(f"- graphs {label} (1 epoch, deterministic): {g['captures']} captures, {g['replayed_steps']} "
                     f"replayed and {g['eager_steps']} eager steps{eager}{failed}; "
                     f"max param diff vs eager {r['max_param_diff']:.3g}; {r['train_seconds_eager']:.2f} s eager, "
                     f"{r['train_seconds_graphs']:.2f} s graphs")
    return lines


def tf32_markdown(sec: dict | None) -> list[str]:
    if not sec:
        return []
    lines = ["", "TF32 on P3's fp32 networks (train.tf32; default false, IEEE as P3's code)", "",
             "| model | batch | IEEE img/s | TF32 img/s | speedup | IEEE TFLOP/s | TF32 TFLOP/s | "
             "max rel. logit diff |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sec.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped ({r['skipped']}) |")
            continue
        lines.append(f"| {name} | {r['batch_size']} | {r['ieee_images_per_s']:.0f} | {r['tf32_images_per_s']:.0f} | "
                     f"{r['tf32_speedup']:.2f} | {r['ieee_achieved_tflops']:.2f} | {r['tf32_achieved_tflops']:.2f} | "
                     f"{r['max_rel_logit_diff']:.2g} |")
    return lines


def write(out: Path, results: dict, s: dict) -> None:
    """Everything measured so far, each file via a temporary name (a kill leaves whole files)."""
    docs = {"gpu_check.json": json.dumps(results, indent=2, default=str) + "\n", "gpu_check.md": markdown(results)}
    if "stamp" in results:
        m = throughput_doc(results, s)
        docs["throughput.json"] = json.dumps({"about": "benchmarks/gpu_check.py", "measurements":
                                              {m["stamp"]["device_name"]: m}}, indent=2) + "\n"
    for name, text in docs.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def merge(fetched: Path, into: Path = Path("benchmarks/throughput.json")) -> None:
    for m in json.loads(fetched.read_text())["measurements"].values():
        tp.store(m, into)
    print(f"merged {fetched} into {into}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for the results ($OUT on the device machine)")
    p.add_argument("--budget", type=float, default=500, help="seconds for all sections (default 500)")
    p.add_argument("--data", help="the CIFAR-10 subset .npz (--make-subset): real images and labels; needed at "
                   "--scale paper (tiny: random images without it, which no method can learn)")
    p.add_argument("--scale", choices=list(SCALES), default="paper", help="paper: the device run; tiny: toy sizes")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any")
    p.add_argument("--large-batch", type=int, default=512, help="the engine's larger batch (paper scale)")
    p.add_argument("--naive-workers", type=int, default=2)
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads with --device cpu (default 1: the "
                   "rehearsal's toy models run faster on one thread than on two shared, oversubscribed cores)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (the CPU rehearsal: "
                   "aot_eager, the same graph capture without Inductor's minutes of code generation)")
    p.add_argument("--make-subset", type=Path, metavar="PATH", help="write the stratified subset and exit")
    p.add_argument("--subset-images", type=int, default=14000)
    p.add_argument("--source", default=os.environ.get(SOURCE_ENV),
                   help=f"the offline CIFAR-10 npz (x_train, y_train) for --make-subset; default ${SOURCE_ENV}")
    p.add_argument("--merge", type=Path, metavar="FILE", help="fold a fetched throughput.json into "
                   "benchmarks/throughput.json and exit")
    args = p.parse_args(argv)
    if args.make_subset and not args.source:
        p.error(f"--make-subset needs --source PATH (the offline CIFAR-10 .npz, e.g. "
                f"cifar10_train50k_test1017_arrays.npz) or ${SOURCE_ENV}")
    if not (args.make_subset or args.merge or args.out):
        p.error("--out is required (or --make-subset / --merge)")
    if args.out and args.scale == "paper" and not args.data:
        p.error("--scale paper needs --data (make it with --make-subset data/gpu_check/cifar10_subset.npz)")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.make_subset:
        print(json.dumps(make_subset(args.make_subset, args.subset_images, args.source)))
        return None
    if args.merge:
        merge(args.merge)
        return None
    start = time.monotonic()
    s, device = SCALES[args.scale], torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    COMPILE_OPTIONS["backend"] = args.compile_backend
    args.out.mkdir(parents=True, exist_ok=True)
    arrays = load_splits(args.data, s)
    results = {"scale": args.scale, "data": args.data or "random images", "naive_workers": args.naive_workers,
               "compile_backend": args.compile_backend,
               "budget_s": args.budget, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:  # run folders stay out of OUT
        root = Path(tmp)
        for name in SECTIONS:
            left = args.budget - (time.monotonic() - start)
            if name not in args.sections:
                continue
            if name != "stamp" and left < NEEDS[name] * (0.05 if args.scale == "tiny" else 1):
                results["sections"][name] = f"skipped: {left:.0f} s of the budget left"
                write(args.out, results, s)
                continue
            t0 = time.monotonic()
            deadline = start + args.budget * ENDS_AT.get(name, 1.0)
            if name in SECTION_BUDGET_S and args.scale == "paper":  # a section's own cap (tiny: the rehearsal runs all)
                deadline = min(deadline, t0 + SECTION_BUDGET_S[name])
            ceiling = results.get("stamp", {}).get("matmul_tflops")
            results[name] = {
                "stamp": lambda: section_stamp(args, s, device, arrays),
                "latency": lambda: section_latency(args, s, device),
                "methods": lambda: section_methods(args, s, device, arrays, root),
                "throughput": lambda: section_throughput(args, s, device, arrays, deadline, ceiling),
                "stacking": lambda: section_stacking(args, s, device, arrays, deadline),
                "cuda_graphs": lambda: section_cuda_graphs(args, s, device, arrays, root, deadline),
                "tf32": lambda: section_tf32(args, s, device, arrays, deadline),
                "compile": lambda: section_compile(args, s, device, arrays, root, deadline),
                "concurrency": lambda: section_concurrency(args, s, device, arrays),
                "slice": lambda: section_slice(args, s, device, arrays, root),
            }[name]()
            results["sections"][name] = f"done in {time.monotonic() - t0:.1f} s"
            write(args.out, results, s)
            print(f"gpu_check: {name} {results['sections'][name]}", flush=True)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

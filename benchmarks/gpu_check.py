"""One command that turns a short GPU window into figures: run it, commit what it writes.

    PYTHONPATH=. python benchmarks/gpu_check.py --data data/gpu_check/cifar10_subset.npz --out $OUT

It needs only torch, torchvision, numpy, scipy, pandas and pyyaml (no mlflow, no dvc, no install:
the checkout and the machine's own torch). Sections run cheapest and most decisive first; after
each one the results so far are written to OUT/gpu_check.json, OUT/gpu_check.md (the table for
benchmarks/RESULTS.md) and OUT/throughput.json (the format `l2l plan` reads), so a kill leaves
everything measured until then. A section that would not fit the remaining --budget is skipped
and says so.

  1 stamp: device, driver, torch, CUDA, cuDNN; the bf16 (CPU: fp32) matmul ceiling, measured here.
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
from l2l.spec import RunSpec  # noqa: E402
from l2l.cost import train_flops_per_image  # noqa: E402
from l2l.device_data import DeviceData  # noqa: E402
from l2l.engine import RunContext, load_checkpoint, train_run  # noqa: E402
from l2l.methods import METHODS  # noqa: E402

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
SCALES = {  # per scale: models, the methods section's model (smoke sizes), images per split, methods-section
    # epochs, timed batches, slice epochs, matmul size, concurrent runs
    "paper": dict(models=PAPER_MODELS, small={"arch": "cnn", "width": 16}, train=12000, val=1000, test=1000,
                  method_images=2048, epochs=2,
                  batch=128, warmup=10, steps=40, slice_epochs=3, matmul=8192, concurrency=[1, 2, 4]),
    "tiny": dict(models=TINY_MODELS, small={"arch": "cnn", "width": 4}, train=256, val=32, test=32,
                 method_images=64, epochs=1, batch=32, compile_models=["cnn"],
                 compile_methods=["l2l_alternating"],  # the rest: tests/test_compile.py
                 warmup=1, steps=2, slice_epochs=1, matmul=256, concurrency=[1, 2]),
}
SECTIONS = ["stamp", "methods", "throughput", "compile", "concurrency", "slice"]
# a rough floor of each section's seconds: skipped when less than this is left of the budget
NEEDS = {"stamp": 5, "methods": 60, "throughput": 60, "compile": 90, "concurrency": 60, "slice": 60}
# the share of the budget by whose end the per-model loops of a section stop (later sections keep theirs)
ENDS_AT = {"throughput": 0.45, "compile": 0.7}


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
    if train_images is not None:
        arrays = {**arrays, "train": tuple(a[:train_images] for a in arrays["train"])}
    return DeviceData(arrays, "cifar10", device, crop_padding=4, flip=True, channels_last=device.type == "cuda")


def spec_for(method: str, cfg: dict, s: dict, epochs: int, options: dict | None = None, **train) -> RunSpec:
    opts = METHODS[method].validate_options(options or {}, f"gpu_check.{method}")
    return RunSpec("gpu_check", method, cfg["arch"], "cifar10", 0, cfg,
                   {**tp.TRAIN, "epochs": epochs, "batch_size": s["batch"], **train}, opts,
                   {"fingerprint": "gpu_check"})


def run(spec: RunSpec, data: DeviceData, device: torch.device, root: Path, name: str, **kw) -> dict:
    ctx = RunContext(spec, data, 10, device, runs=root)
    return train_run(spec, METHODS[spec.method], ctx, root / name, **kw)


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


def section_methods(args, s, device, arrays, root: Path) -> dict:
    data = device_data(arrays, device, s["method_images"])
    out = {}
    teacher = spec_for("conventional", {"arch": "cifar_resnet", "depth": 8, "width": 4}, s, 1)
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
    return {"stamp": st, "data": results["data"], "images": s["train"], "warmup": s["warmup"], "steps": s["steps"],
            "naive_workers": results["naive_workers"], "peak_bf16_tflops": st.get("matmul_tflops"),
            "peak_source": "bf16 matmul measured by benchmarks/gpu_check.py", "models": models,
            "concurrency": conc if "images_per_s" in conc else None, "source": "benchmarks/gpu_check.py"}


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
            if "updates" in r:
                lines.append(f"| {k} | {r['val_acc']:.1f} | {r['train_seconds']:.1f} | {r['images_per_s']:.0f} | "
                             f"{r['updates']} |")
        m = results["methods"]
        lines += ["", f"Resume: largest parameter difference {m['resume']['max_param_diff']:.3g}; same seed twice: "
                  f"{m['same_seed_deterministic_false']['max_param_diff']:.3g} (deterministic off), "
                  f"{m['same_seed_deterministic_true']['max_param_diff']:.3g} (on).", ""]
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
    for label, r in results.get("compile", {}).get("methods", {}).items():
        if "skipped" in r:
            lines.append(f"- compile {label}: skipped ({r['skipped']})")
            continue
        e, c = r["eager"], r["compiled"]
        lines.append(f"- compile {label}: 1 epoch {e['train_seconds']:.1f} s eager, {c['train_seconds']:.1f} s "
                     f"compiled (cold), {c['compile']['graphs']} graphs, {c['compile']['fallbacks_to_eager']} "
                     "fallbacks")
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
    p.add_argument("--data", help="the CIFAR-10 subset .npz (--make-subset); needed at --scale paper "
                   "(tiny: random images without it)")
    p.add_argument("--scale", choices=list(SCALES), default="paper", help="paper: the device run; tiny: toy sizes")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any")
    p.add_argument("--large-batch", type=int, default=512, help="the engine's larger batch (paper scale)")
    p.add_argument("--naive-workers", type=int, default=2)
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
            ceiling = results.get("stamp", {}).get("matmul_tflops")
            results[name] = {
                "stamp": lambda: section_stamp(args, s, device, arrays),
                "methods": lambda: section_methods(args, s, device, arrays, root),
                "throughput": lambda: section_throughput(args, s, device, arrays, deadline, ceiling),
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

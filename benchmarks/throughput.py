"""Training throughput: the harness's engine against a naive PyTorch reference, per model family.

    python benchmarks/throughput.py [--quick] [--device cpu|cuda] [--json benchmarks/throughput.json]

One process, one run: for each model (regular CNN, CIFAR VGG16, CIFAR ResNet-20, P3's layerwise
CNN with its head) it times training images/s (forward + backward + optimizer step, after a
warm-up, synchronised) of

- the engine: prepared uint8 arrays on the device, on-device crop/flip/normalise
  (l2l.device_data), the conventional method's step (bf16 autocast, channels_last and fused SGD on
  CUDA; optionally torch.compile), the engine's own step loop (l2l.engine.step_batches);
- a naive reference: torchvision's CIFAR10 dataset object, a DataLoader with the same augmentation
  as PIL/tensor transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize),
  fp32, default memory format, torch.optim.SGD defaults, no per-batch host sync either.

and prints a table stamped with device, versions and date; on CUDA also achieved TFLOP/s
(torch.utils.flop_counter, forward + backward) as a share of the device's dense bf16 peak, and
(--concurrency) aggregate images/s of 1, 2, 4, 8 runs sharing the GPU as separate processes.
--json stores the figures (per device) for `l2l plan`'s GPU-hour estimates.

The naive dataset: with --cifar-root (a folder holding torchvision's cifar-10-batches-py), the
genuine torchvision loader; otherwise the CIFAR10 object is created without its constructor
(which insists on the original pickles and their MD5s) and given the same arrays as the engine
as its ``.data`` (N, 32, 32, 3) and ``.targets``; its __getitem__ and transforms are torchvision's.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from l2l.cost import train_flops_per_image  # noqa: E402
from l2l.datasets import DATASETS  # noqa: E402
from l2l.devices import peaks  # noqa: E402
from l2l.device_data import DeviceData  # noqa: E402
from l2l.engine import RunContext, device_info, step_batches  # noqa: E402
from l2l.methods import conventional  # noqa: E402
from l2l.models import ARCHS, build_model  # noqa: E402
from l2l.spec import RunSpec, resolve_train  # noqa: E402

log = logging.getLogger("benchmark")

# One model per family the harness trains, at the paper profile's sizes.
MODELS = {
    "cnn": {"arch": "cnn", "width": 64},
    "vgg16": {"arch": "vgg16", "width": 1.0},
    "resnet20": {"arch": "cifar_resnet", "depth": 20},
    # P3's k=2 network with its last head, trained end to end: an upper bound of a layerwise phase's
    # per-image cost (a phase trains one block + head, the earlier blocks forward only).
    "layerwise_k2": {"arch": "layerwise_cnn", "preset": "k2"},
}
# The paper profile's training settings (params.yaml) that affect speed.
TRAIN = resolve_train({"epochs": 1, "batch_size": 128, "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
                       "schedule": {"name": "cosine"}, "augment": {"crop_padding": 4, "flip": True}}, "benchmark.train")
def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 tensor-core peak of the device's data sheet (l2l/devices.py), None if not listed."""
    d = peaks(device_name)
    return None if d is None else d.bf16


# --- data ---------------------------------------------------------------------------------

def load_arrays(args) -> tuple[np.ndarray, np.ndarray, str]:
    """Training images as uint8 NCHW and int64 labels, and where they came from."""
    if args.cifar_root:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(args.cifar_root, train=True, download=False)
        x, y, src = ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets), "torchvision CIFAR10 (--cifar-root)"
    elif args.npz:
        with np.load(args.npz) as z:
            x, y = z["x_train"], z["y_train"]
        x, src = x.reshape(-1, 3, 32, 32), f"npz {Path(args.npz).name}"  # the file, not this machine's path
    else:
        from l2l.data import load_prepared

        arrays, _ = load_prepared(Path(args.prepared))
        (x, y), src = arrays["train"], f"prepared {args.prepared}"
    n = min(len(y), args.images) // args.batch_size * args.batch_size  # whole batches only: one shape
    return np.ascontiguousarray(x[:n]), y[:n].astype(np.int64), src


def naive_dataset(x: np.ndarray, y: np.ndarray, cifar_root: str | None):
    from torchvision import transforms as T
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.vision import VisionDataset

    mean, std = DATASETS["cifar10"].normalization
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    if cifar_root:
        return CIFAR10(cifar_root, train=True, download=False, transform=tf)
    ds = CIFAR10.__new__(CIFAR10)  # see the module docstring
    VisionDataset.__init__(ds, "in-memory", transform=tf)
    ds.train, ds.data, ds.targets = True, x.transpose(0, 2, 3, 1), y.tolist()
    return ds


# --- the two training paths ---------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run, warmup: int, steps: int, device: torch.device) -> float:
    run(warmup)
    _sync(device)
    t0 = time.perf_counter()
    run(steps)
    _sync(device)
    return time.perf_counter() - t0


def engine_runner(cfg: dict, x, y, device: torch.device, batch_size: int, compile_: bool):
    """run(n): n training batches through the engine's step loop."""
    spec = RunSpec("benchmark", "conventional", cfg["arch"], "cifar10", 0, cfg,
                   {**TRAIN, "batch_size": batch_size, "compile": compile_}, {}, {})
    data = DeviceData({"train": (x, y)}, "cifar10", device, crop_padding=4, flip=True,
                      channels_last=device.type == "cuda")
    torch.manual_seed(0)
    phase = next(conventional.phases(spec, RunContext(spec, data, 10, device)))
    batches = itertools.chain.from_iterable(data.train_batches(0, 0, e, batch_size) for e in itertools.count())
    return lambda n: step_batches(phase.step, itertools.islice(batches, n), device)


def naive_runner(cfg: dict, dataset, device: torch.device, batch_size: int, workers: int):
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = build_model(cfg, 10).to(device)
    o = TRAIN["optimizer"]
    opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())

    def run(n: int) -> None:
        for xb, yb in itertools.islice(batches, n):
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


# --- several runs on one GPU ----------------------------------------------------------------

def _concurrent_worker(cfg, x, y, batch_size, warmup, steps, compile_, barrier, results) -> None:
    device = torch.device("cuda")
    run = engine_runner(cfg, x, y, device, batch_size, compile_)
    run(warmup)
    _sync(device)
    barrier.wait()
    t0 = time.monotonic()
    run(steps)
    _sync(device)
    results.put((steps * batch_size, t0, time.monotonic()))


def concurrent_images_per_s(cfg, x, y, k: int, args, compile_: bool) -> float:
    """Aggregate images/s of k engine runs (separate processes) training at once on one GPU."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(cfg, x, y, args.batch_size, args.warmup, args.steps,
                                                          compile_, barrier, results)) for _ in range(k)]
    for p in procs:
        p.start()
    out = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return sum(n for n, _, _ in out) / (max(e for _, _, e in out) - min(s for _, s, _ in out))


# --- the run ------------------------------------------------------------------------------

def stamp(device: torch.device, load_before: float) -> dict:
    import torchvision

    info = device_info(device)
    return {"date": datetime.date.today().isoformat(), "device": info["device"], "device_name": info["device_name"],
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": info["cuda"] if device.type == "cuda" else "not used",
            "cudnn": str(torch.backends.cudnn.version()) if device.type == "cuda" else "none",
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_1min_start": round(load_before, 2),
            "load_average_1min": round(os.getloadavg()[0], 2)}  # other processes on the machine


def measure(args) -> dict:
    load_before = os.getloadavg()[0]
    device = torch.device(args.device)
    x, y, source = load_arrays(args)
    naive_ds = naive_dataset(x, y, args.cifar_root)
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    peak = peak_tflops(device_info(device)["device_name"]) if device.type == "cuda" else None
    rows = {}
    for name in args.models:
        cfg = MODELS[name]
        if cfg["arch"] not in ARCHS:
            log.warning("%s: arch %r is not in this checkout's l2l.models.ARCHS; skipped", name, cfg["arch"])
            continue
        row = {"cfg": cfg, "batch_size": args.batch_size}
        for c in compile_modes:
            key = "engine_compiled_images_per_s" if c else "engine_images_per_s"
            seconds = _timed(engine_runner(cfg, x, y, device, args.batch_size, c), args.warmup, args.steps, device)
            row[key] = args.steps * args.batch_size / seconds
            log.info("%s engine%s: %.1f images/s", name, " compiled" if c else "", row[key])
        seconds = _timed(naive_runner(cfg, naive_ds, device, args.batch_size, args.naive_workers),
                         args.warmup, args.steps, device)
        row["naive_images_per_s"] = args.steps * args.batch_size / seconds
        best = max(row.get("engine_images_per_s") or 0, row.get("engine_compiled_images_per_s") or 0)
        row["ratio"] = best / row["naive_images_per_s"]
        row["train_gflop_per_image"] = train_flops_per_image(cfg, 10, args.batch_size) / 1e9
        row["achieved_tflops"] = best * row["train_gflop_per_image"] / 1e3
        row["share_of_bf16_peak"] = row["achieved_tflops"] / peak if peak else None
        log.info("%s naive: %.1f images/s; ratio %.2f", name, row["naive_images_per_s"], row["ratio"])
        rows[name] = row
    concurrency = {}
    if args.concurrency:
        if device.type != "cuda":
            raise SystemExit("--concurrency measures runs sharing one GPU: it needs --device cuda")
        cfg = MODELS[args.concurrency_model]
        r = rows.get(args.concurrency_model, {})  # each run as the faster engine variant measured above
        compiled = (r.get("engine_compiled_images_per_s") or 0) > (r.get("engine_images_per_s") or 0)
        for k in args.concurrency:
            concurrency[str(k)] = concurrent_images_per_s(cfg, x, y, k, args, compiled)
            log.info("%d concurrent %s runs: %.1f images/s in all", k, args.concurrency_model, concurrency[str(k)])
    return {"stamp": stamp(device, load_before), "data": source, "images": len(y), "warmup": args.warmup,
            "steps": args.steps, "naive_workers": args.naive_workers, "peak_bf16_tflops": peak, "models": rows,
            "concurrency": {"model": args.concurrency_model, "images_per_s": concurrency} if concurrency else None}


def table(result: dict) -> str:
    s = result["stamp"]
    fmt = lambda v, f="{:.0f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = [f"{s['date']} | {s['device_name']} ({s['device']}) | torch {s['torch']}, torchvision {s['torchvision']}, "
             f"CUDA {s['cuda']}, cuDNN {s['cudnn']}, Python {s['python']} | {s['cpu_threads']} CPU threads of "
             f"{s['cpu_count']}, load average {s.get('load_average_1min_start', '?')} -> {s['load_average_1min']} "
             f"| data: {result['data']} "
             f"({result['images']} images) | warm-up {result['warmup']}, timed {result['steps']} batches, "
             f"naive DataLoader workers {result['naive_workers']}",
             "",
             "| model | device | batch | engine img/s | engine+compile img/s | naive img/s | ratio | GFLOP/img "
             "(train) | TFLOP/s | % bf16 peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        share = None if r["share_of_bf16_peak"] is None else 100 * r["share_of_bf16_peak"]
        lines.append(f"| {name} | {s['device']} | {r['batch_size']} | {fmt(r.get('engine_images_per_s'))} | "
                     f"{fmt(r.get('engine_compiled_images_per_s'))} | {fmt(r['naive_images_per_s'])} | "
                     f"{r['ratio']:.2f} | {r['train_gflop_per_image']:.3f} | {r['achieved_tflops']:.3f} | "
                     f"{fmt(share, '{:.1f}')} |")
    if result["concurrency"]:
        c = result["concurrency"]
        lines += ["", f"Concurrent runs of {c['model']} on one GPU (separate processes):", "",
                  "| runs | aggregate img/s |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in c["images_per_s"].items()]
    return "\n".join(lines)


def store(result: dict, path: Path) -> None:
    """Keep one measurement per device in `path` (read by `l2l plan`)."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("about", "Training images/s from benchmarks/throughput.py, one entry per device "
                            "(benchmarks/RESULTS.md). Read by `l2l plan` for its estimates.")
    doc.setdefault("measurements", {})[result["stamp"]["device_name"]] = result
    path.write_text(json.dumps(doc, indent=2) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, help="untimed batches first (default 20; --quick 1)")
    p.add_argument("--steps", type=int, help="timed batches (default 100; --quick 3)")
    p.add_argument("--quick", action="store_true", help="few batches: a CPU run in minutes")
    p.add_argument("--images", type=int, default=50000, help="training images used (at most)")
    p.add_argument("--compile", choices=["off", "on", "both"],
                   help="engine with torch.compile: default both on CUDA, off on CPU (compiling takes minutes there)")
    p.add_argument("--naive-workers", type=int, default=2, help="DataLoader workers of the naive reference "
                   "(2, as PyTorch's CIFAR-10 tutorial)")
    p.add_argument("--concurrency", type=int, nargs="*", help="concurrent runs on one GPU, e.g. 1 2 4 8 (CUDA)")
    p.add_argument("--concurrency-model", default="cnn", choices=list(MODELS))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prepared", default="data/prepared/cifar10", help="the data stage's prepared CIFAR-10")
    src.add_argument("--npz", help="an .npz with x_train (N,3072 or N,3,32,32 uint8) and y_train")
    src.add_argument("--cifar-root", help="a folder with torchvision's cifar-10-batches-py")
    p.add_argument("--json", type=Path, help="store the figures here (e.g. benchmarks/throughput.json)")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else 1 if args.quick else 20
    args.steps = args.steps if args.steps is not None else 3 if args.quick else 100
    args.compile = args.compile or ("both" if args.device.startswith("cuda") else "off")
    return args


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    result = measure(args)
    print(table(result))
    if args.json:
        store(result, args.json)
    return result


if __name__ == "__main__":
    main()

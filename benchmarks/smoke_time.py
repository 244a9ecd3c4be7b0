"""How long the README's smoke run takes, and at what load: the smoke pipeline in a fresh clone of HEAD.

    python benchmarks/smoke_time.py --npz /path/to/cifar10_train50k_test1017_arrays.npz [--keep DIR]

Clones the repository's HEAD into a temporary folder (or DIR), runs the README's command there,
`dvc exp run -S run.yaml:profile=smoke -S 'run.yaml:++data.npz.cifar10=<npz>'`, with this Python
environment (no install) and samples the 1-minute load average every 5 s while it runs. Prints one JSON
object: wall seconds, the load average's min / mean / max over the run, the machine's cores, the runs
trained, and the report's git commit stamp (a fresh clone's must not read -dirty). A shared machine's
load changes the figure many-fold: quote it with its load.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_average() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", type=Path, required=True, help="the offline CIFAR-10 arrays (x_train, y_train)")
    ap.add_argument("--keep", type=Path, help="clone into this new folder and keep it (default: a temporary one)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between load samples")
    args = ap.parse_args(argv)
    if not args.npz.is_file():
        sys.exit(f"smoke_time: {args.npz}: no such file (expected the offline CIFAR-10 .npz)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="l2l-smoke-time-"))
    if args.keep and args.keep.exists():
        sys.exit(f"smoke_time: {args.keep} exists (give a new folder)")
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(work)], check=True)
    env = {**os.environ, "PYTHONPATH": str(work)}
    env.pop("MLFLOW_TRACKING_URI", None)
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(args.interval):
            samples.append(load_average())

    sampler = threading.Thread(target=sample, daemon=True)
    cmd = ["dvc", "exp", "run", "-S", "run.yaml:profile=smoke",
           "-S", f"run.yaml:++data.npz.cifar10={args.npz.resolve()}"]
    samples.append(load_average())
    start = time.monotonic()
    sampler.start()
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    done.set()
    sampler.join()
    if run.returncode != 0:
        sys.exit(f"smoke_time: the smoke run failed (exit {run.returncode}) in {work}:\n{run.stderr[-4000:]}")
    report = (work / "reports/report.md").read_text()
    stamp = re.search(r"git commit `([^`]*)`", report)
    result = {"seconds": round(seconds, 1), "cores": os.cpu_count(),
              "load_1min": {"min": min(samples), "mean": round(sum(samples) / len(samples), 2), "max": max(samples),
                            "samples": len(samples)},
              "runs": len([p for p in (work / "runs").iterdir() if (p / "result.json").exists()]),
              "report_commit": stamp.group(1) if stamp else None,
              "head": subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True,
                                     text=True).stdout.strip(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()

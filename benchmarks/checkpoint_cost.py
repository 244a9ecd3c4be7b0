"""What a resume state costs, per kind of paper-profile run: the size of runs/<hash>/last.pt and the
seconds to write it as the engine does (l2l.engine's resume save: torch.save to a temporary file,
its sha256, rename, the sidecar), for the largest state each run kind holds (its last phase: P4's
last generation holds every earlier one; layerwise its heads).

    PYTHONPATH=. python benchmarks/checkpoint_cost.py [--repeats 3] [--json FILE]

The basis of executor.checkpoint_min_seconds (params.yaml, benchmarks/RESULTS.md): a GPU epoch of a
small ResNet takes seconds, so a state per epoch can cost a run a large share of its time. On a GPU
the state is first copied to the host (gpu_check's cuda_graphs section times that too); here it is
on the CPU already, so these are the write's seconds alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from l2l import engine  # noqa: E402
from l2l.config import load_params, plan, resolve_config  # noqa: E402
from l2l.datasets import DATASETS  # noqa: E402
from l2l.device_data import DeviceData  # noqa: E402
from l2l.methods import METHODS  # noqa: E402
from l2l.pruning import count_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def kinds(params: dict) -> dict[str, object]:
    """One run per (method, model) of the paper profile (seed 0, its first dataset)."""
    out = {}
    for spec in plan(resolve_config(params, "paper")):
        out.setdefault(f"{spec.experiment}/{spec.model}", spec)
    return out


def last_phase_state(spec) -> tuple[dict, int]:
    """(the resume state of the run's last phase, as the engine saves it; its parameter count)."""
    k = DATASETS[spec.dataset].num_classes
    size = spec.data.get("image_size") or 32
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (8, 3, size, size), dtype=np.uint8),
                  rng.integers(0, k, 8) if DATASETS[spec.dataset].task == "single-label"
                  else rng.integers(-1, 2, (8, k))) for s in ("train", "val", "test")}
    data = DeviceData(arrays, spec.dataset, torch.device("cpu"), crop_padding=0, flip=False)
    ctx = engine.RunContext(spec, data, k, torch.device("cpu"))
    torch.manual_seed(0)
    phase = None
    for phase in METHODS[spec.method].phases(spec, ctx):
        pass
    for opt in phase.optimizers.values():  # momentum for every trained parameter, as after the first step
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    state = {"phase": 0, "epoch": 0, "state": engine._phase_state(phase), "rng": engine._rng_state(ctx.device),
             "history": [{"train_loss": 0.0}] * spec.train["epochs"], "best": {},
             "best_state": engine._cpu_copy(phase.predictor.state_dict()), "phase_metrics": {}}
    params = sum(count_parameters(m) for m in phase.modules.values())
    return state, params


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in kinds(load_params(REPO / "params.yaml")).items():
            state, params = last_phase_state(spec)
            secs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                engine._save_resume(state, Path(tmp))
                secs.append(time.perf_counter() - t0)
            rows[name] = {"params": params, "mib": (Path(tmp) / engine.LAST).stat().st_size / 2 ** 20,
                          "seconds_median": statistics.median(secs), "seconds_min": min(secs)}
            print(f"{name:50s} {params / 1e6:7.2f} M params {rows[name]['mib']:7.1f} MiB  "
                  f"save {rows[name]['seconds_median']:.3f} s (min {rows[name]['seconds_min']:.3f})", flush=True)
    out = {"torch": torch.__version__, "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
           "repeats": args.repeats, "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()

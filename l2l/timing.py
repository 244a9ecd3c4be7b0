"""A run's wall time on one device, calibrated from measured runs (result.json `run_seconds`):

    seconds = run_s + epoch_s * epochs + image_s * images + gflop_s * GFLOPs

fitted by non-negative least squares (scipy.optimize.nnls): a fixed cost per run (building the
model, checkpoints, a method's own measurements), per epoch (validation set-up, the resume state),
per image (a floor the FLOPs do not explain: augmentation, per-batch launches; what makes tiny
models slower than their FLOPs say) and per GFLOP of the method's real step. Features of a run come
from l2l.cost (epochs, training + validation images, FLOPs of every phase's step). On a CPU the
figures hold at the load they were measured under (recorded beside them). benchmarks/run_timing.json
holds committed calibrations per device (benchmarks/run_timing.py writes them from a runs folder).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from l2l.io import read_json, write_json

TIMING_FILE = Path("benchmarks/run_timing.json")
TERMS = ("run_s", "epoch_s", "image_s", "gflop_s")


@dataclass(frozen=True)
class Timing:
    device_name: str
    run_s: float
    epoch_s: float
    image_s: float
    gflop_s: float
    runs: int  # measured runs it was fitted on
    source: str  # where they came from
    load_average: float | None = None  # the machine's 1-minute load while the runs trained, if known

    def seconds(self, epochs: float, images: float, gflops: float) -> float:
        return self.run_s + self.epoch_s * epochs + self.image_s * images + self.gflop_s * gflops

    @property
    def label(self) -> str:
        load = "" if self.load_average is None else f", load {self.load_average:.1f}"
        return (f"{self.device_name}: {self.run_s:.2f} s/run + {self.epoch_s:.3f} s/epoch + {1e3 * self.image_s:.3f} "
                f"ms/image + {self.gflop_s:.4f} s/GFLOP, fitted on {self.runs} runs ({self.source}{load})")


def fit_timing(features: list[tuple[float, float, float]], seconds: list[float], device_name: str,
               source: str, load_average: float | None = None) -> Timing:
    """The non-negative fit of measured runs' seconds on (epochs, images, GFLOPs) with a constant."""
    x = np.array([[1.0, *f] for f in features])
    scale = np.maximum(x.max(axis=0), 1e-12)  # columns of similar size for the solver
    coef, _ = nnls(x / scale, np.asarray(seconds, float))
    return Timing(device_name, *(float(c) for c in coef / scale), runs=len(seconds), source=source,
                  load_average=load_average)


def load_timing(device_name: str, path: Path = TIMING_FILE) -> Timing | None:
    if not Path(path).exists():
        return None
    entry = read_json(path).get(device_name)
    return None if entry is None else Timing(**entry)


def save_timing(timing: Timing, path: Path = TIMING_FILE) -> None:
    doc = read_json(path) if Path(path).exists() else {}
    write_json(path, {**doc, timing.device_name: asdict(timing)})

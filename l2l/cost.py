"""The cost of a profile: its runs per experiment/model/dataset and per claim, which are done,
and the remaining device-hours estimated from measured training throughput.

Throughput comes from benchmarks/throughput.json (benchmarks/throughput.py, one measurement per
device). A run's cost is its training images (every epoch of every phase of its method) at the
engine's measured images/s for its model plus its evaluation images (validation every epoch, the
evaluate stage's val and test passes of two checkpoints) at EVAL_SPEEDUP times that. A phase
epoch is priced as one training pass of the run's model: frozen parts (layerwise) cost less,
a second network (a teacher, a layer-to-layer partner) more. A model the benchmark did not measure is scaled by
FLOPs from the measured model of its architecture (or the median of all measured ones), and so is
every model on images larger than CIFAR's 32x32 (Pascal VOC at data.voc2007.image_size). These
are estimates from a named measurement, never measurements themselves.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from l2l.checks import ConfigError
from l2l.config import Config, plan
from l2l.datasets import DATASETS, MULTI_LABEL
from l2l.device_data import DeviceData
from l2l.engine import RunContext
from l2l.io import read_json
from l2l.methods import METHODS
from l2l.models import build_model, with_defaults
from l2l.spec import RunSpec

THROUGHPUT_FILE = Path("benchmarks/throughput.json")
SOURCE_TRAIN_IMAGES = 50000  # CIFAR-10/100 training sets
OFFICIAL_TEST_IMAGES = 10000
VOC_TRAINVAL_IMAGES, VOC_TEST_IMAGES = 5011, 4952  # Pascal VOC 2007
# A forward pass is about a third of a training step's FLOPs (the backward pass costs about twice
# the forward): evaluation images go about 3x as fast as training images.
EVAL_SPEEDUP = 3.0


def train_flops_per_image(model_cfg: dict, num_classes: int = 10, batch_size: int = 128, image_size: int = 32
                          ) -> float:
    """Forward + backward FLOPs of one training image (torch.utils.flop_counter on the meta
    device: shapes only, no compute)."""
    model = build_model(model_cfg, num_classes).to("meta")
    x = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch_size


# --- throughput -------------------------------------------------------------------------

@dataclass
class Throughput:
    """One device's measurement from benchmarks/throughput.json."""

    device_name: str
    device: str
    date: str
    steps: int
    models: dict  # name -> {cfg, engine_images_per_s, engine_compiled_images_per_s, train_gflop_per_image, ...}
    others: list[str] = field(default_factory=list)  # the other devices measured

    @property
    def label(self) -> str:
        return f"{self.device_name} ({self.device}), measured {self.date}, {self.steps} timed batches per model"

    def images_per_s(self, name: str) -> float:
        r = self.models[name]
        return max(r.get("engine_images_per_s") or 0.0, r.get("engine_compiled_images_per_s") or 0.0)

    def rate(self, model_cfg: dict, flops: dict, image_size: int = 32) -> tuple[float, str]:
        """(training images/s for this model on image_size x image_size images, how it was obtained);
        the benchmark measures 32x32 CIFAR images."""
        for name, r in self.models.items():
            if with_defaults(r["cfg"]) == with_defaults(model_cfg) and image_size == 32:
                return self.images_per_s(name), f"measured ({name})"
        key = json.dumps([model_cfg, image_size], sort_keys=True)
        if key not in flops:
            flops[key] = train_flops_per_image(model_cfg, image_size=image_size) / 1e9
        gflop = flops[key]
        at = "" if image_size == 32 else f" to {image_size}x{image_size}"
        same_arch = [n for n, r in self.models.items() if r["cfg"]["arch"] == model_cfg["arch"]]
        if same_arch:
            n = same_arch[0]
            return (self.images_per_s(n) * self.models[n]["train_gflop_per_image"] / gflop,
                    f"FLOPs-scaled from {n}{at}")
        flop_rate = statistics.median(self.images_per_s(n) * r["train_gflop_per_image"] for n, r in self.models.items())
        return flop_rate / gflop, f"FLOPs-scaled (median of measured models){at}"


def load_throughput(path: Path = THROUGHPUT_FILE, device: str | None = None) -> Throughput | None:
    """The measurement for `device` (a part of its name), else a GPU's, else any; None if no file."""
    if not Path(path).exists():
        return None
    measurements = json.loads(Path(path).read_text()).get("measurements", {})
    if device is not None:
        names = [n for n in measurements if device.lower() in n.lower()]
        if not names:
            raise ConfigError(f"{path}: no measurement for device {device!r} (measured: {', '.join(measurements)})")
    else:
        names = sorted(measurements, key=lambda n: measurements[n]["stamp"]["device"] != "cuda")
    if not names:
        return None
    m = measurements[names[0]]
    return Throughput(names[0], m["stamp"]["device"], m["stamp"]["date"], m["steps"], m["models"],
                      [n for n in measurements if n != names[0]])


# --- the plan's runs --------------------------------------------------------------------

@dataclass
class RunCost:
    spec: RunSpec
    done: bool
    epochs: int
    hours: float | None  # None without a throughput measurement
    basis: str


def _prepared(config: Config) -> tuple[dict, dict, list[str]]:
    """Per dataset: the prepared manifest when it was prepared for this profile's split."""
    prof, profile = config.profile, config.profile.name
    split = config.data.split_config(prof.split)
    want = {"val_size": split.val_size, "test_size": split.test_size, "train_subset": split.train_subset,
            "seed": split.seed}
    voc = config.data.voc2007
    want_voc = {"val_size": voc["val_size"], "seed": split.seed}
    manifests, notes = {}, []
    for ds in prof.datasets:
        path = config.data.prepared_dir(ds) / "manifest.json"
        m = read_json(path) if path.exists() else None
        if DATASETS[ds].task == MULTI_LABEL:
            ok = m is not None and m.get("split") == want_voc and m.get("image_size") == voc["image_size"]
        else:
            ok = m is not None and m.get("split") == want
        if ok:
            manifests[ds] = m
        else:
            notes.append(f"{ds}: not prepared for profile {profile} (run the data stage): its runs' identities "
                         f"are unknown, so none counts as done; sizes assume the official test set")
    return prof.split, manifests, notes


def split_counts(split: dict, manifest: dict | None, dataset: str = "cifar10", voc_val_size: int = 500
                 ) -> dict[str, int]:
    if manifest is not None:
        return {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")}
    if DATASETS[dataset].task == MULTI_LABEL:
        return {"train": VOC_TRAINVAL_IMAGES - voc_val_size, "val": voc_val_size, "test": VOC_TEST_IMAGES}
    train = SOURCE_TRAIN_IMAGES - split["val_size"]
    if split.get("train_subset"):
        train = min(train, split["train_subset"])
    return {"train": train, "val": split["val_size"], "test": OFFICIAL_TEST_IMAGES}


_EPOCHS: dict[str, int] = {}


def planned_epochs(spec: RunSpec) -> int:
    """Passes over the training set, summed over the method's phases (one stretch per block,
    per generation, ...): its phase generator replayed without training, as a resumed run
    replays it, on a few random images on the CPU (models are built, nothing is trained)."""
    key = json.dumps([spec.method, spec.model_cfg, spec.train, spec.options, spec.dataset], sort_keys=True)
    if key not in _EPOCHS:
        k = DATASETS[spec.dataset].num_classes
        rng = np.random.default_rng(0)
        arrays = {s: (rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8), np.arange(8) % k)
                  for s in ("train", "val", "test")}
        cpu = torch.device("cpu")
        aug = spec.train["augment"]
        ctx = RunContext(spec, DeviceData(arrays, spec.dataset, cpu, crop_padding=aug["crop_padding"],
                                          flip=aug["flip"]), k, cpu)
        _EPOCHS[key] = sum(phase.epochs for phase in METHODS[spec.method].phases(spec, ctx))
    return _EPOCHS[key]


def run_costs(config: Config, throughput: Throughput | None, runs_dir: Path = Path("runs")
              ) -> tuple[list[RunCost], list[str]]:
    split, manifests, notes = _prepared(config)
    specs = plan(config, {ds: m["fingerprint"] for ds, m in manifests.items()})
    flops: dict = {}
    out = []
    for s in specs:
        n = split_counts(split, manifests.get(s.dataset), s.dataset, s.data.get("val_size", 0))
        epochs = planned_epochs(s)
        hours, basis = None, "no throughput measurement"
        if throughput is not None:
            rate, basis = throughput.rate(s.model_cfg, flops, s.data.get("image_size", 32))
            images = epochs * n["train"] + (epochs * n["val"] + 2 * (n["val"] + n["test"])) / EVAL_SPEEDUP
            hours = images / rate / 3600
        done = s.dataset in manifests and (runs_dir / s.hash / "result.json").exists()
        out.append(RunCost(s, done, epochs, hours, basis))
    return out, notes

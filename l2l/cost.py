"""The cost of a profile: its runs per experiment/model/dataset and per claim, which are done,
and the remaining device-hours estimated from measured training throughput.

Throughput comes from benchmarks/throughput.json (benchmarks/gpu_check.py or
benchmarks/throughput.py, one measurement per device; a GPU's is used when there is one): the
engine's measured images/s of a conventional training step per model. A run is priced by its
method's real step: every phase's step is run once on the meta device (shapes only, no compute)
under the FLOP counter (l2l.profiling, grouped convolutions counted correctly), so a distilled
student's step includes its teacher's forward, layer-to-layer its two updates per batch, a
layerwise stage its frozen prefix's forward only, a generation its teacher's forward. A phase
epoch then costs (its step's FLOPs / the model's conventional step FLOPs) conventional training
passes at the measured rate; evaluation images (validation every epoch, the evaluate stage's val
and test passes of two checkpoints) go at EVAL_SPEEDUP times that rate. A model the benchmark did
not measure is scaled by FLOPs from the measured model of its architecture (or the median of all
measured ones), and so is every model on images larger than CIFAR's 32x32 (Pascal VOC at
data.voc2007.image_size). Each row names its basis ("measured (name)" or "FLOPs-scaled ...") and
its step factor. These are estimates from a named measurement, never measurements themselves;
they assume the achieved FLOP/s of a method's step equals that of the conventional step of the
same model (a launch-bound small part, e.g. a head, runs at a lower rate).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from l2l.checks import ConfigError
from l2l.config import Config, plan
from l2l.datasets import DATASETS, MULTI_LABEL, val_joins_train
from l2l.device_data import DeviceData
from l2l.engine import device_info, pick_device
from l2l.io import read_json, write_json
from l2l.methods import METHODS
from l2l.models import build_model, with_defaults
from l2l.devices import DevicePeaks, peaks
from l2l.modes import SEPARATE, THROUGHPUT_FILE, Mode, assign, family_modes, stack_refusal
from l2l.modes import parse as parse_mode
from l2l.profiling import StepCounter
from l2l.spec import RunSpec
from l2l.stacking import MemberContext, Recorder, StackedPhase, seed_group
from l2l.timing import TIMING_FILE, Timing, load_timing

# A forward pass is about a third of a training step's FLOPs (the backward pass costs about twice
# the forward): evaluation images go about 3x as fast as training images.
EVAL_SPEEDUP = 3.0


def train_flops_per_image(model_cfg: dict, num_classes: int = 10, batch_size: int = 128, image_size: int = 32
                          ) -> float:
    """Forward + backward FLOPs of one conventional training image (l2l.profiling's counter on the
    meta device: shapes only, no compute)."""
    return model_counts(model_cfg, num_classes, batch_size, image_size)[0]


def model_counts(model_cfg: dict, num_classes: int = 10, batch_size: int = 128, image_size: int = 32
                 ) -> tuple[float, int, int, int]:
    """(training FLOPs per image, kernel launches of a conventional training step (fused SGD's
    included), launches of one forward pass in eval mode, parameters) of a model, counted on the meta
    device (l2l.profiling.StepCounter) and cached."""
    key = json.dumps([model_cfg, num_classes, batch_size, image_size], sort_keys=True)
    _load_cache()
    if key not in _TRAIN_FLOPS:
        _TRAIN_FLOPS[key] = _model_counts(model_cfg, num_classes, batch_size, image_size)
    return tuple(_TRAIN_FLOPS[key])


def _model_counts(model_cfg: dict, num_classes: int, batch_size: int, image_size: int) -> list:
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes)
    x = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long, device="meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with StepCounter() as train:
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with StepCounter() as forward, torch.no_grad():
        model(x)
    return [train.flops / batch_size, train.launches, forward.launches, sum(p.numel() for p in model.parameters())]


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
    modes: dict = field(default_factory=dict)  # profile model name -> {mode name: Mode} (l2l/modes.py)

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


    def mode_rate(self, mode: Mode, measured: str, measured_cfg: dict, model_cfg: dict, image_size: int = 32
                  ) -> tuple[float, str]:
        """(aggregate training images/s of a run executing in a measured `mode` of the model `measured`,
        how it was obtained): as measured for the same model at 32x32, else FLOPs-scaled."""
        if with_defaults(measured_cfg) == with_defaults(model_cfg) and image_size == 32:
            return mode.images_per_s, f"measured {mode.name} ({measured})"
        scale = train_flops_per_image(measured_cfg) / train_flops_per_image(model_cfg, image_size=image_size)
        at = "" if image_size == 32 else f" to {image_size}x{image_size}"
        return mode.images_per_s * scale, f"{mode.name} FLOPs-scaled from {measured}{at}"


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
                      [n for n in measurements if n != names[0]],
                      {model: {name: parse_mode(name, f) for name, f in modes.items()}
                       for model, modes in (m.get("modes") or {}).items()})


# --- a GPU nobody measured: an estimate from its data sheet ----------------------------------------

# The assumptions, each printed with the estimate. Issue #21's figures: a ResNet step's device work "at 30%
# of bf16 peak" and "4-8 us per launch" in eager PyTorch (launches counted per step on a CPU: ResNet-20
# ~266 with the CPU's SGD, 177 + fused SGD here; the ResNets of P4/P5 are launch-bound, not FLOPs-bound).
SHARE_OF_PEAK = 0.30
LAUNCH_US = 6.0
# A stacked step's host time per kernel launch against a separate step's: vmap's batching layer and the
# stacked layout's Python (l2l/stacking.py), measured at host-bound sizes by benchmarks/stacking.py: at K=8,
# with the layout found once per phase, 1.71 (ResNet-20) and 1.90 (ResNet-110); benchmarks/RESULTS.md.
STACKED_HOST_FACTOR = 1.9
STACK_SIZES = (2, 4, 8, 16)  # the stacks the GPU check measures (benchmarks/gpu_check.py)


@dataclass(frozen=True)
class DeviceEstimate:
    """A GPU priced from its data sheet, never measured: each step takes the longer of its FLOPs at
    `share` of the dense peak of the run's precision and its kernel launches at `launch_us` each (the
    launch floor); a stack of K runs (l2l/stacking.py) takes one stacked step for all of them (its own
    launches, K times the FLOPs), so stacking lowers the floor per run."""

    sheet: DevicePeaks
    share: float = SHARE_OF_PEAK
    launch_us: float = LAUNCH_US
    stacked_host: float = STACKED_HOST_FACTOR

    def peak(self, train: dict) -> float:
        """Dense TFLOP/s of the run's precision: bf16 autocast (precision auto, bf16), FP32 (precision
        fp32; TF32 where train.tf32 allows it)."""
        if train["precision"] == "fp32":
            return self.sheet.tf32 if train.get("tf32", False) else self.sheet.fp32
        return self.sheet.bf16

    def step_seconds(self, flops_per_image: float, batch: int, launches: float, peak: float, members: int = 1
                     ) -> float:
        """One step of `members` stacked runs (1: a separate run): its FLOPs or its launches, the longer."""
        per_launch = self.launch_us * 1e-6 * (self.stacked_host if members > 1 else 1.0)
        return max(members * flops_per_image * batch / (self.share * peak * 1e12), launches * per_launch)

    def run_seconds(self, spec: RunSpec, n: dict[str, int], members: int = 1) -> float:
        """Device seconds of one run (with `members` > 1 its share of its stack's): every phase's training
        steps, each epoch's validation and the evaluate stage's passes over two checkpoints."""
        conv, conv_launches, fwd_launches, _ = model_counts(spec.model_cfg, _classes(spec), spec.train["batch_size"],
                                                            spec.data.get("image_size", 32))
        peak, b, eb = self.peak(spec.train), spec.train["batch_size"], spec.train["eval_batch_size"]
        steps, phases = math.ceil(n["train"] / b), phase_costs(spec)
        train = 0.0
        for p in phases:
            launches = p.stacked_launches if members > 1 else p.launches
            train += p.epochs * steps * self.step_seconds(
                p.step_flops if p.step_flops is not None else conv, b, launches if launches is not None else
                conv_launches, peak, members) / members
        epochs = sum(p.epochs for p in phases)
        batches = epochs * math.ceil(n["val"] / eb) + 2 * (math.ceil(n["val"] / eb) + math.ceil(n["test"] / eb))
        # evaluation is each run's own (a stacked run validates alone): a batch's forward at 1/EVAL_SPEEDUP
        # of a training image's FLOPs, or its forward launches
        return train + batches * self.step_seconds(conv / EVAL_SPEEDUP, eb, fwd_launches, peak)

    def assumptions(self) -> list[str]:
        d = self.sheet
        return [f"dense peaks of the {d.name} data sheet (l2l/devices.py): bf16 {d.bf16:g} TFLOP/s (precision "
                f"auto/bf16: bf16 autocast), FP32 {d.fp32:g} (precision fp32 with train.tf32 off; TF32 {d.tf32:g} "
                "with it on)",
                f"a step's device work runs at {100 * self.share:.0f}% of that peak (--share)",
                f"a step takes at least its kernel launches x {self.launch_us:g} us (--launch-us): launches counted "
                "per step on the meta device (l2l.profiling.StepCounter, the run's first step; benchmarks/stacking.py "
                "counts them per model; issue #21's torch.profiler count 173 for a ResNet-20 step)",
                "a stack of K runs (executor.stack_seeds, l2l/stacking.py) takes one stacked step: its own launches "
                "(counted the same way, about as many as one run's for any K) at "
                f"{self.stacked_host:g}x the host time each "
                "(vmap's, measured by benchmarks/stacking.py), and K times the FLOPs",
                "validation every epoch and the evaluate stage's passes over two checkpoints, per run: forward "
                "FLOPs (a third of a training image's) or forward launches per batch of eval_batch_size",
                "not included: data preparation, process and CUDA start-up, cuDNN autotuning, checkpoint writes, "
                "MLflow, phase-end measures (linear probes, pruning, latency)"]


def device_estimate(device: str, share: float = SHARE_OF_PEAK, launch_us: float = LAUNCH_US
                    ) -> DeviceEstimate | None:
    """The estimate of a GPU listed in l2l/devices.py by a part of its name (None: not listed)."""
    sheet = peaks(device)
    return None if sheet is None else DeviceEstimate(sheet, share, launch_us)


# --- the plan's runs --------------------------------------------------------------------

@dataclass
class RunCost:
    spec: RunSpec
    done: bool
    epochs: int
    hours: float | None  # None without a throughput measurement or calibration
    basis: str
    features: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (epochs, images, GFLOPs) in the train stage
    measured_s: float | None = None  # a finished run's result.json run_seconds
    device_name: str | None = None  # where it was measured
    mode: str = "separate"  # how it executes (l2l/modes.py): its hours are under it
    stacked: tuple[str, float] | None = None  # an estimate's fastest stacking (mode, hours), where the method stacks


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


def split_counts(split: dict, manifest: dict | None, dataset: str, voc_val_size: int) -> dict[str, int]:
    """Images per split of a run: the prepared manifest's counts, else the sizes the settings imply."""
    if manifest is not None:
        return {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")}
    if DATASETS[dataset].task == MULTI_LABEL:
        d = DATASETS[dataset]
        return {"train": d.train_images - voc_val_size, "val": voc_val_size, "test": d.test_images}
    train = DATASETS[dataset].train_images - split["val_size"]
    if split.get("train_subset"):
        train = min(train, split["train_subset"])
    return {"train": train, "val": split["val_size"], "test": DATASETS[dataset].test_images}


@dataclass
class PhaseCost:
    epochs: int
    step_flops: float | None  # per training image, the phase's real step; None: not countable on meta
    note: str = ""
    launches: float | None = None  # GPU kernel launches of one step (l2l.profiling.StepCounter)
    stacked_launches: float | None = None  # of one stacked step of any number of runs (l2l/stacking.py);
    # None where the method does not stack


_PHASES: dict[str, list[PhaseCost]] = {}
_STACKED: dict[str, int | None] = {}
_TRAIN_FLOPS: dict[str, list] = {}  # model_counts
_CACHE_LOADED: list[bool] = []


def _code_version() -> str:
    """sha256 of this checkout's l2l sources and torch's version: what a step's counts depend on."""
    h = hashlib.sha256(torch.__version__.encode())
    for f in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cache_file() -> Path:
    # beside the user's other caches, never in the repository (DVC and git would see it); one file per code version
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "l2l-bench" / f"phase_costs-{_code_version()}.json"


def _load_cache() -> None:
    """The step counts of earlier `l2l plan`s of this code (a paper plan counts ~250 steps: ~30 s on 2 cores)."""
    if _CACHE_LOADED:
        return
    _CACHE_LOADED.append(True)
    try:
        doc = json.loads(_cache_file().read_text())
        for key, phases in doc["phases"].items():
            _PHASES.setdefault(key, [PhaseCost(**p) for p in phases])
        for key, v in doc["models"].items():
            _TRAIN_FLOPS.setdefault(key, list(v))
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no cache (first plan of this code), or an unreadable one: counted again


def _save_cache() -> None:
    try:
        write_json(_cache_file(), {"phases": {k: [dataclasses.asdict(p) for p in v] for k, v in _PHASES.items()},
                                   "models": _TRAIN_FLOPS})
    except (OSError, ValueError):
        pass  # a read-only home: nothing cached
# epochs at which a phase's step is counted (its epoch hook may change it: l2l's moving split): the
# first and the last; where they differ, the quarters too. (A meta step runs through torch's Python
# decompositions: about 1.4 s for a ResNeXt l2l step, so each count matters for `l2l plan`.)
ENDS, QUARTERS = (0.0, 1.0), (0.25, 0.5, 0.75)


def phase_costs(spec: RunSpec) -> list[PhaseCost]:
    """Per phase of the run's method: its epochs, its step's FLOPs per training image and kernel
    launches, and (a method that stacks, l2l/stacking.py) the launches of its stacked step. The phase
    generator is replayed without training, as a resumed run replays it: models are built on the
    meta device (shapes only) over a few random CPU images; each phase's step is run on one meta batch
    under l2l.profiling.StepCounter at a few epochs (after the phase's epoch hook, e.g. l2l's split
    move, where the hook can run without data or other runs' checkpoints), the stacked step once."""
    # a required run enters by its model only (its hash differs per seed; its FLOPs do not)
    options = {k: v["model_cfg"] if k.endswith("_run") and isinstance(v, dict) else v for k, v in spec.options.items()}
    key = json.dumps([spec.method, spec.model_cfg, spec.train, options, spec.dataset,
                      spec.data.get("image_size", 32)], sort_keys=True)
    _load_cache()
    if key in _PHASES:
        return _PHASES[key]
    k = DATASETS[spec.dataset].num_classes
    size = spec.data.get("image_size", 32)
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (8, 3, size, size), dtype=np.uint8), np.arange(8) % k)
              for s in ("train", "val", "test")}
    plain = dataclasses.replace(spec, train={**spec.train, "compile": False, "deterministic": False})
    meta = torch.device("meta")
    # runs=os.devnull: no run folder, so a method reading another run's checkpoint (distill) cannot
    aug = spec.train["augment"]
    data = DeviceData(arrays, spec.dataset, torch.device("cpu"), crop_padding=aug["crop_padding"], flip=aug["flip"])
    # a member's context: its step's update goes to `recorder` while a stacked step is counted, else it is made
    recorder = Recorder([plain])
    ctx = MemberContext(plain, data, k, meta, runs=Path(os.devnull), stack=recorder, member=0)
    stacks = METHODS[spec.method].stackable(spec.options) is None
    b = spec.train["batch_size"]
    x = torch.empty(b, 3, size, size, device=meta)
    y = (torch.zeros(b, k, device=meta) if ctx.task.kind == MULTI_LABEL
         else torch.zeros(b, dtype=torch.long, device=meta))
    out = []
    phases = iter(METHODS[spec.method].phases(plain, ctx))
    while True:
        with torch.device(meta):  # the phase's models are built on it: no initialisation computed
            phase = next(phases, None)
        if phase is None:
            break
        if phase.step is None:
            out.append(PhaseCost(phase.epochs, None, "no step"))
            continue
        counts, notes = [], set()
        fractions = ENDS if phase.on_epoch_start is not None else (0.0,)
        for rest in (False, True):
            for e in sorted({round(f * (phase.epochs - 1)) for f in (QUARTERS if rest else fractions)}):
                count = _count_step(phase, e, x, y, notes)
                if count is None:
                    break
                counts.append(count)
            if rest or len(set(counts)) <= 1:
                break
        stacked = None
        if stacks and counts:
            # a step of the same method, model and counts (a later generation's) stacks the same: counted once
            same = json.dumps([spec.method, spec.model_cfg, k, size, b, counts], sort_keys=True)
            if same not in _STACKED:
                _STACKED[same] = _count_stacked_step(phase, recorder, x, y, notes)
            stacked = _STACKED[same]
        out.append(PhaseCost(phase.epochs, sum(c[0] for c in counts) / len(counts) if counts else None,
                             "; ".join(sorted(notes)), sum(c[1] for c in counts) / len(counts) if counts else None,
                             stacked))
    _PHASES[key] = out
    return out


def _count_step(phase, epoch: int, x, y, notes: set) -> tuple[float, int] | None:
    """(FLOPs per image, kernel launches) of one step of `phase` at `epoch` (after its epoch hook, where it can run)."""
    if phase.on_epoch_start is not None:
        try:
            phase.on_epoch_start(epoch)
        except (RuntimeError, NotImplementedError, OSError) as err:
            notes.add(f"epoch hook skipped ({type(err).__name__})")
    try:
        with StepCounter() as counter:
            phase.step(x, y)
    except (RuntimeError, NotImplementedError) as err:
        notes.add(f"step not countable on meta ({type(err).__name__})")
        return None
    return counter.flops / len(x), counter.launches


def _count_stacked_step(phase, recorder: Recorder, x, y, notes: set) -> int | None:
    """Kernel launches of the phase's stacked step (l2l/stacking.py), counted with two members: the count
    does not depend on their number (vmap batches every op; tests/test_plan.py checks 2 against 8)."""
    try:
        stacked = StackedPhase([phase, phase], recorder)
        with StepCounter() as counter:
            stacked.step(torch.stack([x, x]), torch.stack([y, y]))
    except (RuntimeError, NotImplementedError) as err:
        notes.add(f"stacked step not countable on meta ({type(err).__name__})")
        return None
    return counter.launches


def planned_epochs(spec: RunSpec) -> int:
    """Passes over the training set, summed over the method's phases (one stretch per block,
    per generation, ...)."""
    return sum(p.epochs for p in phase_costs(spec))


def step_factor(spec: RunSpec, flops: dict) -> tuple[float, str]:
    """(training cost of the run's phases in conventional-step epochs / its epochs, a note): 1 for
    conventional training, ~2x for l2l, < 1 for layerwise stages, > 1 with a teacher's forward."""
    conventional = _conventional(spec, flops)
    phases = phase_costs(spec)
    notes = sorted({p.note for p in phases if p.note} |
                   ({"a phase priced as a conventional step"} if any(p.step_flops is None for p in phases) else set()))
    cost = sum(p.epochs * (p.step_flops if p.step_flops is not None else conventional) for p in phases)
    return cost / max(sum(p.epochs for p in phases), 1) / conventional, "; ".join(notes)


def _classes(spec: RunSpec) -> int:
    return DATASETS[spec.dataset].num_classes


def _conventional(spec: RunSpec, flops: dict) -> float:
    """FLOPs per image of the run's model's conventional training step."""
    key = json.dumps([spec.model_cfg, spec.data.get("image_size", 32), _classes(spec)], sort_keys=True)
    if key not in flops:
        flops[key] = train_flops_per_image(spec.model_cfg, _classes(spec), spec.train["batch_size"],
                                           spec.data.get("image_size", 32))
    return flops[key]


def run_features(spec: RunSpec, n: dict[str, int], flops: dict) -> tuple[float, float, float]:
    """(epochs, images, GFLOPs) of a run in the train stage, what l2l.timing prices: every phase's
    training images at its step's FLOPs, and each epoch's validation pass (a forward pass:
    1/EVAL_SPEEDUP of a training image)."""
    conventional = _conventional(spec, flops)
    phases = phase_costs(spec)
    epochs = sum(p.epochs for p in phases)
    train = sum(p.epochs * (p.step_flops if p.step_flops is not None else conventional) for p in phases)
    return (float(epochs), epochs * (n["train"] + n["val"] / EVAL_SPEEDUP),
            (train * n["train"] + epochs * n["val"] * conventional / EVAL_SPEEDUP) / 1e9)


def pick_timing(device: str | None = None, path: Path = TIMING_FILE) -> Timing | None:
    """The committed calibration of `device` (a part of its name), else of the machine this runs on."""
    if not Path(path).exists():
        return None
    names = list(read_json(path))
    if device is None:
        local = device_info(pick_device())["device_name"]
        return load_timing(local, path) if local in names else None
    match = [n for n in names if device.lower() in n.lower()]
    return load_timing(match[0], path) if match else None


def _groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """Runs that differ only by seed (a stack's candidates), in plan order."""
    out: dict[str, list[RunSpec]] = {}
    for s in specs:
        out.setdefault(seed_group(s), []).append(s)
    return list(out.values())


def execution_modes(config: Config, todo: list[RunSpec], throughput: Throughput | None
                    ) -> dict[str, tuple[Mode, str | None]]:
    """run hash -> (the mode it executes in, the measured model whose figures price it) for the runs
    `todo`, as the executor assigns them (l2l.modes.assign, executor.stack_seeds) on the measured device."""
    measured = throughput.modes if throughput is not None else {}
    out = {}
    for group in _groups(todo):
        s = group[0]
        name, family = family_modes(s.model, s.model_cfg, measured, config.profile.models)
        for chunk, mode in assign(group, config.executor["stack_seeds"], family, stack_refusal(s) is None):
            out.update({c.hash: (mode, name) for c in chunk})
    return out


def run_costs(config: Config, throughput: Throughput | None, runs_dir: Path = Path("runs"),
              timing: Timing | None = None, estimate: DeviceEstimate | None = None) -> tuple[list[RunCost], list[str]]:
    """Every run of the plan: done or not, and its device-hours: calibrated per run where `timing`
    is given (train stage + the evaluate stage's passes), else estimated for an unmeasured GPU where
    `estimate` is given, else from the throughput measurement; under the mode each run executes in
    (executor.stack_seeds: the fastest measured per model family, l2l/modes.py)."""
    split, manifests, notes = _prepared(config)
    specs = plan(config, {ds: m["fingerprint"] for ds, m in manifests.items()})
    done = {s.hash: s.dataset in manifests and (runs_dir / s.hash / "result.json").exists() for s in specs}
    todo = [s for s in specs if not done[s.hash]]
    modes = execution_modes(config, todo, throughput if timing is None and estimate is None else None)
    counts = {s.hash: _counts(split, manifests, s) for s in specs}
    stacked = _stacked_estimates(todo, counts, estimate) if estimate is not None else {}
    flops: dict = {}
    out = []
    for s in specs:
        n = counts[s.hash]
        epochs = planned_epochs(s)
        features = run_features(s, n, flops)
        mode, measured = modes.get(s.hash, (SEPARATE, None))
        hours, basis = None, "no throughput measurement"
        if timing is not None:
            conventional = _conventional(s, flops) / 1e9
            evals = 2 * (n["val"] + n["test"]) / EVAL_SPEEDUP  # two checkpoints, forward passes
            seconds = timing.seconds(*features) + evals * (timing.image_s + timing.gflop_s * conventional)
            hours, basis = seconds / 3600, f"calibrated per run ({timing.device_name})"
        elif estimate is not None:
            hours = estimate.run_seconds(s, n, mode.members) / 3600
            basis = f"estimate ({estimate.sheet.name}, not measured), {mode.name}"
        elif throughput is not None:
            if mode.images_per_s is not None:
                rate, basis = throughput.mode_rate(mode, measured, config.profile.models[measured], s.model_cfg,
                                                   s.data.get("image_size", 32))
            else:
                rate, basis = throughput.rate(s.model_cfg, flops, s.data.get("image_size", 32))
            factor, note = step_factor(s, flops)
            basis += f"; step x{factor:.2f} of conventional" + (f" ({note})" if note else "")
            images = epochs * n["train"] * factor + (epochs * n["val"] + 2 * (n["val"] + n["test"])) / EVAL_SPEEDUP
            hours = images / rate / 3600
        result = read_json(runs_dir / s.hash / "result.json") if done[s.hash] else {}
        # a stacked run's wall time is its stack's (l2l/stacking.py): not one run's, so no calibration point
        measured_s = None if result.get("stacked") else result.get("run_seconds")
        out.append(RunCost(s, done[s.hash], epochs, hours, basis, features, measured_s,
                           result.get("device_name"), mode.name, stacked.get(s.hash)))
    _save_cache()
    return out, notes


def _counts(split: dict, manifests: dict, s: RunSpec) -> dict[str, int]:
    n = split_counts(split, manifests.get(s.dataset), s.dataset, s.data.get("val_size", 0))
    if val_joins_train(s.data):  # its experiment's split.val_size 0: the validation images train too
        n = {**n, "train": n["train"] + n["val"], "val": 0}
    return n


def _stacked_estimates(todo: list[RunSpec], counts: dict, estimate: DeviceEstimate) -> dict[str, tuple[str, float]]:
    """run hash -> (mode, estimated hours) under the stack size (of STACK_SIZES, at most the group's runs)
    that the estimate finds fastest for its group of runs differing only by seed (stackable methods)."""
    out = {}
    for group in _groups(todo):
        if stack_refusal(group[0]) is not None or len(group) < 2:
            continue
        best = None
        for k in (k for k in STACK_SIZES if k <= len(group)):
            hours = {c.hash: (mode.name, estimate.run_seconds(c, counts[c.hash], mode.members) / 3600)
                     for chunk, mode in assign(group, k, {}, True) for c in chunk}
            total = sum(h for _, h in hours.values())
            if best is None or total < best[0] * 0.99:  # a larger stack only where it saves over 1%
                best = (total, hours)
        out.update(best[1])
    return out


def disk_bytes(costs: list[RunCost]) -> dict[str, int]:
    """What a profile's runs and data take on disk: the original archives (and their extraction beside
    them, about as large), the prepared arrays, and per run its final.pt, best.pt (with validation) and
    MLflow's copy of final.pt (4 bytes per parameter each)."""
    datasets = sorted({c.spec.dataset for c in costs})
    archives = sum(DATASETS[d].download_bytes for d in datasets)
    prepared = 0
    for d in datasets:
        size = next(c.spec.data.get("image_size", 32) for c in costs if c.spec.dataset == d)
        prepared += (DATASETS[d].train_images + DATASETS[d].test_images) * 3 * size * size
    runs = 0
    for c in costs:
        params = model_counts(c.spec.model_cfg, _classes(c.spec), c.spec.train["batch_size"],
                              c.spec.data.get("image_size", 32))[3]
        runs += 4 * params * (2 + (not val_joins_train(c.spec.data)))
    return {"downloads": archives, "extracted": archives, "prepared": prepared, "runs": runs}


def measured_against(costs: list[RunCost], timing: Timing) -> tuple[int, float, float] | None:
    """(runs, predicted s, measured s) over the finished runs measured on the calibration's device."""
    pairs = [(timing.seconds(*c.features), c.measured_s) for c in costs
             if c.measured_s is not None and c.device_name == timing.device_name]
    if not pairs:
        return None
    return len(pairs), sum(p for p, _ in pairs), sum(m for _, m in pairs)

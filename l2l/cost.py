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
from l2l.engine import RunContext, device_info, pick_device
from l2l.io import read_json, write_json
from l2l.methods import METHODS
from l2l.models import build_model, with_defaults
from l2l.modes import THROUGHPUT_FILE
from l2l.profiling import StepCounter
from l2l.spec import RunSpec
from l2l.stacking import MemberContext, Recorder, StackedPhase
from l2l.timing import TIMING_FILE, Timing, load_timing

# A forward pass is about a third of a training step's FLOPs (the backward pass costs about twice
# the forward): evaluation images go about 3x as fast as training images.
EVAL_SPEEDUP = 3.0


def train_flops_per_image(model_cfg: dict, num_classes: int = 10, batch_size: int = 128, image_size: int = 32
                          ) -> float:
    """Forward + backward FLOPs of one conventional training image (l2l.profiling's counter on the
    meta device: shapes only, no compute)."""
    key = json.dumps([model_cfg, num_classes, batch_size, image_size], sort_keys=True)
    _load_cache()
    if key not in _TRAIN_FLOPS:
        _TRAIN_FLOPS[key] = _train_flops(model_cfg, num_classes, batch_size, image_size)
    return _TRAIN_FLOPS[key]


def _train_flops(model_cfg: dict, num_classes: int, batch_size: int, image_size: int) -> float:
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes)
    x = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with StepCounter() as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.flops / batch_size


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
    hours: float | None  # None without a throughput measurement or calibration
    basis: str
    features: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (epochs, images, GFLOPs) in the train stage
    measured_s: float | None = None  # a finished run's result.json run_seconds
    device_name: str | None = None  # where it was measured


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
_TRAIN_FLOPS: dict[str, float] = {}
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
        for key, v in doc["train_flops"].items():
            _TRAIN_FLOPS.setdefault(key, float(v))
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no cache (first plan of this code), or an unreadable one: counted again


def _save_cache() -> None:
    try:
        write_json(_cache_file(), {"phases": {k: [dataclasses.asdict(p) for p in v] for k, v in _PHASES.items()},
                                   "train_flops": _TRAIN_FLOPS})
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


def run_costs(config: Config, throughput: Throughput | None, runs_dir: Path = Path("runs"),
              timing: Timing | None = None) -> tuple[list[RunCost], list[str]]:
    """Every run of the plan: done or not, and its device-hours: calibrated per run where `timing`
    is given (train stage + the evaluate stage's passes), else from the throughput measurement."""
    split, manifests, notes = _prepared(config)
    specs = plan(config, {ds: m["fingerprint"] for ds, m in manifests.items()})
    flops: dict = {}
    out = []
    for s in specs:
        n = split_counts(split, manifests.get(s.dataset), s.dataset, s.data.get("val_size", 0))
        if val_joins_train(s.data):  # its experiment's split.val_size 0: the validation images train too
            n = {**n, "train": n["train"] + n["val"], "val": 0}
        epochs = planned_epochs(s)
        features = run_features(s, n, flops)
        hours, basis = None, "no throughput measurement"
        if timing is not None:
            conventional = _conventional(s, flops) / 1e9
            evals = 2 * (n["val"] + n["test"]) / EVAL_SPEEDUP  # two checkpoints, forward passes
            seconds = timing.seconds(*features) + evals * (timing.image_s + timing.gflop_s * conventional)
            hours, basis = seconds / 3600, f"calibrated per run ({timing.device_name})"
        elif throughput is not None:
            rate, basis = throughput.rate(s.model_cfg, flops, s.data.get("image_size", 32))
            factor, note = step_factor(s, flops)
            basis += f"; step x{factor:.2f} of conventional" + (f" ({note})" if note else "")
            images = epochs * n["train"] * factor + (epochs * n["val"] + 2 * (n["val"] + n["test"])) / EVAL_SPEEDUP
            hours = images / rate / 3600
        done = s.dataset in manifests and (runs_dir / s.hash / "result.json").exists()
        result = read_json(runs_dir / s.hash / "result.json") if done else {}
        out.append(RunCost(s, done, epochs, hours, basis, features, result.get("run_seconds"),
                           result.get("device_name")))
    _save_cache()
    return out, notes


def measured_against(costs: list[RunCost], timing: Timing) -> tuple[int, float, float] | None:
    """(runs, predicted s, measured s) over the finished runs measured on the calibration's device."""
    pairs = [(timing.seconds(*c.features), c.measured_s) for c in costs
             if c.measured_s is not None and c.device_name == timing.device_name]
    if not pairs:
        return None
    return len(pairs), sum(p for p, _ in pairs), sum(m for _, m in pairs)

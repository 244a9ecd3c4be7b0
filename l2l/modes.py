"""How runs execute on a device, chosen by measurement (issue #21): per model family, the fastest of
the execution modes that benchmarks/gpu_check.py measured on that device.

benchmarks/throughput.json holds, per device, ``modes[<model name of the profile>][<mode>] =
{images_per_s (aggregate training images/s of every run in flight), peak_memory_gib, achieved_tflops,
runs (how many runs in flight)}`` (this module is where that format is defined). Mode names:

- ``separate``: one run at a time, one process (the engine as it is);
- ``stacked_<K>``: K runs that differ only by seed as one stacked computation (l2l/stacking.py);
- ``runs_per_gpu_<N>``: N separate runs in N processes sharing the GPU (executor.runs_per_gpu);
- ``cuda_graphs``, ``stacked_<K>_cuda_graphs``: with executor.cuda_graphs (measured by the rehearsal's
  section); this executor does not run them (a stacked member's step is the stack's), so they are
  listed, never chosen.

A run is priced, and executed, at the aggregate rate of its family's chosen mode: K runs of a stack
share its wall time, so each costs its images / the stack's aggregate images/s in device time.
Where nothing was measured for a family on the device, the mode is ``separate``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from l2l.methods import METHODS
from l2l.models import with_defaults
from l2l.spec import RunSpec

THROUGHPUT_FILE = Path("benchmarks/throughput.json")
_NAME = re.compile(r"^(separate|stacked_(\d+)|runs_per_gpu_(\d+))(_cuda_graphs)?$|^cuda_graphs$")


@dataclass(frozen=True)
class Mode:
    name: str
    members: int  # runs per task (a stack's K; 1 otherwise)
    concurrent: int  # tasks in flight on one device (runs_per_gpu's N; 1 otherwise)
    cuda_graphs: bool
    images_per_s: float | None = None  # aggregate, all runs in flight; None: not measured
    peak_memory_gib: float | None = None
    achieved_tflops: float | None = None

    @property
    def executable(self) -> bool:
        return not self.cuda_graphs


SEPARATE = Mode("separate", 1, 1, False)


def parse(name: str, figures: dict | None = None) -> Mode:
    """A mode from its name (and its measured figures); a name outside the contract is a ValueError."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"unknown execution mode {name!r} (separate, stacked_<K>, runs_per_gpu_<N>, cuda_graphs, "
                         "stacked_<K>_cuda_graphs)")
    f = figures or {}
    return Mode(name, int(m.group(2) or 1), int(m.group(3) or 1), name.endswith("cuda_graphs"),
                f.get("images_per_s"), f.get("peak_memory_gib"), f.get("achieved_tflops"))


def stacked(k: int) -> Mode:
    return parse(f"stacked_{k}") if k > 1 else SEPARATE


def measured(path: Path, device: str | None) -> tuple[str | None, dict[str, dict[str, Mode]]]:
    """(the measured device's name, {model name: {mode name: Mode}}) of `device` (its full name, as
    the engine stamps it) in `path`; device None: the one GPU measured there, if exactly one is.
    Nothing measured: (None, {})."""
    if not Path(path).exists():
        return None, {}
    doc = json.loads(Path(path).read_text()).get("measurements", {})
    if device is None:
        gpus = [n for n, m in doc.items() if m.get("stamp", {}).get("device") == "cuda"]
        name = gpus[0] if len(gpus) == 1 else None
    else:
        name = device if device in doc else None
    if name is None:
        return None, {}
    return name, {model: {mode: parse(mode, f) for mode, f in modes.items()}
                  for model, modes in (doc[name].get("modes") or {}).items()}


def family_modes(model: str, model_cfg: dict, modes: dict[str, dict[str, Mode]], cfgs: dict[str, dict]
                 ) -> tuple[str | None, dict[str, Mode]]:
    """The modes measured for `model` (by its name in the profile), else for a measured model of the same
    configuration (p5_teacher and p4_resnet are both ResNet-110): (the measured name, its modes)."""
    if model in modes:
        return model, modes[model]
    want = with_defaults(model_cfg)
    for name, m in modes.items():
        if name in cfgs and with_defaults(cfgs[name]) == want:
            return name, m
    return None, {}


def fastest(modes: dict[str, Mode], stackable: bool, seeds: int) -> Mode:
    """The measured mode of most aggregate images/s that this executor can run for a group of `seeds`
    runs differing only by seed (stacks only if `stackable` and of at most `seeds` members; runs_per_gpu
    needs no grouping); ``separate`` when none is measured."""
    usable = [m for m in modes.values() if m.executable and m.images_per_s
              and (m.members == 1 or (stackable and m.members <= seeds))]
    return max(usable, key=lambda m: m.images_per_s, default=SEPARATE)


def stack_refusal(spec: RunSpec) -> str | None:
    """Why runs like `spec` do not train stacked (None: they may): its method's reason
    (Method.stackable), or train.compile (a compiled step belongs to one run)."""
    why = METHODS[spec.method].stackable(spec.options)
    if why is None and spec.train["compile"]:
        why = "train.compile (a compiled step is one run's)"
    return why


def decide(setting: str | int, family: dict[str, Mode], stackable: bool, seeds: int) -> Mode:
    """The mode of a group of `seeds` runs that differ only by seed under params' executor.stack_seeds:
    auto = the fastest measured for the family (``separate`` where none is), off = separate, K = stacks of
    up to K runs (where the method stacks)."""
    if setting == "auto":
        return fastest(family, stackable, seeds)
    if setting == "off" or not stackable:
        return SEPARATE
    return stacked(min(int(setting), seeds))


def assign(specs: list, setting: str | int, family: dict[str, Mode], stackable: bool) -> list[tuple[list, Mode]]:
    """A group of runs that differ only by seed, in the tasks it executes as: full stacks of its mode's
    K, then what is left decided again at its own size (10 runs at stacked_8: a stack of 8, then 2 runs
    at their own fastest mode). The executor and l2l plan both assign runs with it."""
    out, rest = [], list(specs)
    while rest:
        mode = decide(setting, family, stackable, len(rest))
        k = mode.members
        full = len(rest) // k * k
        out += [(rest[i:i + k], mode) for i in range(0, full, k)]
        rest = rest[full:]
    return out

"""What one training run is: its :class:`RunSpec` (hashed: the run's identity) and the schema of
the training settings it carries (params.yaml ``profiles.<p>.train`` and ``experiments.<e>.train``,
closed, defaults written once here)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from l2l.checks import (Key, boolean, choice, config_error, increasing_ints, mapping, nonneg_float, nonneg_int,
                        one_of_keys, pos_float, pos_int, resolve)

OPTIMIZERS = ("sgd",)
SCHEDULES = ("constant", "step", "multistep", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
# The keys each learning-rate schedule takes (torch.optim.lr_scheduler: StepLR, MultiStepLR, cosine to 0
# over each phase's epochs); a key another schedule takes is an error, not silently ignored.
SCHEDULE_KEYS = {"constant": (), "step": ("step_size", "gamma"), "multistep": ("milestones", "gamma"), "cosine": ()}


def schedule(v: Any, path: str) -> dict:
    v = mapping(v, path)
    name = choice(v.get("name"), f"{path}.name", SCHEDULES)
    one_of_keys(v, path, ("name", *SCHEDULE_KEYS[name]))
    checks = {"step_size": pos_int, "gamma": pos_float, "milestones": lambda m, p: increasing_ints(m, p, 1, False)}
    out = {"name": name}
    for k in SCHEDULE_KEYS[name]:
        if k not in v:
            raise config_error(f"{path}.{k}", problem=f"missing (schedule {name} needs {', '.join(SCHEDULE_KEYS[name])})")
        out[k] = checks[k](v[k], f"{path}.{k}")
    return out


TRAIN: dict[str, Key] = {
    "epochs": Key(pos_int, doc="per phase (layerwise: per stage; generations: per generation)"),
    "batch_size": Key(pos_int),
    "eval_batch_size": Key(pos_int, 1000, "validation/test batches (no effect on results beyond float order)"),
    "optimizer": Key({
        "name": Key(lambda v, p: choice(v, p, OPTIMIZERS), "sgd"),
        "lr": Key(pos_float),
        "momentum": Key(nonneg_float, 0.0),
        "weight_decay": Key(nonneg_float, 0.0),
        "nesterov": Key(boolean, False),
    }),
    "schedule": Key(schedule, {"name": "constant"}),
    "augment": Key({
        "crop_padding": Key(nonneg_int, 0, "random crop of the zero-padded image; 0 = no crop"),
        "flip": Key(boolean, False, "random horizontal flip"),
    }),
    "precision": Key(lambda v, p: choice(v, p, PRECISIONS), "auto", "auto: bf16 autocast on CUDA, fp32 on CPU"),
    "compile": Key(boolean, False, "torch.compile of the training steps' forwards (l2l/compiling.py)"),
    "deterministic": Key(boolean, False, "cuDNN autotuning off and deterministic kernels (CUDA results then "
                                         "bit-reproducible); off: the fastest kernels"),
    "tf32": Key(boolean, False, "TF32 tensor cores for fp32 convolutions and matmuls on CUDA (Ampere and later); "
                                "false: IEEE fp32 (l2l/compiling.py)"),
}


def resolve_train(given: Any, path: str) -> dict:
    """A train section checked (closed at every level) with every default filled in."""
    t = resolve(TRAIN, given, path)
    if t["optimizer"]["nesterov"] and t["optimizer"]["momentum"] == 0:
        raise config_error(f"{path}.optimizer.nesterov", "momentum > 0 with Nesterov momentum",
                           t["optimizer"]["momentum"])
    return t


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run; its hash is the run's identity.

    Every field holds resolved values (train with its defaults, options with theirs, the model's
    arguments with its signature's), so writing a default explicitly in params.yaml is the same run."""

    experiment: str
    method: str
    model: str
    dataset: str
    seed: int
    model_cfg: dict = field(hash=False)
    train: dict = field(hash=False)
    options: dict = field(hash=False)  # the method's own options (defaults filled in)
    data: dict = field(hash=False)  # split settings and the prepared data's fingerprint

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """How a run is named to a person: logs, progress bars, MLflow run names, errors."""
        return f"{self.experiment}/{self.model}/{self.dataset}/s{self.seed}"

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(**d)

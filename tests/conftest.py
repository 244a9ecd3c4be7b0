"""Shared helpers: tiny specs, tiny on-device data, a tiny pipeline workspace."""
from __future__ import annotations

import copy
import functools
import os
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from l2l.config import Config, load_params, plan, resolve_config
from l2l.spec import RunSpec, resolve_train
from l2l.device_data import DeviceData

REPO = Path(__file__).resolve().parents[1]
# The shared offline CIFAR-10 arrays (real images and labels; CI sets L2L_CIFAR10_NPZ, .ci/run)
REAL_NPZ = Path(os.environ.get("L2L_CIFAR10_NPZ", REPO.parent / "shared/data/cifar10_train50k_test1017_arrays.npz"))

# a resolved train section (every default filled in), as the plan puts into every RunSpec
TRAIN = resolve_train({"epochs": 2, "batch_size": 32, "eval_batch_size": 64,
                       "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
                       "schedule": {"name": "cosine"}, "augment": {"crop_padding": 4, "flip": True}}, "test.train")


def shipped_params(profile: str = "paper") -> dict:
    """The shipped configuration: the repository's params.yaml with `profile` given here. Tests
    never read the workspace's run.yaml (what `dvc exp run -S run.yaml:...` rewrites), so they pass
    whatever profile, papers or data sources a user's experiment left selected."""
    return {**load_params(REPO / "params.yaml"), "profile": profile}


def plan_of(params: dict, profile: str | None = None, fingerprints: dict | None = None) -> list[RunSpec]:
    """The plan of a params.yaml mapping (resolved as a stage resolves it)."""
    return plan(resolve_config(params, profile), fingerprints)


def config_of(params: dict, profile: str | None = None) -> Config:
    return resolve_config(params, profile)


def make_spec(**overrides) -> RunSpec:
    d = dict(experiment="conventional", method="conventional", model="cnn", dataset="cifar10", seed=0,
             model_cfg={"arch": "cnn", "width": 4}, train=copy.deepcopy(TRAIN), options={},
             data={"fingerprint": "test"})
    d.update(overrides)
    return RunSpec(**d)


def random_arrays(n_train=96, n_val=32, n_test=32, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, num_classes, n).astype(np.int64)

    return {"train": split(n_train), "val": split(n_val), "test": split(n_test)}


@pytest.fixture
def tiny_data() -> DeviceData:
    return DeviceData(random_arrays(), "cifar10", torch.device("cpu"), crop_padding=4, flip=True)


def write_npz(path: Path, n=600, num_classes=10, seed=0) -> Path:
    """An .npz in the layout of the shared offline CIFAR-10 file (flat rows, no x_test)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n // num_classes).astype(np.uint8)
    np.savez(path, x_train=rng.integers(0, 256, (len(y), 3072), dtype=np.uint8), y_train=y)
    return path


def smoke_params(npz: Path, seeds=(0, 1), experiments=None) -> dict:
    """params.yaml for a pipeline that trains in seconds (a workspace without run.yaml)."""
    params = shipped_params("smoke")
    params["data"]["npz"] = {"cifar10": str(npz)}
    smoke = params["profiles"]["smoke"]
    smoke["seeds"] = list(seeds)
    smoke["split"] = {"val_size": 50, "test_size": 100, "train_subset": 200}
    smoke["models"] = {"cnn": {"arch": "cnn", "width": 4}}
    smoke["train"] = {"epochs": 1, "batch_size": 50, "optimizer": {"lr": 0.05}}
    smoke["experiments"] = experiments or {"conventional": {"method": "conventional", "models": ["cnn"]}}
    # smoke extends paper, whose experiments would merge in (at paper model sizes): only these train
    params["profiles"]["paper"]["experiments"] = {}
    params["executor"]["checkpoint_min_seconds"] = 0  # a resume state every epoch: tests interrupt runs after one
    return params


def real_npz() -> Path:
    """REAL_NPZ. Missing: an error where L2L_CIFAR10_NPZ names it (CI), else the test is skipped, naming
    where it looked."""
    if not REAL_NPZ.is_file():
        if "L2L_CIFAR10_NPZ" in os.environ:
            raise FileNotFoundError(f"L2L_CIFAR10_NPZ={REAL_NPZ}: no such file")
        pytest.skip(f"offline CIFAR-10 arrays not present at {REAL_NPZ} (set L2L_CIFAR10_NPZ)")
    return REAL_NPZ


@functools.lru_cache(maxsize=None)
def real_cifar10(train: int = 640, val: int = 500, test: int = 500, seed: int = 0) -> dict:
    """Disjoint stratified train/val/test subsets (a tenth of each per class) of the real CIFAR-10
    training images and labels in REAL_NPZ (real_npz), as uint8 NCHW and int64 arrays."""
    with np.load(real_npz()) as z:
        x, y = z["x_train"], z["y_train"].astype(np.int64)
        rng = np.random.default_rng(seed)
        per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
        out, start = {}, 0
        for split, n in (("train", train), ("val", val), ("test", test)):
            idx = np.sort(np.concatenate([p[start:start + n // 10] for p in per_class]))
            out[split] = (x[idx].reshape(-1, 3, 32, 32), y[idx])
            start += n // 10
    return out
# Tests of an optional backend carry its marker; without the extra installed they are skipped before
# their fixtures run (the README's test command stays lean). CI installs the extras and runs them
# (`pytest -m "ray or slurm"`), failing on any skip (.ci/run).
EXTRAS = {"ray": "ray", "slurm": "submitit"}  # marker (and extra) -> the package it needs


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, package in EXTRAS.items():
            if item.get_closest_marker(marker) and importlib.util.find_spec(package) is None:
                item.add_marker(pytest.mark.skip(reason=f"needs the {marker} extra: pip install -e '.[{marker}]'"))

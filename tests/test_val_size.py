"""An experiment's split.val_size 0 (#12: P3 reports the last epoch and its code trains on all 50,000
images): the plan, the data a run sees, training without a validation split (nothing selected,
best-validation undefined, not a crash) and the tables that say which runs saw which images."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from l2l.checks import ConfigError
from l2l.data import join_val
from l2l.datasets import val_joins_train
from l2l.device_data import DeviceData
from l2l.engine import RunContext, train_run
from l2l.methods import conventional, layerwise
from l2l.spec import RunSpec
from tests.conftest import REPO, TRAIN, config_of, plan_of, random_arrays, shipped_params, smoke_params, write_npz

CPU = torch.device("cpu")
P3_EXPERIMENTS = ("layerwise", "layerwise_paper_text", "layerwise_e2e", "compress_layerwise", "compress_e2e")


@pytest.fixture
def params():
    return shipped_params()


def test_every_paper_experiment_trains_on_every_training_image(params):
    """P3's experiments as its code does; since #24 P1's, P4's and P5's too (no verdict selects on
    validation: every claim reads the last epoch), CIFAR-100 and VOC alike."""
    specs = plan_of(params, "paper")
    by_exp = {}
    for s in specs:
        by_exp.setdefault(s.experiment, set()).add(s.data["val_size"])
    assert all(by_exp[e] == {0} for e in P3_EXPERIMENTS)
    assert by_exp.keys() > set(P3_EXPERIMENTS) and all(v == {0} for v in by_exp.values()), by_exp
    # the profile's own split is still there for an experiment that does not override it
    assert params["profiles"]["paper"]["split"]["val_size"] == 5000
    # the override is part of the run's identity, and the data settings are otherwise the profile's
    s = next(s for s in specs if s.experiment == "layerwise")
    assert s.data == {"val_size": 0, "test_size": 10000, "train_subset": None, "split_seed": 0, "fingerprint": None}
    assert val_joins_train(s.data) and not val_joins_train({**s.data, "val_size": 5000})


def test_removing_the_override_restores_the_profile_split_and_changes_the_identity(params):
    before = {(s.experiment, s.model, s.seed): s for s in plan_of(params, "paper")}
    del params["profiles"]["paper"]["experiments"]["compress_e2e"]["split"]
    after = {(s.experiment, s.model, s.seed): s for s in plan_of(params, "paper")}
    changed = {k for k in before if before[k].hash != after[k].hash}
    assert changed == {k for k in before if k[0] == "compress_e2e"}
    assert {after[k].data["val_size"] for k in changed} == {5000}


@pytest.mark.parametrize("split, message", [
    ({"val_size": 100}, "split.val_size: expected 0 (the validation images join the training split"),
    ({"val_size": False}, "split.val_size: expected 0"),
    ({"test_size": 0}, "split.test_size: unknown key; expected one of val_size"),
    ([0], "split: expected a mapping"),
])
def test_a_bad_experiment_split_is_a_one_line_error_naming_its_key(params, split, message):
    params["profiles"]["paper"]["experiments"]["layerwise"]["split"] = split
    with pytest.raises(ConfigError) as e:
        config_of(params)
    assert str(e.value).startswith("params.yaml: profiles.paper.experiments.layerwise.") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_join_val_appends_the_validation_images_to_the_training_split():
    arrays = random_arrays(n_train=40, n_val=10, n_test=8)
    joined = join_val(arrays)
    assert np.array_equal(joined["train"][0], np.concatenate([arrays["train"][0], arrays["val"][0]]))
    assert np.array_equal(joined["train"][1], np.concatenate([arrays["train"][1], arrays["val"][1]]))
    assert joined["val"][0].shape == (0, 3, 32, 32) and joined["val"][1].shape == (0,)
    assert joined["test"] is arrays["test"]


def _spec(method, model_cfg, seed=0) -> RunSpec:
    name = method.__name__.rsplit(".", 1)[-1]
    return RunSpec("exp", name, "m", "cifar10", seed, model_cfg, {**TRAIN, "epochs": 2},
                   method.validate_options({}, "experiments.exp.options"), {"val_size": 0, "fingerprint": "t"})


@pytest.mark.parametrize("method, model_cfg", [
    (conventional, {"arch": "cnn", "width": 4}),
    (layerwise, {"arch": "layerwise_cnn", "preset": "k3", "J": 2, "M": 4, "M_tilde": 4, "downsample_at": [1]}),
])
def test_a_run_without_validation_trains_selects_nothing_and_resumes(tmp_path, method, model_cfg):
    torch.set_num_threads(1)
    data = DeviceData(join_val(random_arrays(n_train=64, n_val=32)), "cifar10", CPU, crop_padding=4, flip=True)
    spec = _spec(method, model_cfg)
    result = train_run(spec, method, RunContext(spec, data, 10, CPU), tmp_path / "a")
    assert result["images"] == {"train": 96, "val": 0, "test": 32}
    assert result["best"]["sha256"] is None and result["best"]["val_acc"] is None  # NaN is null in JSON
    assert result["final"]["val_acc"] is None and "best.pt" not in result["files"]
    assert not (tmp_path / "a" / "best.pt").exists() and (tmp_path / "a" / "final.pt").exists()
    history = pd.read_csv(tmp_path / "a" / "history.csv")
    assert history["val_acc"].isna().all() and history["train_acc"].notna().all()
    # interrupted and resumed: the same final weights as the uninterrupted run
    assert train_run(spec, method, RunContext(spec, data, 10, CPU), tmp_path / "b", stop_after_epochs=1) == \
        {"interrupted": True}
    resumed = train_run(spec, method, RunContext(spec, data, 10, CPU), tmp_path / "b")
    assert resumed["final_sha256"] == result["final_sha256"]


def test_evaluating_an_empty_split_is_undefined_not_zero():
    data = DeviceData(join_val(random_arrays(n_train=16, n_val=8)), "cifar10", CPU, crop_padding=0, flip=False)
    spec = _spec(conventional, {"arch": "cnn", "width": 4})
    ctx = RunContext(spec, data, 10, CPU)
    out = ctx.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), "val")
    assert math.isnan(out["acc"]) and math.isnan(out["loss"]) and len(out["pred"]) == 0


def _run_stage(name: str) -> None:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.run()


@pytest.mark.slow
def test_tables_say_which_runs_saw_which_images(tmp_path, monkeypatch):
    """The pipeline with one experiment on the profile's split and one with split.val_size 0: runs.csv
    and summary.csv carry the images each run trained and validated on, the no-validation runs'
    best-validation metrics are NaN, and claims and report stages read them."""
    params = smoke_params(write_npz(tmp_path / "arrays.npz"), seeds=(0,), experiments={
        "conventional": {"method": "conventional", "models": ["cnn"]},
        "all_images": {"method": "conventional", "models": ["cnn"], "split": {"val_size": 0}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump({"papers": {"PX": "A. Author. 2020."}, "claims": [
        {"id": "PX-C1", "paper": "PX", "claim": "The CNN reaches 90%.", "kind": "reported_value",
         "metric": "final_test_acc", "dataset": "cifar10", "arms": {"a": {"experiment": "all_images", "model": "cnn"}},
         "reported": {"value": 90.0, "source": "Table 1"}, "tolerance": 1.0, "protocol": "all training images"}]}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for stage in ("data", "train", "evaluate", "aggregate", "claims", "report"):
        _run_stage(stage)
    runs = pd.read_csv(tmp_path / "results/runs.csv").set_index("experiment")
    assert runs.loc["conventional", ["train_images", "val_images"]].tolist() == [200, 50]
    assert runs.loc["all_images", ["train_images", "val_images"]].tolist() == [250, 0]
    assert runs.loc["conventional", ["best_test_acc", "best_val_acc", "final_val_acc"]].notna().all()
    assert runs.loc["all_images", ["best_test_acc", "best_val_acc", "final_val_acc"]].isna().all()
    assert runs["final_test_acc"].notna().all()
    summary = pd.read_csv(tmp_path / "results/summary.csv").set_index("experiment")
    assert summary.loc["all_images", ["train_images", "val_images"]].tolist() == [250, 0]
    assert math.isnan(summary.loc["all_images", "best_test_acc_mean"])
    assert "PX-C1" in (tmp_path / "reports" / "report.md").read_text()

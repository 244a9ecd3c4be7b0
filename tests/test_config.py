import copy

import pytest
import yaml

from l2l.config import ConfigError, load_params, plan, resolve_profile
from tests.conftest import REPO


@pytest.fixture
def params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_valid_for_every_profile(params):
    for name in params["profiles"]:
        specs = plan(params, profile=name)
        assert specs and len({s.hash for s in specs}) == len(specs)
        prof = resolve_profile(params, name)
        assert all(s.seed in prof.seeds for s in specs)


def test_smoke_extends_paper_and_overrides(params):
    smoke = resolve_profile(params, "smoke")
    paper = resolve_profile(params, "paper")
    assert smoke.train["optimizer"]["momentum"] == paper.train["optimizer"]["momentum"]  # inherited
    assert smoke.train["epochs"] < paper.train["epochs"]
    assert set(smoke.experiments) == set(paper.experiments)


def test_hash_is_identity(params):
    a = plan(params, profile="smoke")
    b = plan(copy.deepcopy(params), profile="smoke")
    assert [s.hash for s in a] == [s.hash for s in b]
    params["profiles"]["smoke"]["seeds"] = [0, 1, 7]
    c = plan(params, profile="smoke")
    # adding a seed adds runs and leaves the existing identities unchanged
    assert {s.hash for s in a} < {s.hash for s in c}
    fp = plan(params, {"cifar10": "other-data"}, profile="smoke")
    assert not {s.hash for s in fp} & {s.hash for s in c}


@pytest.mark.parametrize("path, value, message", [
    (("profile",), "nope", "profile: expected one of the profiles"),
    (("profiles", "smoke", "train", "epochs"), 0, "profiles.smoke.train.epochs: expected a positive integer, got 0"),
    (("profiles", "smoke", "seeds"), [0, "1"], "profiles.smoke.seeds: expected a non-empty list of integers"),
    (("profiles", "smoke", "seeds"), 3, "profiles.smoke.seeds: expected a non-empty list of integers"),
    (("profiles", "paper", "experiments", "conventional", "method"), "magic",
     "profiles.paper.experiments.conventional.method: expected one of"),
    (("profiles", "paper", "models", "cnn", "arch"), "alexnet", "profiles.paper.models.cnn.arch: expected one of"),
    (("profiles", "paper", "datasets"), ["mnist"], "profiles.paper.datasets: expected names from cifar10"),
    (("profiles", "paper", "train", "schedule"), {"name": "step"}, "profiles.paper.train.schedule.step_size: missing"),
    (("profiles", "paper", "train", "optimizer", "lr"), -1, "profiles.paper.train.optimizer.lr: expected a positive"),
    (("data", "source"), "ftp", "data.source: expected one of auto, download, mirror, npz"),
    (("profiles", "paper", "experiments", "conventional", "options"), {"depth": 3},
     "profiles.paper.experiments.conventional.options.depth: unknown option"),
    (("profiles", "paper", "train", "epochz"), 3, "profiles.paper.train.epochz: expected one of the keys"),
])
def test_invalid_params_name_the_key(params, path, value, message):
    d = params
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    params["profile"] = "paper" if path[0] != "profile" else value
    with pytest.raises(ConfigError) as e:
        plan(params, profile=None if path[0] == "profile" else path[1] if path[0] == "profiles" else "paper")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_params(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "missing.yaml")


def test_unknown_model_argument(params):
    params["profiles"]["paper"]["models"]["cnn"]["widht"] = 3
    with pytest.raises(ConfigError, match=r"profiles.paper.models.cnn.widht: expected an argument of cnn \(batch_norm, width\)"):
        plan(params, profile="paper")

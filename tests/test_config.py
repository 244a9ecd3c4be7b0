import copy

import pytest

from l2l.checks import ConfigError
from l2l.config import load_params
from tests.conftest import config_of, plan_of, shipped_params


@pytest.fixture
def params():
    return shipped_params()


def test_repo_params_valid_for_every_profile(params):
    for name in params["profiles"]:
        specs = plan_of(params, name)
        assert specs and len({s.hash for s in specs}) == len(specs)
        prof = config_of(params, name).profile
        assert all(s.seed in prof.experiments[s.experiment].seeds for s in specs)
    paper = config_of(params, "paper").profile  # per-experiment seeds (chosen from the claims' power)
    assert {s.seed for s in plan_of(params, "paper") if s.experiment == "layerwise"} == \
        set(paper.experiments["layerwise"].seeds) != set(paper.seeds)


def test_smoke_extends_paper_and_overrides(params):
    smoke = config_of(params, "smoke").profile
    paper = config_of(params, "paper").profile
    assert smoke.train["optimizer"]["momentum"] == paper.train["optimizer"]["momentum"]  # inherited
    assert smoke.train["epochs"] < paper.train["epochs"]
    assert set(smoke.experiments) == set(paper.experiments)


def test_hash_is_identity(params):
    a = plan_of(params, "smoke")
    b = plan_of(copy.deepcopy(params), "smoke")
    assert [s.hash for s in a] == [s.hash for s in b]
    params["profiles"]["smoke"]["seeds"] = [0, 1, 7]
    c = plan_of(params, "smoke")
    # adding a seed adds runs and leaves the existing identities unchanged
    assert {s.hash for s in a} < {s.hash for s in c}
    fp = plan_of(params, "smoke", {"cifar10": "other-data"})
    assert not {s.hash for s in fp} & {s.hash for s in c}


@pytest.mark.parametrize("path, value, message", [
    (("profile",), "nope", "profile: expected one of paper, smoke"),
    (("profiles", "smoke", "train", "epochs"), 0, "profiles.smoke.train.epochs: expected a positive integer, got 0"),
    (("profiles", "smoke", "seeds"), [0, "1"], "profiles.smoke.seeds: expected a non-empty list of non-negative integers"),
    (("profiles", "smoke", "seeds"), 3, "profiles.smoke.seeds: expected a non-empty list of non-negative integers"),
    (("profiles", "paper", "experiments", "conventional", "method"), "magic",
     "profiles.paper.experiments.conventional.method: expected one of"),
    (("profiles", "paper", "models", "cnn", "arch"), "alexnet", "profiles.paper.models.cnn.arch: expected one of"),
    (("profiles", "paper", "datasets"), ["mnist"], "profiles.paper.datasets: expected names from cifar10"),
    (("profiles", "paper", "train", "schedule"), {"name": "step"}, "profiles.paper.train.schedule.step_size: missing"),
    (("profiles", "paper", "train", "optimizer", "lr"), -1, "profiles.paper.train.optimizer.lr: expected a positive"),
    (("data", "source"), "ftp", "data.source: expected one of auto, download, mirror, npz"),
    (("profiles", "paper", "experiments", "conventional", "options"), {"depth": 3},
     "profiles.paper.experiments.conventional.options.depth: unknown option"),
    (("profiles", "paper", "train", "epochz"), 3, "profiles.paper.train.epochz: unknown key; expected one of"),
])
def test_invalid_params_name_the_key(params, path, value, message):
    d = params
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    params["profile"] = "paper" if path[0] != "profile" else value
    with pytest.raises(ConfigError) as e:
        plan_of(params, None if path[0] == "profile" else path[1] if path[0] == "profiles" else "paper")
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
    with pytest.raises(ConfigError, match=r"profiles.paper.models.cnn.widht: unknown key; expected an argument of cnn \(batch_norm, width\)"):
        plan_of(params, "paper")


def test_distill_students_carry_their_teacher_run(params):
    specs = plan_of(params, "paper")
    teachers = {(s.dataset, s.seed): s for s in specs if s.experiment == "p5_teacher"}
    students = [s for s in specs if s.experiment == "p5_distill"]
    n = len(params["profiles"]["paper"]["experiments"]["p5_teacher"]["seeds"])  # P5's seeds (power, params.yaml)
    assert len(teachers) == 2 * n and len(students) == 3 * 2 * n
    for s in students:
        t = teachers[(s.dataset, s.seed)]
        assert s.options["teacher_run"] == {"hash": t.hash, "model_cfg": t.model_cfg}
    assert {s.model_cfg["depth"] for s in teachers.values()} == {110}


@pytest.mark.parametrize("edit, missing", [
    (lambda e: e.pop("p5_teacher"), "experiment p5_teacher is not in profile paper"),
    (lambda e: e["p5_teacher"].update(datasets=["cifar100"]), "experiment p5_teacher does not train on dataset voc2007"),
    (lambda e: e["p5_distill"]["options"]["teacher"].update(model="p5_resnet20"),
     "experiment p5_teacher has no model p5_resnet20"),
])
def test_missing_teacher_run_is_a_one_line_error(params, edit, missing):
    edit(params["profiles"]["paper"]["experiments"])
    with pytest.raises(ConfigError) as e:
        plan_of(params, "paper")
    assert str(e.value).startswith("params.yaml: profiles.paper.experiments.p5_distill.options.teacher: ")
    assert missing in str(e.value) and "\n" not in str(e.value)


def test_teacher_settings_change_its_students_identity_only(params):
    before = {s.hash: s.experiment for s in plan_of(params, "paper")}
    params["profiles"]["paper"]["experiments"]["p5_teacher"]["train"] = {"epochs": 50}
    after = {s.hash: s.experiment for s in plan_of(params, "paper")}
    changed = set(before) ^ set(after)
    assert {before.get(h) or after[h] for h in changed} == {"p5_teacher", "p5_distill"}
    n = len(params["profiles"]["paper"]["experiments"]["p5_teacher"]["seeds"])
    assert len(set(before) - set(after)) == 2 * n + 6 * n  # every teacher and every student, nothing else

"""run.yaml, the workspace's selection: what `dvc exp run -S run.yaml:...` rewrites (so params.yaml
stays as shipped), and `papers`: one paper's runs, the runs they require, and nothing else."""
import shutil

import pytest
import yaml

from l2l.checks import ConfigError
from l2l.claims import load_claims
from l2l.config import load_config, load_workspace, plan
from l2l.methods import METHODS
from l2l.selection import load_selection, select, selected_claims
from tests.conftest import REPO, config_of, shipped_params


@pytest.fixture(scope="module")
def paper():
    """The shipped configuration's paper profile and claims."""
    config = config_of(shipped_params("paper"))
    return config, load_claims(config, REPO / "claims.yaml")


def _select(paper, papers):
    config, claims = paper
    return select(config_of({**shipped_params("paper"), "papers": papers}), claims)


def _needed(claims, paper_id, trained):
    return {(a.experiment, a.model, c.dataset) for c in claims if c.paper == paper_id for a in c.arms} & trained


def test_p3_plans_exactly_its_claims_runs(paper):
    config, claims = paper
    whole = plan(config)
    p3 = plan(_select(paper, ["P3"]))
    needed = _needed(claims, "P3", config.profile.trains())
    assert {(s.experiment, s.model, s.dataset) for s in p3} == needed  # nothing else, nothing missing
    assert not [s for s in p3 if s.experiment.startswith(("l2l_", "p4_", "p5_"))]  # other papers' methods
    # every seed of those runs, as the same runs (hashes) as the whole profile's
    want = [s.hash for s in whole if (s.experiment, s.model, s.dataset) in needed]
    assert sorted(s.hash for s in p3) == sorted(want) and len(p3) < len(whole)


def test_p5_keeps_the_teacher_runs_its_students_require(paper):
    config, claims = paper
    sel = _select(paper, ["P5"])
    p5 = plan(sel)
    arms = _needed(claims, "P5", config.profile.trains())
    triples = {(s.experiment, s.model, s.dataset) for s in p5}
    teachers = {(ref["experiment"], ref["model"], s.dataset) for s in p5
                for ref in METHODS[s.method].requires(s.options).values()}
    assert teachers and teachers <= triples  # p5_teacher on each dataset a student distils on
    assert any(e == "p5_teacher" for e, _, _ in teachers)
    assert triples == arms | teachers
    assert set(sel.profile.datasets) == {d for _, _, d in triples}
    by_hash = {s.hash: s for s in plan(config)}
    assert all(s.hash in by_hash for s in p5)  # the teacher identity inside each student's hash is unchanged


def test_unknown_paper_is_one_line_naming_the_known_ones(paper):
    with pytest.raises(ConfigError) as e:
        _select(paper, ["P9"])
    msg = str(e.value)
    assert msg.startswith("run.yaml: papers: expected paper ids of claims.yaml (P1, P2, P3, P4, P5), got 'P9'")
    assert "\n" not in msg


def test_claims_of_the_selected_papers_only(paper):
    config, claims = paper
    sel = config_of({**shipped_params("paper"), "papers": ["P3", "P5"]})
    assert {c.paper for c in selected_claims(sel, claims)} == {"P3", "P5"}
    assert selected_claims(config, claims) == claims


def _workspace(tmp_path, run: dict | None) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "claims.yaml", tmp_path / "claims.yaml")
    shutil.copytree(REPO / "claims", tmp_path / "claims")
    if run is not None:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))


def test_run_yaml_selects_over_the_shipped_params(tmp_path, monkeypatch):
    _workspace(tmp_path, {"profile": "smoke", "papers": ["P3"], "data": {"npz": {"cifar10": "/x.npz"}}})
    monkeypatch.chdir(tmp_path)
    config, claims = load_selection()
    assert config.profile.name == "smoke" and config.papers == ["P3"] and {c.paper for c in claims} == {"P3"}
    assert str(config.data.npz["cifar10"]) == "/x.npz" and config.data.source == "auto"  # merged key by key
    named = {a.experiment for c in claims for a in c.arms}  # P3's claims' arms and nothing else
    assert "layerwise" in named and {s.experiment for s in plan(config)} <= named
    # `l2l plan --papers all` overrides run.yaml's papers
    assert load_selection(papers="all")[0].papers is None


@pytest.mark.parametrize("run, params_extra, message", [
    ({"profile": "smoke", "sedes": [1]}, {}, "run.yaml: sedes: unknown key; expected one of profile, papers, data, seeds"),
    ({"profile": "smoke", "seeds": [1]}, {}, "run.yaml: seeds: expected profile, or a mapping experiment -> model"),
    ({"profile": "fast"}, {}, "run.yaml: profile: expected one of paper, smoke, got 'fast'"),
    ({"profile": "smoke", "papers": "P3"}, {}, "run.yaml: papers: expected all or a non-empty list of paper ids"),
    ({"profile": "smoke"}, {"profile": "paper"}, "params.yaml: profile: set in run.yaml (the workspace's selection)"),
    # a key run.yaml sets over params.yaml's is named as run.yaml's
    ({"profile": "smoke", "data": {"npz": {"cifar11": "/x.npz"}}}, {},
     "run.yaml: data.npz.cifar11: unknown key; expected one of cifar10, cifar100"),
    ({"profile": "smoke", "data": {"source": "ftp"}}, {}, "run.yaml: data.source: expected one of auto, download"),
])
def test_bad_selection_one_line(tmp_path, monkeypatch, run, params_extra, message):
    _workspace(tmp_path, run)
    if params_extra:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({**shipped_params(), **params_extra}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_dvc_set_param_rewrites_run_yaml_only(tmp_path, monkeypatch):
    """What `dvc exp run -S run.yaml:profile=smoke -S 'run.yaml:papers=[P3]' -S
    'run.yaml:++data.npz.cifar10=...'` does to the files, through DVC's own function: run.yaml gets
    the values (and keeps its comments), params.yaml is left byte for byte."""
    hydra = pytest.importorskip("dvc.utils.hydra")
    _workspace(tmp_path, None)
    shutil.copy(REPO / "run.yaml", tmp_path / "run.yaml")
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "params.yaml").read_bytes()
    hydra.apply_overrides("run.yaml", ["profile=smoke", "papers=[P3]", "++data.npz.cifar10=/x.npz"])
    assert (tmp_path / "params.yaml").read_bytes() == before
    assert "# " in (tmp_path / "run.yaml").read_text()
    w = load_workspace()
    assert (w["profile"], w["papers"], w["data"]["npz"]["cifar10"]) == ("smoke", ["P3"], "/x.npz")

"""`l2l adapt` end to end on a tiny workspace: looks until every claim has stopped, each look a `dvc exp run
-S run.yaml:...` (here its effect: run.yaml rewritten as DVC's -S does, then the stages in order), the
budget, and a killed loop that resumes without training a run twice."""
from __future__ import annotations

import json

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from l2l.adapt import adapt, dvc_command
from tests.conftest import smoke_params, write_npz
from tests.test_pipeline import CLAIMS, run_stage
from tests.test_plan import CPU

pytestmark = pytest.mark.slow


def apply_overrides(cmd: list[str]) -> None:
    """What `dvc exp run -S run.yaml:key=value` does to run.yaml (DVC parses -S with Hydra's grammar)."""
    sets = [cmd[i + 1].split(":", 1)[1] for i, a in enumerate(cmd) if a == "-S"]
    run = yaml.safe_load(open("run.yaml"))
    for o in OverridesParser.create().parse_overrides(sets):
        run[o.key_or_group] = o.value()
    with open("run.yaml", "w") as f:
        yaml.safe_dump(run, f)


class Pipeline:
    """A stand-in for `dvc exp run` in a test workspace: the stages in order, after the -S overrides."""

    def __init__(self, fail_after_overrides: bool = False):
        self.calls: list[list[str]] = []
        self.fail = fail_after_overrides

    def __call__(self, cmd: list[str]) -> int:
        assert cmd[:3] == ["dvc", "exp", "run"]
        self.calls.append(cmd)
        apply_overrides(cmd)
        if self.fail:  # killed once run.yaml holds the look: nothing of it trained
            return 130
        for stage in ("train", "evaluate", "aggregate", "claims", "report"):
            run_stage(stage)
        return 0


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    params = smoke_params(write_npz(tmp_path / "arrays.npz"))
    params.pop("profile")  # run.yaml selects it
    params["stats"] = {**params["stats"], "sequential": {"looks": {"smoke": [2, 3]}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump({**CLAIMS, "claims": CLAIMS["claims"][:1]}))
    (tmp_path / "throughput.json").write_text(json.dumps({"measurements": {"Test CPU": CPU}}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"profile": "smoke", "papers": "all", "seeds": "profile"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_stage("data")
    return tmp_path


def _results(ws) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (ws / "runs").glob("*/result.json")}


def test_looks_until_every_claim_stops_resuming_a_killed_look(workspace, capsys):
    kw = {"throughput": workspace / "throughput.json", "timing": workspace / "none.json"}
    assert adapt(1000.0, runner=(killed := Pipeline(fail_after_overrides=True)), **kw) == 130  # look 1, killed
    assert len(killed.calls) == 1 and not _results(workspace)
    pipeline = Pipeline()
    assert adapt(1000.0, runner=pipeline, max_looks=1, **kw) == 0  # look 1 again: it had not finished
    assert "run.yaml's look, unfinished" in capsys.readouterr().out
    first = _results(workspace)
    assert len(first) == 2  # seeds 0 and 1
    nxt = json.loads((workspace / "results/next_look.json").read_text())
    assert nxt["adds"] == {"conventional": {"cnn": {"cifar10": [2]}}} and nxt["look"] == 2
    assert adapt(1000.0, runner=pipeline, **kw) == 0  # look 2: the cap; then nothing is left
    out = capsys.readouterr().out
    assert "look 2: up to 3 seeds per arm, 1 runs to train" in out and "every claim has stopped" in out
    after = _results(workspace)
    assert len(after) == 3 and all(after[h] == t for h, t in first.items())  # no run trained twice
    assert yaml.safe_load(open("run.yaml"))["seeds"] == {"conventional": {"cnn": {"cifar10": [0, 1, 2]}}}
    rec = json.loads((workspace / "results/claims.json").read_text())["claims"][0]
    assert [x["seeds"] for x in rec["sequential"]["looks"]] == [2, 3] and rec["sequential"]["status"] == "stopped"
    report = (workspace / "reports/report.md").read_text()
    assert "Looks taken and what each verdict cost" in report and "2 seeds: continue; 3 seeds: " in report
    assert "Next look: none, every claim has stopped." in report
    n = len(pipeline.calls)
    assert adapt(1000.0, runner=pipeline, **kw) == 0 and len(pipeline.calls) == n  # nothing left: no dvc exp run


def test_a_look_that_would_pass_the_budget_is_not_started(workspace, capsys):
    runner = Pipeline()
    assert adapt(1e-9, runner=runner, throughput=workspace / "throughput.json", timing=workspace / "none.json") == 0
    assert not runner.calls and "it would pass the budget" in capsys.readouterr().out


def test_the_look_goes_to_dvc_as_overrides_it_parses():
    cmd = dvc_command("smoke", ["P3"], {("layerwise", "p3_k1", "cifar10"): (0, 1, 2)}, "l2l adapt: look 2")
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(
        [cmd[i + 1].split(":", 1)[1] for i, a in enumerate(cmd) if a == "-S"])}
    assert parsed == {"profile": "smoke", "papers": ["P3"], "seeds": {"layerwise": {"p3_k1": {"cifar10": [0, 1, 2]}}}}

"""The report's reading of claims: what its top says, how it folds, rounds and draws (from claim records
that l2l.claims.check makes out of planted runs, or planted records where a case needs one)."""
import json

import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from l2l.claims import check, load_claims
from l2l.io import write_json
from l2l.claims_report import claim_figure, claims_sections, forest_figure, ours
from l2l.report import Doc, format_interval
from stages.claims import claims_metrics
from tests.conftest import config_of
from tests.test_claims import CLAIMS, params, runs_frame, write  # noqa: F401 (params: the fixture)


def records(tmp_path, params, seeds, **provenance):
    doc = json.loads(json.dumps(CLAIMS))
    doc["claims"][1].update(provenance)
    claims = load_claims(config_of(params), write(tmp_path, doc))
    return check(claims, runs_frame(seeds=seeds), pd.DataFrame(), None, "paper", alpha=0.05, min_seeds=3)


def by_id(recs):
    return {r["id"]: r for r in recs}


def errorbars(fig) -> int:
    return sum(isinstance(c, ErrorbarContainer) for ax in fig.axes for c in ax.containers)


def section(tmp_path, recs) -> Doc:
    write_json(tmp_path / "claims.json", {"profile": "paper", "verdict_rule": "- a rule",
                                          "settings": {"alpha": 0.05, "min_seeds": 3}, "claims": recs})
    doc = Doc()
    claims_sections(doc, tmp_path)
    return doc


def test_not_run_claims_fold_into_one_line_per_cause(tmp_path, params):
    recs = records(tmp_path, params, range(6))
    (real,) = [r for r in recs if r.get("comparison") is None]  # PX-C3: its cifar100 runs are not planned
    assert real["why"] == "its runs are not in profile paper" and "cifar100" in real["reason"]
    planted = [dict(real, id=f"PX-N{i}", why=why) for i, why in
               enumerate(["cause one", "cause one", "cause two", "cause two", "cause three"])]
    md = section(tmp_path, [r for r in recs if r.get("comparison")] + planted).markdown()
    folded = md.split("### Not run in profile paper (5 claims)\n\n")[1].split("\n\n")[0].splitlines()
    assert folded == ["- **2 claims**: cause one (PX 2); lacking cnn on cifar100",
                      "- **2 claims**: cause two (PX 2); lacking cnn on cifar100",
                      "- **1 claim**: cause three (PX 1); lacking cnn on cifar100"]
    assert "PX-N0" not in md  # not-run claims are counted, not listed row by row


def test_an_interval_from_two_seeds_is_neither_drawn_nor_printed(tmp_path, params):
    two, six = by_id(records(tmp_path, params, range(2))), by_id(records(tmp_path, params, range(6)))
    for rid in ("PX-C1", "PX-C2"):
        assert errorbars(claim_figure(two[rid])) == 0 and errorbars(claim_figure(six[rid])) == 1
    assert "interval too wide, n=2" in ours(two["PX-C1"]) and "[" not in ours(two["PX-C1"])
    assert "[" in ours(six["PX-C1"]) and "too wide" not in ours(six["PX-C1"])
    checked = lambda recs: [r for r in recs.values() if r.get("comparison")]  # noqa: E731
    assert errorbars(forest_figure(checked(two))) == 0 and errorbars(forest_figure(checked(six))) == 3


def test_a_paired_claim_is_drawn_seed_by_seed_with_its_differences(tmp_path, params):
    rec = by_id(records(tmp_path, params, range(6)))["PX-C1"]
    arms, diffs = claim_figure(rec).axes
    assert len(arms.lines) == 6  # one line per seed across the two arms
    assert diffs.get_title() == "per-seed difference"
    a, b = rec["arms"]["a"]["values"], rec["arms"]["b"]["values"]
    plotted = sorted(diffs.collections[0].get_offsets()[:, 1])
    assert plotted == pytest.approx(sorted(a[s] - b[s] for s in a))


def test_numbers_are_rounded_to_what_the_interval_supports():
    assert format_interval(306.698048, 300.1, 313.3, n=5, limits=None) == "306.7 [300.1, 313.3]"
    assert format_interval(23.8, 21.26, 26.34, n=3) == "23.8 [21.3, 26.3]"
    assert format_interval(23.8123, 23.76, 23.86, n=8) == "23.81 [23.76, 23.86]"
    assert format_interval(21.8, -12.5, 56.1, n=3) == "22 (interval too wide, n=3)"  # below 0% accuracy
    assert format_interval(-0.4, -30.0, 29.0, n=2, limits=None, signed=True) == "0 (interval too wide, n=2)"


def test_the_top_names_claims_by_text_with_provenance_and_html_has_no_literal_markdown(tmp_path, params):
    recs = records(tmp_path, params, range(6), stated_in="table 1",
                   harness_choices={"budget": "the profile's epochs"})
    doc = section(tmp_path, recs)
    md = doc.markdown()
    top = md.split("## Claims at a glance")[1].split("### Not run")[0]
    assert "| base reaches 50. `PX-C2` | table 1 | 50.0 |" in top and "forest.png" in top
    assert "the harness's choices, not the paper's: budget: the profile's epochs" in md
    page = doc.html("t")
    assert "**" not in page and "<strong>" in page and "<code>PX-C2</code>" in page


def test_dvc_metrics_hold_each_checked_claims_estimate_interval_and_verdict(tmp_path, params):
    recs = by_id(records(tmp_path, params, range(6)))
    metrics = claims_metrics(list(recs.values()))
    assert set(metrics) == {"PX-C1", "PX-C2", "PX-C4"}  # PX-C3 was not run: nothing to compare
    assert all(set(m) == {"estimate", "ci_low", "ci_high", "verdict"} for m in metrics.values())
    c = recs["PX-C2"]["comparison"]  # a reported value: ours minus the paper's 50
    assert metrics["PX-C2"]["estimate"] == round(c["mean_a"] - 50.0, 2)
    assert metrics["PX-C2"]["ci_low"] == round(c["ci_low"] - 50.0, 2)

"""What a reader sees first: the verdicts counted per paper (report, DVC metrics), one line per undecided
primary claim with what would decide it, one rule for showing an interval in the report, results/metrics.json,
the claims' DVC metrics and MLflow, and learning-curve panels drawn only where there is a curve."""
import json

import pandas as pd
import pytest

from l2l.claims_report import ours, shown_interval
from l2l.findings import report_top, tally_table, undecided_lines, verdict_counts
from l2l.io import write_json
from l2l.report import Doc, learning_curves
from l2l.results import group_metrics, summarise
from stages.claims import claims_metrics, write_verdict_counts
from tests.test_claims import params  # noqa: F401 (the fixture)
from tests.test_report import by_id, records


def planted(recs):
    """The records of tests.test_report, plus a sensitivity claim and a second paper, for a tally."""
    extra = dict(by_id(recs)["PX-C1"], id="PX-S1", role="sensitivity", verdict="supported")
    other = dict(by_id(recs)["PX-C3"], id="PY-C1", paper="PY")
    return recs + [extra, other]


def test_the_tally_counts_each_papers_claims_per_verdict_primary_in_parentheses(tmp_path, params):
    recs = planted(records(tmp_path, params, range(3)))
    verdicts = {r["id"]: r["verdict"] for r in recs}
    assert verdicts["PX-C3"] == verdicts["PY-C1"] == "not run"
    table = tally_table(recs).set_index("paper")
    px = [r for r in recs if r["paper"] == "PX"]
    n = {v: sum(r["verdict"] == v for r in px) for v in ("supported", "contradicted", "inconclusive", "not run")}
    assert table.loc["PX", "claims (primary)"] == f"{len(px)} ({len(px) - 1})"
    assert table.loc["PX", "supported"] == f"{n['supported']} ({n['supported'] - 1})"  # PX-S1 is sensitivity
    assert table.loc["PY"].tolist() == ["1 (1)", "0", "0", "0", "1 (1)"]
    assert table.loc["**all**", "not run"] == "2 (2)"
    counts = verdict_counts(recs)
    assert counts["PY"] == {"supported": 0, "contradicted": 0, "inconclusive": 0, "not_run": 1}
    assert counts["all"] == {k: counts["PX"][k] + counts["PY"][k] for k in counts["PX"]}
    write_verdict_counts(recs, tmp_path / "verdicts")
    write_verdict_counts(recs[:4], tmp_path / "verdicts")  # a selection without PY: its file goes
    assert sorted(p.name for p in (tmp_path / "verdicts").iterdir()) == ["PX.json", "all.json"]


def test_each_undecided_primary_claim_gets_one_line_with_what_would_decide_it(tmp_path, params):
    recs = by_id(records(tmp_path, params, range(3)))
    lines = undecided_lines(list(recs.values()), "paper")
    undecided = [i for i, r in recs.items() if r["verdict"] in ("inconclusive", "not run")]
    assert len(lines) == len(undecided) and {"PX-C2", "PX-C3"} <= set(undecided)
    by = {i: next(line for line in lines if f"`{i}`" in line) for i in undecided}
    needed = recs["PX-C2"]["comparison"]["seeds_needed"]
    assert f"about {needed} seeds per arm for 80% power" in by["PX-C2"] and "(3 now)" in by["PX-C2"]
    assert "runs of better (cnn), base (cnn) on cifar100, which profile paper does not train" in by["PX-C3"]
    smoke = undecided_lines([dict(recs["PX-C2"], verdict="inconclusive (smoke scale)")], "smoke")
    assert smoke == ["- `PX-C2` **inconclusive (smoke scale)**: base reaches 50. Needs the paper profile "
                     "(`dvc repro`): the smoke scale decides nothing."]
    assert undecided_lines([dict(recs["PX-C2"], role="sensitivity")], "paper") == []  # primary claims only


def test_the_report_opens_with_the_tally_then_the_undecided_claims(tmp_path, params):
    recs = records(tmp_path, params, range(3))
    write_json(tmp_path / "claims.json", {"profile": "paper", "claims": recs})
    doc = Doc()
    report_top(doc, tmp_path)
    md = doc.markdown()
    assert md.startswith("## What it found\n") and md.index("| PX |") < md.index("**Undecided primary claims** (")


def test_one_interval_rule_for_report_dvc_metrics_and_mlflow(tmp_path, params, monkeypatch):
    two, six = by_id(records(tmp_path, params, range(2))), by_id(records(tmp_path, params, range(6)))
    for recs, shown in ((two, False), (six, True)):
        for rid in ("PX-C1", "PX-C2"):
            assert (shown_interval(recs[rid]) is not None) == shown
            assert ("[" in ours(recs[rid])) == shown  # the report's text
            assert ({"ci_low", "ci_high"} <= set(claims_metrics([recs[rid]])[rid])) == shown  # DVC
    runs = pd.DataFrame([{"experiment": "e", "method": "m", "model": "cnn", "dataset": "cifar10", "seed": s,
                          "final_test_acc": 50.0 + s, **{k: 1.0 for k in ("best_test_acc", "final_val_acc",
                                                                          "best_val_acc", "train_seconds")}}
                         for s in range(3)])
    assert "test_acc_ci_low" in group_metrics(summarise(runs))["e/cnn/cifar10"]
    assert "test_acc_ci_low" not in group_metrics(summarise(runs[runs.seed < 2]))["e/cnn/cifar10"]

    import mlflow

    from l2l.tracking import log_claims

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rule = {"show_interval": lambda r: shown_interval(r) is not None, "ours": ours}
    log_claims("paper", [six["PX-C1"]], **rule)  # six seeds: shown
    log_claims("paper", [two["PX-C1"]], **rule)  # re-checked on two: the interval is withdrawn
    log_claims("paper", [dict(two["PX-C2"])], **rule)  # two seeds from the start: never logged
    c = mlflow.MlflowClient()
    runs = {r.data.tags["l2l.claim_id"]: r for r in c.search_runs(
        [c.get_experiment_by_name("l2l-paper-claims").experiment_id], filter_string="tags.`l2l.kind` = 'claim'")}
    assert [m.value for m in c.get_metric_history(runs["PX-C1"].info.run_id, "ci_low")][0] == pytest.approx(
        six["PX-C1"]["comparison"]["ci_low"])
    assert pd.isna(runs["PX-C1"].data.metrics["ci_low"]) and "diff" in runs["PX-C1"].data.metrics
    assert "ci_low" not in runs["PX-C2"].data.metrics
    assert runs["PX-C2"].data.tags["l2l.ours"] == ours(two["PX-C2"]) and "too wide" in ours(two["PX-C2"])


def curve(epochs: int, val: bool) -> pd.DataFrame:
    rows = [{"epoch": e + 1, "phase": "p", "n": 3, **{f"{m}_{k}": (float("nan") if m == "val_acc" and not val
                                                                   else 50.0 + e + d)
                                                      for m in ("train_loss", "val_acc")
                                                      for k, d in (("mean", 0), ("low", -1), ("high", 1))}}
            for e in range(epochs)]
    return pd.DataFrame(rows)


def test_a_panel_with_no_curve_is_not_drawn_and_why_is_said_once(tmp_path):
    (tmp_path / "curves").mkdir()
    pd.DataFrame({"dataset": ["cifar10"], "metric": ["top-1 accuracy (%)"]}).to_csv(tmp_path / "runs.csv")
    groups = {"full__cnn__cifar10": (3, True), "noval__cnn__cifar10": (3, False),  # cnn: both panels
              "noval__p3__cifar10": (3, False), "short__p3__cifar10": (1, True),  # p3: training loss only
              "short__vgg__cifar10": (1, True)}  # vgg: nothing to show, no figure
    for name, (epochs, val) in groups.items():
        curve(epochs, val).to_csv(tmp_path / "curves" / f"{name}.csv", index=False)
    doc = Doc()
    learning_curves(doc, tmp_path)
    figures = {b[1]: b for b in doc.blocks if b[0] == "figure"}
    assert sorted(figures) == ["curves_cnn_cifar10", "curves_p3_cifar10"]
    width = {name: int.from_bytes(doc.figures[name][16:20], "big") for name in figures}  # PNG header
    assert width["curves_p3_cifar10"] * 2 == width["curves_cnn_cifar10"]  # one panel, not two
    md = doc.markdown()
    assert md.count("Not drawn, having nothing to show") == 1
    assert "- no validation split (split.val_size 0): noval (cnn, cifar10) validation; noval (p3, cifar10) " \
           "validation" in md
    assert "- one epoch (a single point is no curve): short (p3, cifar10); short (vgg, cifar10)" in md
    json.dumps(md)

"""The P4/P5 report tables and figures, from hand-made results tables with known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from l2l.report import Doc
from l2l.teacher_report import (accuracy_latency_figure, distill_table, generation_figure, generation_table,
                                teacher_student_section)

GROUP = {"model": "p4_resnet", "dataset": "cifar10"}


def phase_rows(run, experiment, method, model, seed, phase, **metrics) -> list[dict]:
    return [{"run": run, "experiment": experiment, "method": method, "model": model, "dataset": "cifar10",
             "seed": seed, "phase": phase, "metric": k, "value": v} for k, v in metrics.items()]


def generations_df() -> pd.DataFrame:
    rows = []
    for exp, base in (("p4_strict", 60.0), ("p4_tolerant", 58.0)):
        for seed in (0, 1, 2):
            for g in range(3):
                rows += phase_rows(f"{exp}{seed}", exp, "generations", "p4_resnet", seed, f"gen{g}",
                                   final_test_acc=base + 2 * g + seed, ensemble_final_test_acc=base + 3 * g + seed,
                                   confidence=0.9 - 0.1 * g, entropy=0.3 + 0.1 * g, final_val_acc=50.0)
    return pd.DataFrame(rows)


def distill_dfs() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, runs = [], []
    for model, acc, flops, lat1 in (("small", 50.0, 1e6, 2.0), ("narrow_deep", 55.0, 2e6, 4.0)):
        for seed in (0, 1):
            run = f"{model}{seed}"
            rows += phase_rows(run, "p5_distill", "distill", model, seed, "student", final_test_acc=acc + seed,
                               params=1000.0, flops=flops, latency_fp32_b1_ms=lat1 * (1 + seed),
                               latency_fp32_b256_ms=10 * lat1, teacher_final_test_acc=60.0 + seed,
                               teacher_params=5000.0, teacher_flops=1e7,
                               teacher_latency_fp32_b1_ms=20.0, teacher_latency_fp32_b256_ms=200.0)
            runs.append({"run": run, "experiment": "p5_distill", "method": "distill", "model": model,
                         "dataset": "cifar10", "seed": seed, "final_test_acc": acc + seed, "device_name": "cpu x"})
            runs.append({"run": f"b{run}", "experiment": "p5_baseline", "method": "conventional", "model": model,
                         "dataset": "cifar10", "seed": seed, "final_test_acc": acc - 3 + seed, "device_name": "cpu x"})
    for seed in (0, 1):  # the teacher run of each seed (a conventional run of its model): no student's baseline
        runs.append({"run": f"t{seed}", "experiment": "p5_teacher", "method": "conventional", "model": "p5_teacher",
                     "dataset": "cifar10", "seed": seed, "final_test_acc": 99.0, "device_name": "cpu x"})
    return pd.DataFrame(runs), pd.DataFrame(rows)


def test_generation_table_means_and_intervals():
    t = generation_table(generations_df())
    assert len(t) == 6 and list(t["generation"][:3]) == [0, 1, 2]
    r = t[(t["experiment"] == "p4_tolerant") & (t["generation"] == 2)].iloc[0]
    assert r["n"] == 3 and r["test_acc"] == pytest.approx(58 + 4 + 1)  # seeds add 0, 1, 2
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd = 1
    assert r["test_acc_low"] == pytest.approx(63 - half) and r["test_acc_high"] == pytest.approx(63 + half)
    assert r["ensemble_test_acc"] == pytest.approx(58 + 6 + 1)
    assert r["confidence"] == pytest.approx(0.7) and r["entropy"] == pytest.approx(0.5)


def test_generation_figure_draws_each_line():
    fig = generation_figure(generations_df())
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    acc = fig.axes[0]
    assert len(acc.lines) == 4  # per experiment: generations and ensemble
    np.testing.assert_allclose(acc.lines[0].get_ydata(), [61, 63, 65])  # strict means over seeds
    np.testing.assert_allclose(fig.axes[1].lines[1].get_ydata(), [0.9, 0.8, 0.7])


def test_distill_table_and_accuracy_latency_figure():
    runs_df, phases_df = distill_dfs()
    t = distill_table(runs_df, phases_df)
    assert list(t["model"]) == ["teacher (options.teacher)", "narrow_deep", "narrow_deep", "small", "small"]
    assert list(t["role"]) == ["teacher"] + ["KD student (p5_distill)", "no-KD baseline"] * 2
    teacher = t.iloc[0]
    assert teacher["test_acc"] == pytest.approx(60.5) and teacher["flops"] == 1e7
    assert teacher["latency_fp32_b1_ms"] == 20.0
    nd = t[(t["model"] == "narrow_deep") & (t["role"] == "KD student (p5_distill)")].iloc[0]
    assert nd["test_acc"] == pytest.approx(55.5) and nd["latency_fp32_b1_ms"] == pytest.approx(6.0)  # median of 4, 8
    base = t[(t["model"] == "narrow_deep") & (t["role"] == "no-KD baseline")].iloc[0]
    assert base["test_acc"] == pytest.approx(52.5) and base["flops"] == 2e6  # the architecture's costs
    fig = accuracy_latency_figure(runs_df, phases_df)
    assert len(fig.axes) == 2  # batch 1 and batch 256
    assert "batch 256" in fig.axes[1].get_xlabel() and fig.axes[0].get_xscale() == "log"


def test_section_renders_both_parts(tmp_path):
    runs_df, phases_df = distill_dfs()
    pd.concat([phases_df, generations_df()]).to_csv(tmp_path / "phases.csv", index=False)
    runs_df.to_csv(tmp_path / "runs.csv", index=False)
    doc = Doc()
    teacher_student_section(doc, tmp_path)
    md = doc.markdown()
    assert "P4: training in generations" in md and "P5: distillation" in md
    assert set(doc.figures) == {"p4_generations", "p5_accuracy_latency"}
    assert "cpu x" in md
    empty = Doc()
    pd.DataFrame(columns=phases_df.columns).to_csv(tmp_path / "phases.csv", index=False)
    teacher_student_section(empty, tmp_path)
    assert empty.blocks == []

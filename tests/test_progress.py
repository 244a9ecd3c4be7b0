"""Progress: log lines without carriage returns when stderr is not a terminal; on a terminal a
stage bar and a run bar with log lines on their own lines; the stage's ETA from the cost model's
estimates, then scaled by what finished runs took; one run count across every wave."""
import io
import logging
import re
import sys

import pytest

from l2l.progress import RunProgress, StageProgress, bars_around_logging

ROW = {"phase": "train", "epoch": 0, "phase_epochs": 2, "train_loss": 1.234, "train_acc": 40.0, "val_acc": 38.5,
       "images_per_s": 900.0}


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows for `text`: \\r returns to column 0, ESC[A moves a line up, \\n down."""
    lines, row, col = [""], 0, 0
    for token in re.split(r"(\r|\n|\x1b\[A)", re.sub(r"\x1b\[[0-9;]*[BCDKm]", "", text)):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token == "\x1b[A":
            row = max(0, row - 1)
        elif token:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [line.rstrip() for line in lines]


@pytest.fixture
def log_to(monkeypatch):
    """The root logger writing to `stream` (as setup_logging does to stderr); returns the stream."""
    def attach(stream):
        monkeypatch.setattr(sys, "stderr", stream)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        root = logging.getLogger()
        monkeypatch.setattr(root, "handlers", [handler])
        monkeypatch.setattr(root, "level", logging.INFO)
        return stream
    return attach


def test_not_a_terminal_gives_clean_lines(log_to):
    err = log_to(io.StringIO())
    stage = StageProgress(["h1", "h2"], {"h1": 60.0, "h2": 60.0})
    run = RunProgress("conventional/cnn/cifar10/s0")
    assert not stage.bars and not run.bars
    with bars_around_logging(stage.bars):
        stage.started("h1", "conventional/cnn/cifar10/s0")
        run.phase("train", 2, 0)
        run.epoch(ROW)
        run.epoch({**ROW, "epoch": 1})
        run.close()
        stage.finished("h1", "conventional/cnn/cifar10/s0")
    stage.close()
    out = err.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[:3] == [
        "INFO [1/2] h1: conventional/cnn/cifar10/s0",
        "INFO conventional/cnn/cifar10/s0 train ep 1/2: loss 1.234 acc 40.0 val 38.5 900 img/s",
        "INFO conventional/cnn/cifar10/s0 train ep 2/2: loss 1.234 acc 40.0 val 38.5 900 img/s"]
    assert len(lines) == 4 and lines[3].startswith("INFO [1/2 runs] h1 conventional/cnn/cifar10/s0 done; stage ETA ")


def test_on_a_terminal_log_lines_never_glue_onto_the_bars(log_to):
    tty = log_to(FakeTerminal())
    stage = StageProgress(["h1", "h2"], {"h1": 60.0, "h2": 60.0}, clock=lambda: 0.0)
    run = RunProgress("conventional/cnn/cifar10/s0")
    assert stage.bars and run.bars
    with bars_around_logging(stage.bars):
        run.phase("train", 2, 0)
        run.epoch(ROW)
        logging.getLogger("l2l.test").warning("a message while the bars are drawn")
        run.epoch({**ROW, "epoch": 1})
        run.close()
        stage.finished("h1", "conventional/cnn/cifar10/s0")
    stage.close()
    shown = [line for line in screen(tty.getvalue()) if line]
    assert "WARNING a message while the bars are drawn" in shown  # a line of its own, nothing glued to it
    assert any(line.startswith("INFO [1/2 runs] h1 conventional/cnn/cifar10/s0 done") for line in shown)
    bar = [line for line in shown if line.startswith("train: ")]
    assert bar and bar[-1].startswith("train: 1/2 runs") and "ETA" in bar[-1]


def test_eta_from_the_cost_model_then_scaled_by_measured_runs():
    now = [0.0]
    stage = StageProgress(["a", "b", "c"], {"a": 10.0, "b": 10.0, "c": 20.0}, parallel=2, bars=False,
                          clock=lambda: now[0])
    assert stage.eta() == (20.0, "cost model, not yet measured here")  # 40 s of runs, two at a time
    now[0] = 30.0
    stage.finished("a", "run a")  # estimated 10 s, took 30 s: this machine is 3x slower than estimated
    assert stage.eta() == (90.0, "cost model x3.00 as measured here")
    stage.finished("b", "run b", RuntimeError("boom"))  # a failed run leaves the runs left, not the rate
    assert stage.eta()[0] == 60.0 and (stage.done, stage.failed) == (1, 1)
    assert StageProgress(["a", "x"], {"a": 1.0}, bars=False).eta()[0] is None  # a run without an estimate


def test_the_run_count_spans_every_wave(tmp_path, monkeypatch, caplog):
    from tests.test_executor import _config, _fake_backend, _teacher_and_students

    from l2l.executor import run_plan

    teachers, students = _teacher_and_students()
    calls = _fake_backend(monkeypatch)
    with caplog.at_level(logging.INFO, logger="l2l.progress"):
        run_plan(students + teachers, _config(), root=tmp_path)
    assert len(calls) == 2  # two waves
    n = len(teachers) + len(students)
    counts = [m.split("]")[0] for m in caplog.messages if m.startswith("[") and " runs]" in m]
    assert counts == [f"[{i}/{n} runs" for i in range(1, n + 1)]

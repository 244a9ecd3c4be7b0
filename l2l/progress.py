"""Progress of the train stage, for a person watching it.

On a terminal: one bar for the stage (runs done of the whole plan, across every wave; the ETA from
the cost model's per-run estimates, scaled by what the finished runs took here) and one bar for the
run being trained (its phase, epoch and last metrics); log lines print above the bars
(:func:`bars_around_logging`), never glued onto them. Not on a terminal (CI, DVC's log, nohup), or in
a worker process: no bars, one log line per epoch and per run, no carriage returns.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)


def bars_enabled(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def bars_around_logging(bars: bool) -> Iterator[None]:
    """While bars are drawn, the root logger's console handlers write through tqdm (above the bars)."""
    with logging_redirect_tqdm() if bars else contextlib.nullcontext():
        yield


def epoch_summary(row: dict) -> str:
    return (f"loss {row['train_loss']:.3f} acc {row['train_acc']:.1f} val {row['val_acc']:.1f} "
            f"{row['images_per_s']:.0f} img/s")


class RunProgress:
    """One run: a bar (phase, epoch of the phase, last epoch's metrics) or a log line per epoch."""

    def __init__(self, label: str, bars: bool | None = None, stream: TextIO | None = None):
        self.label, self.stream = label, stream or sys.stderr
        self.bars = bars_enabled(self.stream) if bars is None else bars
        self.bar = None

    def phase(self, name: str, total: int, initial: int) -> None:
        self.name, self.total = name, total
        if not self.bars:
            return
        if self.bar is None:  # one bar for the whole run, reset per phase: it stays on its line
            self.bar = tqdm(total=total, initial=initial, desc=f"{self.label} {name}", unit="ep", leave=False,
                            dynamic_ncols=True, position=1, file=self.stream)
        else:
            self.bar.reset(total=total)
            self.bar.update(initial)
        self.bar.set_description_str(f"{self.label} {name}", refresh=False)

    def epoch(self, row: dict) -> None:
        msg = epoch_summary(row)
        if self.bar is not None:
            self.bar.set_postfix_str(msg, refresh=False)
            self.bar.update(1)
        else:
            log.info("%s %s ep %d/%d: %s", self.label, row["phase"], row["epoch"] + 1, row["phase_epochs"], msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class StageProgress:
    """Runs done of the stage's runs (every wave: the count never restarts) and the stage's ETA.

    estimates: the cost model's seconds per run hash (l2l.cost), None where it has none. Until a run
    finishes the ETA is the estimates of the runs left divided by the `parallel` runs at a time;
    then it is those estimates times (the stage's wall time so far / the estimates of the runs done),
    so a machine slower or faster than the benchmark's, or parallel runs, are measured, not assumed.
    """

    def __init__(self, hashes: list[str], estimates: dict[str, float | None] | None = None, parallel: int = 1,
                 bars: bool | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.left = len(hashes), list(hashes)
        self.estimates, self.parallel, self.clock = estimates or {}, max(1, parallel), clock
        self.done = self.failed = 0
        self.estimated_done, self.start_time = 0.0, clock()
        stream = stream or sys.stderr
        self.bars = bars_enabled(stream) if bars is None else bars
        self.bar = tqdm(total=self.total, desc="train", unit="run", position=0, leave=True, dynamic_ncols=True,
                        file=stream, bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed}{postfix}"
                        ) if self.bars else None
        self._refresh()

    def eta(self) -> tuple[float | None, str]:
        """(seconds left, how they were obtained); None where a run left has no estimate."""
        if not self.left:
            return 0.0, "done"
        left = [self.estimates.get(h) for h in self.left]
        if any(v is None for v in left):
            return None, "no cost estimate (benchmarks/throughput.json)"
        if self.estimated_done > 0:
            ratio = (self.clock() - self.start_time) / self.estimated_done
            return sum(left) * ratio, f"cost model x{ratio:.2f} as measured here"
        return sum(left) / self.parallel, "cost model, not yet measured here"

    def eta_text(self) -> str:
        seconds, how = self.eta()
        return f"ETA {'?' if seconds is None else _clock(seconds)} ({how})"

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.eta_text() + (f", {self.failed} failed" if self.failed else ""))

    def started(self, run_hash: str, label: str) -> None:
        if self.bar is None:
            log.info("[%d/%d] %s: %s", self.done + self.failed + 1, self.total, run_hash, label)

    def finished(self, run_hash: str, label: str, error: BaseException | None = None) -> None:
        """A task ended: one run, or a stack of runs (hashes joined by "+", l2l.executor.Stack), each counted;
        with an error, the runs it names in `hashes` failed (all of them where it names none)."""
        runs = run_hash.split("+")
        failed = set(getattr(error, "hashes", None) or runs) if error is not None else set()
        for h in runs:
            if h in self.left:
                self.left.remove(h)
            if h in failed:
                self.failed += 1
            else:
                self.done += 1
                self.estimated_done += self.estimates.get(h) or 0.0
        n = self.done + self.failed
        outcome = "done" if error is None else f"FAILED: {error}"
        log.info("[%d/%d runs] %s %s %s; stage %s", n, self.total, run_hash, label, outcome, self.eta_text())
        if self.bar is not None:
            self._refresh()
            self.bar.update(len(runs))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

"""What every DVC stage shares: its paths, logging, and one-line errors with a non-zero exit for
bad input. (The plan of prepared data: l2l.config.prepared_plan; data on the device: l2l.data.)"""
from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Callable

from l2l import workspace
from l2l.checks import ClusterError, ConfigError, DataError, IntegrityError, LockedError, RunsFailed
from l2l.io import no_space
from l2l.tracking import store_fault

RUNS = Path("runs")
EVALS = Path("evals")
RESULTS = Path("results")
REPORTS = Path("reports")
log = logging.getLogger("l2l")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Expected failures: bad params or data, a result file that fails verification (invalid, truncated,
# not its recorded sha256), a run folder another trainer holds, runs that failed (their tracebacks, if
# any, are in the log above), remote workers that cannot train (a node without the checkout or MLflow),
# a file the OS refuses (missing, no space...). Anything else is a bug: traceback.
EXPECTED = (ConfigError, DataError, IntegrityError, LockedError, RunsFailed, ClusterError, OSError)


def main(stage: Callable[[], None]) -> None:
    """Run a stage; an expected failure ends in one line on stderr and exit status 2; a stop by
    signal (SIGTERM, Ctrl-C) in one line and 130. Run by DVC, the stage holds the workspace's selection
    while it runs, and fails if params.yaml or run.yaml changed meanwhile (l2l.workspace)."""
    setup_logging()
    name = Path(sys.argv[0]).stem
    try:
        with workspace.hold(name):
            if workspace.run_by_dvc():
                workspace.let_git_see()
            before = workspace.snapshot()
            stage()
            changed = workspace.changes(before)
            if changed:
                raise ConfigError(f"{changed}: changed while stage {name} ran; its outputs follow the selection it "
                                  "started with and DVC records nothing of them: run the pipeline again for the "
                                  "selection the files hold now")
    except Exception as e:
        line = expected_line(e)
        if line is None:
            raise
        print(f"l2l: error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"l2l: {e or 'interrupted'}: re-run to continue (runs resume from their last resume state)", file=sys.stderr)
        sys.exit(130)


def expected_line(e: BaseException) -> str | None:
    """The one line of an expected failure (None: a bug, whose traceback says more): a fault of the MLflow
    store (l2l.tracking.store_fault), a file system out of space (naming the file), or an EXPECTED error."""
    fault = store_fault(e)
    if fault is not None:
        return fault
    full = no_space(e)
    if full is not None:
        return _no_space_line(full)
    return _one_line(e) if isinstance(e, EXPECTED) else None


def _no_space_line(e: OSError) -> str:
    """The line for a write the file system refused (full, quota, file-size limit): the file it was
    writing (else the working directory), the free space, and what to do."""
    path = Path(e.filename) if e.filename else Path.cwd()
    if e.errno == errno.EFBIG:
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limit = "" if soft == resource.RLIM_INFINITY else f": {soft / 2**20:,.1f} MiB"
        what = f"over the file-size limit (ulimit -f{limit}): raise it"
    else:
        try:
            free = f" ({shutil.disk_usage(path if path.is_dir() else path.parent).free / 2**20:,.0f} MiB free)"
        except OSError:
            free = ""
        what = ("its file system is full" if e.errno == errno.ENOSPC else "over the disk quota") + f"{free}: free space"
    where = f"{path}: writing it failed" if e.filename else f"{path}: a write under this folder failed"
    return (f"{where} ({os.strerror(e.errno)}): {what}, then re-run (nothing half-written is kept; runs resume "
            "from their last resume state)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # The OS's own errors say what failed only with their type (e.g. PermissionError); ours say it all.
    return f"{type(e).__name__}: {text}" if isinstance(e, OSError) and e.errno is not None else text

"""What every DVC stage shares: its paths, logging, and one-line errors with a non-zero exit for
bad input. (The plan of prepared data: l2l.config.prepared_plan; data on the device: l2l.data.)"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

from l2l import workspace
from l2l.checks import ConfigError, DataError, IntegrityError, LockedError, RunsFailed

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
# any, are in the log above), a file the OS refuses (missing, no space...). Anything else is a bug: traceback.
EXPECTED = (ConfigError, DataError, IntegrityError, LockedError, RunsFailed, OSError)


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
    except EXPECTED as e:
        print(f"l2l: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"l2l: {e or 'interrupted'}: re-run to continue (runs resume from their last resume state)", file=sys.stderr)
        sys.exit(130)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # The OS's own errors say what failed only with their type (e.g. PermissionError); ours say it all.
    return f"{type(e).__name__}: {text}" if isinstance(e, OSError) and e.errno is not None else text

"""What every DVC stage shares: its paths, logging, and one-line errors with a non-zero exit for
bad input. (The plan of prepared data: l2l.config.prepared_plan; data on the device: l2l.data.)"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

from l2l.checks import ConfigError, DataError

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


def main(stage: Callable[[], None]) -> None:
    """Run a stage; bad input ends in one line on stderr and exit status 2."""
    setup_logging()
    try:
        stage()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"l2l: error: {e}", file=sys.stderr)
        sys.exit(2)

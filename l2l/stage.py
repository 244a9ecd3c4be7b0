"""What every DVC stage shares: logging, the active profile's plan, prepared data on the device,
and one-line errors with a non-zero exit for bad input."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

from l2l.config import ConfigError, DataError, RunSpec, load_params, plan, prepared_dir, resolve_profile
from l2l.io import IntegrityError, LockedError, RunsFailed, read_json

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
    signal (SIGTERM, Ctrl-C) in one line and 130."""
    setup_logging()
    try:
        stage()
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


def manifests(params: dict) -> dict[str, dict]:
    prof = resolve_profile(params)
    out = {}
    for ds in prof.datasets:
        path = prepared_dir(params, ds) / "manifest.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found: run the data stage first (dvc repro data)")
        out[ds] = read_json(path)
    return out


def current_plan(params: dict | None = None) -> tuple[dict, list[RunSpec], dict[str, dict]]:
    params = params or load_params()
    mans = manifests(params)
    return params, plan(params, {ds: m["fingerprint"] for ds, m in mans.items()}), mans


class DeviceDataCache:
    """Prepared arrays are loaded (and verified) once per dataset and kept on the device."""

    def __init__(self, params: dict, device):
        self.params, self.device, self._arrays, self._data = params, device, {}, {}

    def get(self, spec: RunSpec):
        from l2l.data import load_prepared
        from l2l.device_data import DeviceData

        aug = spec.train.get("augment", {})
        key = (spec.dataset, aug.get("crop_padding", 0), aug.get("flip", False))
        if key not in self._data:
            if spec.dataset not in self._arrays:
                self._arrays[spec.dataset] = load_prepared(prepared_dir(self.params, spec.dataset))
            arrays, manifest = self._arrays[spec.dataset]
            self._data[key] = DeviceData(arrays, spec.dataset, self.device, crop_padding=key[1], flip=key[2],
                                         channels_last=self.device.type == "cuda")
        return self._data[key], self._arrays[spec.dataset][1]["num_classes"]

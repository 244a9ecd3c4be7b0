"""Look at the MLflow UI as a user does: headless Chromium screenshots of a tracking store.

    PYTHONPATH=. python scripts/mlflow_ui_screenshots.py --store mlflow.db --out /tmp/l2l-mlflow-ui

Starts ``mlflow server`` on 127.0.0.1 over the store (l2l.tracking.mlflow_server: readiness polled,
its log printed if it gives up), then screenshots, for the profile's experiment (default l2l-smoke):

- experiment_default.png: the experiment's page as a fresh browser opens it (MLflow 3.17's global
  workflow toggle starts on "GenAI");
- experiment_runs.png: the same with ``?workflowType=machine_learning`` (the README's link): the
  training runs table, its Dataset column;
- run_overview.png: the newest run's page, tall enough for its metrics table (datasets, tags,
  logged model, the system/ metrics' values);
- run_system_metrics.png: its system metrics tab (headless Chromium may catch the charts loading);
- experiment_models.png: the experiment's logged models;
- claims_runs.png: the claims experiment (<experiment>-claims), when there is one;
- view_runs.png, view_claims.png: the harness's saved view of each (l2l.mlflow_view: run names in full,
  seed, test accuracy and verdicts as columns, runs grouped by experiment and model; the claims' verdicts).

--docs writes view_runs.png and view_claims.png (1600 pixels wide, 256 colours: small) into docs/ for the
README, from the smoke run's store.

Chromium: /usr/bin/chromium (Debian's ``chromium`` package) or --chromium. Nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from l2l.mlflow_view import VIEW_KEY
from l2l.tracking import mlflow_server

DOCS_SHOTS = ("view_runs", "view_claims")  # what --docs keeps, as docs/mlflow_<name>.png


def shoot(chromium: str, url: str, png: Path, wait_ms: int, height: int = 1000) -> None:
    """One screenshot of `url`; a fresh profile each time (no remembered workflow toggle)."""
    with tempfile.TemporaryDirectory(prefix="l2l-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size=1600,{height}", f"--virtual-time-budget={wait_ms}",
               f"--screenshot={png}", url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 or not png.exists():
        raise SystemExit(f"chromium failed on {url} (exit {out.returncode}): {out.stderr[-2000:]}")
    print(f"{png}: {url}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("mlflow.db"), help="sqlite tracking store")
    ap.add_argument("--experiment", default="l2l-smoke")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "l2l-mlflow-ui")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to render")
    ap.add_argument("--docs", type=Path, help="also write the saved views' shots, small, as <DOCS>/mlflow_*.png")
    args = ap.parse_args(argv)
    if not args.store.exists():
        raise SystemExit(f"{args.store}: no such tracking store (run the train stage first, or pass --store)")
    if not Path(args.chromium).exists():
        raise SystemExit(f"{args.chromium}: no chromium (apt-get install chromium, or pass --chromium)")
    import mlflow

    store = f"sqlite:///{args.store.resolve()}"
    c = mlflow.MlflowClient(tracking_uri=store)
    exp = c.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"{args.store}: no experiment {args.experiment!r}")
    claims = c.get_experiment_by_name(f"{args.experiment}-claims")
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"{args.store}: experiment {args.experiment!r} has no runs")
    run_id = runs[0].info.run_id
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_server(store) as uri:
        base = f"{uri}/#/experiments/{exp.experiment_id}"
        ml = "?workflowType=machine_learning"
        shots = [("experiment_default", base, 1000), ("experiment_runs", f"{base}/runs{ml}", 1000),
                 ("run_overview", f"{base}/runs/{run_id}{ml}", 2600),
                 ("run_system_metrics", f"{base}/runs/{run_id}/system-metrics{ml}", 1000),
                 ("experiment_models", f"{base}/models{ml}", 1000)]
        view = f"?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
        shots.append(("view_runs", f"{base}/runs{view}", 1000))
        if claims is not None:
            shots.append(("claims_runs", f"{uri}/#/experiments/{claims.experiment_id}/runs{ml}", 1000))
            shots.append(("view_claims", f"{uri}/#/experiments/{claims.experiment_id}/runs{view}", 1000))
        for name, url, height in shots:
            shoot(args.chromium, url, args.out / f"{name}.png", args.wait_ms, height)
    if args.docs:
        for name in DOCS_SHOTS:
            if (args.out / f"{name}.png").exists():
                small = Image.open(args.out / f"{name}.png").convert("RGB").quantize(256)
                path = args.docs / f"mlflow_{name}.png"
                small.save(path, optimize=True)
                print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    sys.exit(main())

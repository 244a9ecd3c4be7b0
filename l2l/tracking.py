"""MLflow: one MLflow run per training run, found again by the run's hash.

Store: ``sqlite:///mlflow.db`` in the working directory (the repo root for the DVC stages),
or ``MLFLOW_TRACKING_URI``. One experiment per profile (``l2l-<profile>``). A training run
re-entered after an interruption reuses its MLflow run and back-fills any epoch the store
missed, so nothing is duplicated or dropped. Several worker processes log through one
writer, :func:`single_writer`.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import yaml

from l2l.mlflow_view import view_outdated, view_tags
from l2l.tasks import task_of

log = logging.getLogger(__name__)
HASH_TAG = "l2l.run_hash"
ERROR_TAG = "l2l.error"
STEP_WITNESS = "val_acc"  # the epoch metric whose steps say which epochs the store has
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s", "updates")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# --- store faults: one line naming the store and what to do --------------------------------------

# sqlite's words for what went wrong with the store (in the exception or what it was raised from), and
# what to do about it. The damage, the lock or the full disk is the store's; no result in runs/, evals/
# or results/ depends on it (they are files of their own, hashed).
STORE_FAULTS = (
    (("database disk image is malformed", "file is not a database", "file is encrypted"),
     "damaged (truncated or overwritten): restore it from a backup, or move it aside (mv {db} {db}.damaged) to "
     "start a new store; runs/, evals/ and results/ keep every result, a new store holds what is trained, evaluated "
     "or checked from then on"),
    (("database is locked",),
     "locked by another process{holders} for longer than MLflow waits: stop that process or wait for it, then re-run"),
    (("readonly database", "read-only file system", "unable to open database file"),
     "not writable here: make it and its folder writable for this user, then re-run"),
    (("database or disk is full", "disk i/o error"),
     "not writable any more{why}: free space or raise the limit, then re-run"),
)


def _chain_text(e: BaseException) -> str:
    seen, parts = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return " ".join(parts).lower()


def _store_path() -> str:
    """The store's file (relative to the working directory when inside it), or its URI."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return uri
    path = Path(uri[len("sqlite:///"):].split("?")[0].removeprefix("file:"))
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def _lock_holders(path: str) -> str:
    """' (PID n: its command)' for the processes holding a POSIX lock on `path` (Linux's /proc/locks)."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ""
    pids = sorted({int(f[4]) for f in (ln.split() for ln in lines)
                   if len(f) > 5 and f[5].rsplit(":", 1)[-1] == str(inode) and int(f[4]) != os.getpid()})
    named = []
    for pid in pids:
        try:
            cmd = " ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0")).strip()
        except OSError:
            cmd = ""
        named.append(f"PID {pid}" + (f": {cmd[:120]}" if cmd else ""))
    return f" ({'; '.join(named)})" if named else ""


def _why_not_written(path: str) -> str:
    notes = []
    with contextlib.suppress(OSError):
        notes.append(f"{shutil.disk_usage(Path(path).parent).free / 2**20:,.0f} MiB free on its file system")
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        notes.append(f"file-size limit (ulimit -f) {soft / 2**20:,.1f} MiB")
    return f" (disk full or a file-size limit: {', '.join(notes)})" if notes else " (disk full or a file-size limit)"


def store_fault(e: BaseException) -> str | None:
    """A one-line message naming the MLflow store and what to do, if `e` is a fault of the store
    (damaged, locked, not writable, full); None for anything else."""
    text = _chain_text(e)
    for words, advice in STORE_FAULTS:
        if any(w in text for w in words):
            db = _store_path()
            fill = {"db": db, "holders": "", "why": ""}
            if "{holders}" in advice:
                fill["holders"] = _lock_holders(db)
            if "{why}" in advice:
                fill["why"] = _why_not_written(db)
            return f"{db}: the MLflow store is " + advice.format(**fill)
    return None


def client():
    # Imported lazily: mlflow takes seconds to import and most of the library never needs it.
    import mlflow

    # mlflow sets its logger to INFO on import (after setup_logging), with its own console handler
    # that writes past the progress bars: its per-run notes (system metrics monitor started...) are noise
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it logs each database error with its traceback, then raises it: the raised one says it all (one line
    # for a fault of the store, l2l.stage)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    return mlflow.MlflowClient(tracking_uri=tracking_uri())


# Files `dvc exp run` rewrites itself (-S writes run.yaml, the workspace's selection, or params.yaml;
# every run dvc.lock): a change there is the run's parameters, which its params digest (the run hash)
# records, not a change of the code.
DVC_WRITES = ("run.yaml", "params.yaml", "dvc.lock")
# MLflow 3's experiment kind ("machine learning", not "GenAI apps & agents"): the tag its UI sets when
# a user picks the kind; 3.17 opens experiments by its global workflow toggle instead (README: MLflow).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def dvc_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The paths dvc.yaml's stages write (outs, metrics, plots). After each stage `dvc exp run` stages
    (git add) those that git does not ignore (uncached outputs: results/metrics.json, results/curves...),
    so while it runs they are "added" files, which are results, not code."""
    if not dvc_yaml.exists():
        return []
    out = []
    for st in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).values():
        for key in ("outs", "metrics", "plots"):
            out += [o if isinstance(o, str) else next(iter(o)) for o in st.get(key) or []]
    return out


def git_state() -> tuple[str, list[str]]:
    """(HEAD's commit, tracked or staged files modified beyond what DVC writes: run.yaml, params.yaml,
    dvc.lock and dvc.yaml's outputs); ("unknown", []) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", []
    outputs = [o.rstrip("/") for o in dvc_outputs()]

    def dvc_wrote(path: str) -> bool:
        return path in DVC_WRITES or any(path == o or path.startswith(o + "/") for o in outputs)

    return commit, [p for p in (line[3:] for line in status) if not dvc_wrote(p.split(" -> ")[-1])]


def git_commit() -> str:
    """HEAD's commit, "-dirty" when code differs from it (run.yaml, params.yaml and dvc.lock, which
    `dvc exp run` rewrites, do not count: a run's params digest records them; nor do the stages' outputs)."""
    commit, modified = git_state()
    return commit + ("-dirty" if modified else "")


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:  # a store made before the kind was set
            c.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        _saved_view(c, exp.experiment_id, name, exp.tags)
        return exp.experiment_id
    # Artifacts beside the store (not in the cwd-relative default), so the UI finds them.
    exp_id = c.create_experiment(name, artifact_location=(Path.cwd() / "mlartifacts" / name).resolve().as_uri(),
                                 tags=EXPERIMENT_KIND)
    _saved_view(c, exp_id, name, {})
    return exp_id


def _saved_view(c, exp_id: str, name: str, tags: dict[str, str]) -> None:
    """The runs table's saved view and the description linking it (l2l.mlflow_view), unless the experiment
    holds this version's already."""
    if view_outdated(tags, name):
        for k, v in view_tags(exp_id, name, int(time.time() * 1000)).items():
            c.set_experiment_tag(exp_id, k, v)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def find_run(c, exp_id: str, run_hash: str):
    runs = c.search_runs([exp_id], filter_string=f"tags.`{HASH_TAG}` = '{run_hash}'", max_results=1)
    return runs[0] if runs else None


def system_metrics_enabled() -> bool:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py): on unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false (MLflow's own switch, default off in MLflow)."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0")


def split_digest(manifest: dict, split: str) -> str:
    """A prepared split's digest: sha256 of its arrays' sha256s (x then y), as the manifest's
    fingerprint is of every split's; 36 hex digits (MLflow's limit for a dataset digest)."""
    s = manifest["splits"][split]
    return hashlib.sha256((s["sha256_x"] + s["sha256_y"]).encode()).hexdigest()[:36]


def dataset_inputs(arrays: dict, manifest: dict, source: Path, splits: dict[str, str]):
    """MLflow dataset inputs for `splits` ({split: context}) of a prepared dataset: name
    <dataset>-<split>, digest :func:`split_digest`, source the prepared folder, schema and profile
    (shapes) from the arrays."""
    from mlflow.data import from_numpy
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # MLflow registers its local source twice ("" and "file") and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        where = resolve_dataset_source(Path(source).resolve().as_uri())
    out = []
    for split, context in splits.items():
        x, y = arrays[split]
        ds = from_numpy(x, targets=y, source=where, name=f"{manifest['dataset']}-{split}",
                        digest=split_digest(manifest, split))
        out.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return out


def log_new_inputs(c, run, inputs, attempts: int = 5) -> None:
    """Log the dataset inputs `run` does not have yet. The store inserts a dataset new to the
    experiment check-then-insert, so two workers logging the same split at once can collide on its
    unique key (sqlite: "UNIQUE constraint failed"); the loser retries, and then finds the winner's row."""
    from mlflow.exceptions import MlflowException

    have = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    new = [d for d in inputs if (d.dataset.name, d.dataset.digest) not in have]
    for attempt in range(attempts):
        if not new:
            return
        try:
            c.log_inputs(run.info.run_id, datasets=new)
            return
        except MlflowException as e:
            if attempt == attempts - 1 or not any(m in str(e) for m in ("UNIQUE constraint", "IntegrityError",
                                                                          "Duplicate entry", "duplicate key")):
                raise
            time.sleep(0.2 * (attempt + 1))
            have = {(d.dataset.name, d.dataset.digest) for d in c.get_run(run.info.run_id).inputs.dataset_inputs}
            new = [d for d in new if (d.dataset.name, d.dataset.digest) not in have]


def log_once(c, run_id: str, metrics: dict[str, Any]) -> None:
    """Summary metrics (one value per run: test accuracy, a claim's interval) with never two values at
    one step: a key the run holds with the same value is not logged again; a changed value (a claim
    re-checked with more seeds) goes to the step after the key's last one."""
    from mlflow.entities import Metric

    have = c.get_run(run_id).data.metrics
    now, out = int(time.time() * 1000), []
    for k, v in metrics.items():
        if v is None:
            continue
        v, old = float(v), have.get(k)
        if old is not None and (old == v or (math.isnan(old) and math.isnan(v))):
            continue
        step = 0 if old is None else 1 + max(m.step for m in c.get_metric_history(run_id, k))
        out.append(Metric(k, v, now, step))
    if out:
        c.log_batch(run_id, metrics=out)


class RunTracker:
    """Logs one training run; created (or found again) by the run's hash. Its system metrics are
    sampled while it trains (MLflow's monitor, every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s,
    default 10, and once at the end, so a short run has them too)."""

    def __init__(self, spec, profile: str, run_dir: Path, device: dict[str, str]):
        from mlflow.entities import Param, RunTag

        self.c = client()
        self.exp_id = experiment_id(self.c, f"l2l-{profile}")
        existing = find_run(self.c, self.exp_id, spec.hash)
        self.logged: set[int] = set()  # epochs (steps) the store has: each is logged once, whatever re-runs
        if existing is not None:
            self.run_id = existing.info.run_id
            self.logged = {m.step for m in self.c.get_metric_history(self.run_id, STEP_WITNESS)}
            self.c.update_run(self.run_id, status="RUNNING")
            log.info("%s: continuing MLflow run %s (%d epochs logged)", spec.hash, self.run_id, len(self.logged))
            self.monitor = self._start_monitor(resume=True)
            return
        commit, modified = git_state()
        tags = {HASH_TAG: spec.hash, "l2l.profile": profile, "l2l.experiment": spec.experiment,
                "l2l.method": spec.method, "l2l.model": spec.model, "l2l.dataset": spec.dataset,
                "l2l.seed": str(spec.seed), "l2l.run_dir": str(run_dir), "l2l.device": device["device"],
                "l2l.device_name": device["device_name"], "l2l.torch": device["torch"], "l2l.cuda": device["cuda"],
                # the commit, and the code files changed from it (not params.yaml: the params digest says
                # those), rather than a "-dirty" that every `dvc exp run` would set
                "mlflow.source.git.commit": commit, "l2l.git.modified": ",".join(modified)[:5000] or "none",
                "mlflow.source.name": "stages/train.py", "mlflow.source.type": "LOCAL",
                "l2l.params_digest": spec.hash,  # the run hash: sha256 of its resolved spec (RunSpec.hash)
                "l2l.metric": task_of(spec.data).metric}  # what the *_acc metrics hold (accuracy or mAP)
        for k, v in spec.options.items():  # method readings (e.g. the L2L reading, split point) as tags too
            tags[f"l2l.option.{k}"] = str(v)
        run = self.c.create_run(self.exp_id, run_name=spec.label,
                                tags=tags)
        self.run_id = run.info.run_id
        params = flatten({k: v for k, v in spec.to_dict().items() if k not in ("data",)})
        params.update(flatten(spec.data, "data."))
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.c.log_batch(self.run_id, params=items[i:i + 100])
        self.monitor = self._start_monitor(resume=False)

    def _start_monitor(self, resume: bool):
        if not system_metrics_enabled():
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=tracking_uri())
        monitor.start()
        return monitor

    def _stop_monitor(self) -> None:
        if self.monitor is None:
            return
        self.monitor.finish()
        self.monitor.collect_metrics()  # the end state, so a run shorter than the interval has a sample too
        self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        self.monitor.mlflow_logger.flush()
        self.monitor = None

    def log_datasets(self, inputs: list) -> None:
        """Dataset inputs (:func:`dataset_inputs`) the run does not have yet."""
        log_new_inputs(self.c, self.c.get_run(self.run_id), inputs)

    def backfill(self, history: list[dict]) -> None:
        """Log the epochs of `history` that the store does not have yet (after a resume)."""
        for row in history:
            self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        """One epoch's metrics at its step, unless the store has that step already (a resumed or
        retrained run: a step's metrics go in one batch, so the witness metric stands for all)."""
        if row["global_epoch"] in self.logged:
            return
        self.log_metrics({k: row[k] for k in EPOCH_METRICS}, step=row["global_epoch"])
        self.logged.add(row["global_epoch"])

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                               if v is not None])

    def log_summary(self, metrics: dict[str, Any]) -> None:
        log_once(self.c, self.run_id, metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, *paths: Path) -> None:
        for p in paths:
            self.c.log_artifact(self.run_id, str(p))

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        self._stop_monitor()
        if error:
            self.c.set_tag(self.run_id, ERROR_TAG, error[:5000])
        elif ERROR_TAG in self.c.get_run(self.run_id).data.tags:
            self.c.delete_tag(self.run_id, ERROR_TAG)  # an earlier attempt's error no longer describes the run
        self.c.set_terminated(self.run_id, status=status)


def mark_failed(profile: str, run_hash: str, error: str) -> None:
    """The MLflow run of `run_hash` FAILED with `error` (its process could not say so itself)."""
    c = client()
    run = find_run(c, experiment_id(c, f"l2l-{profile}"), run_hash)
    if run is not None and run.info.status == "RUNNING":
        c.set_tag(run.info.run_id, ERROR_TAG, error[:5000])
        c.set_terminated(run.info.run_id, status="FAILED")


def mark_abandoned(profile: str, trained_now: Callable[[str], bool]) -> list[str]:
    """Runs left RUNNING by a process that ended without saying so (killed, crashed), i.e. whose
    hash is not being trained now (`trained_now`: its run folder is locked), marked FAILED. Returns their hashes."""
    c = client()
    exp = c.get_experiment_by_name(f"l2l-{profile}")
    if exp is None:
        return []
    out = []
    for run in c.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=50000):
        h = run.data.tags.get(HASH_TAG)
        if h is not None and not trained_now(h):
            c.set_tag(run.info.run_id, ERROR_TAG, "left RUNNING by a process that ended without finishing it "
                                                  "(killed or crashed); the next train stage resumes the run")
            c.set_terminated(run.info.run_id, status="FAILED")
            out.append(h)
    return out


def log_to_run(run_hash: str, profile: str, metrics: dict[str, Any], tags: dict[str, str] | None = None,
               datasets: list | None = None) -> None:
    """Add metrics (e.g. test accuracy from the evaluate stage; each once, :func:`log_once`), tags
    and dataset inputs (:func:`dataset_inputs`) to a finished run."""
    from mlflow.entities import RunTag

    c = client()
    run = find_run(c, experiment_id(c, f"l2l-{profile}"), run_hash)
    if run is None:
        log.warning("%s: no MLflow run found to add evaluation metrics to", run_hash)
        return
    log_once(c, run.info.run_id, metrics)
    if tags:
        c.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    log_new_inputs(c, run, datasets or ())


CLAIM_METRICS = ("diff", "ci_low", "ci_high", "p_value", "mean_a", "mean_b", "n_a", "n_b", "effect_size",
                 "seeds_needed", "mcnemar_p", "p_contra", "level_support", "level_contra", "adj_ci_low", "adj_ci_high")
SUMMARY_RUN = "claims summary"


def _claim_run(c, exp_id: str, key: str, value: str, name: str, kind: str) -> str:
    found = c.search_runs([exp_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1)
    if found:
        return found[0].info.run_id
    return c.create_run(exp_id, run_name=name, tags={key: value, "l2l.kind": kind}).info.run_id


def log_claims(profile: str, records: list[dict], show_interval: Callable[[dict], bool] = lambda rec: True,
               ours: Callable[[dict], str] | None = None) -> dict[str, str]:
    """Experiment l2l-<profile>-claims: one MLflow run per checked claim (its statistics and verdict;
    the training runs behind it are tagged ``l2l.claim.<id> = <arm>``, so the UI answers "which runs
    produced this verdict"), and one run "claims summary" holding the count per verdict and, in its
    note, every claim not run, one line per reason; a claim not run gets no run of its own (a run it
    had from an earlier check is tagged "not run"). Every run is tagged l2l.kind (claim | claims_summary).
    show_interval(record): whether the report prints the claim's interval (claims_report.shown_interval);
    where it does not, ci_low/ci_high are not logged (NaN over a value an earlier check logged), as in the
    report and DVC's metrics; ours(record): the report's text of our estimate (tag l2l.ours). Each training
    run behind a checked claim is tagged l2l.verdicts: its claims by verdict ("supported: P1-C1; inconclusive:
    P1-S2"), a column of the training runs' saved view. Returns claim id -> MLflow run id (checked claims only)."""
    from mlflow.entities import RunTag

    c = client()
    train_exp = experiment_id(c, f"l2l-{profile}")
    by_hash = {r.data.tags.get(HASH_TAG): r.info.run_id for r in c.search_runs([train_exp], max_results=50000)}
    exp_id = experiment_id(c, f"l2l-{profile}-claims")  # beside the training runs, not among them
    out, not_run = {}, {}
    verdicts: dict[str, dict[str, list[str]]] = {}  # training run id -> verdict -> claim ids
    for rec in records:
        if rec["verdict"] == "not run":
            not_run.setdefault(str(rec.get("reason", "")), []).append(rec["id"])
            old = c.search_runs([exp_id], filter_string=f"tags.`l2l.claim_id` = '{rec['id']}'", max_results=1)
            if old:
                c.set_tag(old[0].info.run_id, "l2l.verdict", "not run")
            continue
        run_id = _claim_run(c, exp_id, "l2l.claim_id", rec["id"], f"claim {rec['id']}", "claim")
        comp = rec.get("comparison") or {}
        look = (rec.get("sequential") or {}).get("look")  # the look of the sequential design it stopped at (or is at)
        metrics = {**{k: comp.get(k) for k in CLAIM_METRICS}, "look": look}
        if not show_interval(rec):
            had = c.get_run(run_id).data.metrics
            metrics.update({k: math.nan if k in had else None for k in ("ci_low", "ci_high")})
        log_once(c, run_id, metrics)
        hashes = {f"{arm}:{seed}": h for arm, a in rec["arms"].items() for seed, h in a["runs"].items()}
        tags = {"l2l.paper": rec["paper"], "l2l.claim": rec["claim"][:5000], "l2l.verdict": rec["verdict"],
                "l2l.reason": str(rec.get("reason", ""))[:5000], "l2l.profile": profile, "l2l.kind": "claim",
                "l2l.runs": ",".join(sorted(set(hashes.values()))) or "none",
                **({"l2l.ours": ours(rec)[:5000]} if ours else {}),
                "mlflow.note.content": f"{rec['claim']}\n\nVerdict: {rec['verdict']} ({rec.get('reason', '')})"}
        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        c.set_terminated(run_id, "FINISHED")
        for key, h in hashes.items():
            if h in by_hash:
                c.set_tag(by_hash[h], f"l2l.claim.{rec['id']}", key.split(":")[0])
                verdicts.setdefault(by_hash[h], {}).setdefault(rec["verdict"], []).append(rec["id"])
        out[rec["id"]] = run_id
    for train_run, by_verdict in verdicts.items():
        c.set_tag(train_run, "l2l.verdicts",
                  "; ".join(f"{v}: {', '.join(ids)}" for v, ids in sorted(by_verdict.items()))[:5000])
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["verdict"]] = counts.get(rec["verdict"], 0) + 1
    summary = _claim_run(c, exp_id, "l2l.kind", "claims_summary", SUMMARY_RUN, "claims_summary")
    log_once(c, summary, {"claims": len(records), **{f"claims_{_metric_key(v)}": n for v, n in counts.items()}})
    lines = [f"{len(records)} claims: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))]
    lines += [f"- not run ({len(ids)}): {reason}: {', '.join(ids)}" for reason, ids in sorted(not_run.items())]
    c.log_batch(summary, tags=[RunTag("l2l.profile", profile), RunTag("mlflow.note.content", "\n".join(lines)[:5000])])
    c.set_terminated(summary, "FINISHED")
    return out


def _metric_key(verdict: str) -> str:
    """A verdict as a metric key: "inconclusive (smoke scale)" -> "inconclusive_smoke_scale"."""
    return "_".join("".join(ch if ch.isalnum() else " " for ch in verdict).split())


def log_figure(run_id: str, fig, name: str) -> None:
    """A matplotlib figure as a PNG artifact of an MLflow run (then closed)."""
    import matplotlib.pyplot as plt

    client().log_figure(run_id, fig, name)
    plt.close(fig)


# --- one writer for several worker processes ----------------------------------------------

REMOTE_SCHEMES = ("http://", "https://", "databricks")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_address(host: str) -> str:
    """Where this machine reaches a server listening on `host` (a wildcard: its loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def http_uri(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _listens(proc: subprocess.Popen, port: int) -> bool:
    """Whether `proc`, or a process it started (mlflow server starts uvicorn), listens on `port`: the
    server that answers there is the one started here, not another that took the port meanwhile."""
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for p in tree:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def _answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(store_uri: str, host: str = "127.0.0.1", port: int | None = None,
                  allowed_hosts: list[str] | None = None, timeout_s: float = 300) -> Iterator[str]:
    """`mlflow server` over `store_uri` (one server worker: the single writer to the database) on
    `host` (127.0.0.1 unless a named setting opens it to a cluster's network, params' executor.tracking)
    and `port` (None: a free one) while the context lasts; yields the http URI this machine reaches it at.
    `allowed_hosts`: the Host headers it accepts (MLflow's --allowed-hosts; default loopback and private
    addresses), e.g. the node name workers on other machines reach it by.

    Ready when it answers /health *and* its own process tree listens on the port: another server that
    took the port between choosing it and binding it is never mistaken for this one (a free port taken
    meanwhile is chosen again, twice at most). Readiness is polled until then or until the process exits
    (a loaded machine starts it slowly: `timeout_s` is only a ceiling); giving up, the error carries the
    server's log."""
    for attempt in range(1 if port is not None else 3):
        chosen = port if port is not None else _free_port(host)
        with _server_process(store_uri, host, chosen, allowed_hosts) as (proc, log_text):
            uri = http_uri(local_address(host), chosen)
            deadline = time.monotonic() + timeout_s
            while not (_answers(uri) and _listens(proc, chosen)):
                if proc.poll() is not None:
                    taken = "address already in use" in log_text().lower()
                    if taken and port is None and attempt < 2:
                        break  # the free port was taken before the server bound it: choose another
                    raise RuntimeError(f"mlflow server over {store_uri} on {host}:{chosen} exited with status "
                                       f"{proc.returncode}" + ("; the port is taken by another process" if taken
                                                               else "") + f"; its log: {_tail(log_text())}")
                if time.monotonic() > deadline:
                    other = "; another process answers on that port" if _answers(uri) else ""
                    raise RuntimeError(f"mlflow server over {store_uri} on {host}:{chosen} did not answer within "
                                       f"{timeout_s:.0f} s{other}; its log: {_tail(log_text())}")
                time.sleep(0.5)
            else:
                log.info("MLflow: server %s over %s (single writer; its UI too)", http_uri(host, chosen), store_uri)
                yield uri
                return
            log.warning("MLflow: port %d was taken before the server bound it; choosing another", chosen)


def _tail(text: str) -> str:
    return " | ".join(text.strip().splitlines()[-20:])


@contextlib.contextmanager
def _server_process(store_uri: str, host: str, port: int, allowed_hosts: list[str] | None
                    ) -> Iterator[tuple[subprocess.Popen, Callable[[], str]]]:
    """The `mlflow server` process while the context lasts, and a reader of its log; stopped after."""
    log_file = tempfile.NamedTemporaryFile("w+", prefix="l2l-mlflow-server-", suffix=".log", delete=False)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner needed
    env.pop("MLFLOW_TRACKING_URI", None)
    # Its own session, so stopping it stops the uvicorn process it starts too.
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
                             "--backend-store-uri", store_uri, "--workers", "1"]
                            + (["--allowed-hosts", ",".join(allowed_hosts)] if allowed_hosts else []),
                            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def read() -> str:
        log_file.seek(0)
        return log_file.read()

    try:
        yield proc, read
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()
        os.unlink(log_file.name)


@contextlib.contextmanager
def single_writer(profile: str, host: str = "127.0.0.1", port: int | None = None,
                  allowed_hosts: list[str] | None = None) -> Iterator[str]:
    """Tracking for several worker processes: nothing lost, nothing duplicated.

    A server given in MLFLOW_TRACKING_URI (http/https/databricks) is used as it is; otherwise
    an :func:`mlflow_server` on `host`:`port` (accepting `allowed_hosts`) serves this store
    (``./mlflow.db`` or the database that MLFLOW_TRACKING_URI names) for the duration, and
    MLFLOW_TRACKING_URI points at it. The
    profile's experiment is created before any worker starts. Yields the URI this machine logs to
    (workers on other nodes: l2l.cluster.workers_tracking).
    """
    uri = tracking_uri()
    if uri.startswith(REMOTE_SCHEMES):
        experiment_id(client(), f"l2l-{profile}")
        yield uri
        return
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with mlflow_server(uri, host, port, allowed_hosts) as server:
        os.environ["MLFLOW_TRACKING_URI"] = server
        try:
            experiment_id(client(), f"l2l-{profile}")
            yield server
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous

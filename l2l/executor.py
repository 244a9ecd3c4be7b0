"""Where the train stage's runs execute: one interface, three backends (params.yaml ``executor:``).

Every backend executes the same unit, :func:`train_one`: one run of the plan, in its folder
``runs/<hash>/``, with its MLflow run, resuming from its last epoch checkpoint if it was
interrupted. So DVC, the evaluate stage and the report see the same outputs whichever backend
trained them.

- ``local`` (default): in this process, one run after another; with several GPUs, or
  ``runs_per_gpu`` > 1, one worker process per GPU slot (``runs_per_gpu`` slots per GPU).
- ``ray``: one Ray task per run, holding ``1 / runs_per_gpu`` of a GPU (Ray's resources) when the
  cluster has GPUs; an existing cluster (``ray.address``) or a local instance.
- ``slurm``: a submitit job array, one job per GPU training ``runs_per_gpu`` runs; a job that
  times out or is preempted is requeued and its runs resume.

With more than one worker process, MLflow has one writer: :func:`l2l.tracking.single_writer`.

What a backend executes is a task: one run, or a :class:`Stack` of runs that differ only by seed,
trained as one stacked computation (l2l/stacking.py; params' ``executor.stack_seeds``: by default the
fastest mode measured per model family on the device, l2l/modes.py). Each run of a stack keeps its
folder, record, MLflow run and resume; one that fails fails alone (:func:`train_stack`).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import queue
import re
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from l2l.checks import ClusterError, ConfigError, DataError, IntegrityError, LockedError, RunsFailed
from l2l.cluster import job_error, probe_file, probe_node, ray_slots, spans_machines, workers_tracking
from l2l.config import Config, required_hashes
from l2l.data import DeviceDataCache
from l2l.datasets import DataSettings, val_joins_train
from l2l.engine import RunContext, device_info, pick_device, train_run
from l2l.io import read_json, read_record, run_lock, write_json
from l2l.methods import METHODS
from l2l import modes
from l2l.modes import THROUGHPUT_FILE
from l2l.mlflow_model import log_model
from l2l.progress import RunProgress, StageProgress, bars_around_logging, bars_enabled
from l2l.spec import RunSpec
from l2l.stacking import Lockstep, MemberContext, seed_group
from l2l.stage import RUNS, setup_logging
from l2l.tracking import RunTracker, dataset_inputs, mark_failed, single_writer

log = logging.getLogger(__name__)
# Failures a worker reports as their one line (anything else: its traceback in the log as well).
EXPECTED = (ConfigError, DataError, IntegrityError, LockedError, OSError)

# --- the unit of work ------------------------------------------------------------------

_DATA: dict[tuple, Any] = {}  # per worker process: prepared data stays on the device between runs


@contextlib.contextmanager
def _in_dir(root: str) -> Iterator[None]:
    # The stages' paths (runs/, data/prepared, mlflow.db) are relative to the repository root;
    # a worker process (Ray, submitit) may start elsewhere.
    before = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass(frozen=True)
class Worker:
    """How a worker process trains: where, logging to which MLflow store, with how many CPU threads."""

    root: str  # the repository root: runs/, the prepared data
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI or ./mlflow.db
    # torch threads of a run on a CPU. CPU results depend on it (the order of oneDNN's reductions),
    # so every backend uses the same number: params' executor.cpu_threads, else the train stage's.
    cpu_threads: int | None = None
    checkpoint_every: int = 1  # epochs between resume states (params' executor.checkpoint_every)
    checkpoint_min_seconds: float = 0.0  # and seconds at least (executor.checkpoint_min_seconds)
    cuda_graphs: bool = False  # executor.cuda_graphs (l2l/graphs.py)
    progress_bars: bool = False  # a bar per run (the stage's own process on a terminal); else epoch log lines
    max_retries: int = 0  # a run whose process died is retried this often, first (params' executor.max_retries)


def train_one(spec: dict, profile: str, data: DataSettings, worker: Worker,
              member: tuple[Lockstep, int] | None = None) -> dict | list:
    """Train one run of the plan (resuming it if interrupted): the unit every backend executes.

    spec: a RunSpec as a dict (or a :class:`Stack`'s: :func:`train_stack`). Loads the prepared data itself,
    so it runs in any process. Holds the run folder's lock throughout (a second trainer of the run is
    refused, naming this one's PID); a run another trainer finished meanwhile is not trained again.
    member: (its stack, its place in it) for a run trained stacked. Returns {hash, images_per_s}.
    """
    if "stack" in spec:
        return train_stack(spec["stack"], profile, data, worker)
    if worker.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = worker.tracking_uri
    spec = RunSpec.from_dict(spec)
    with _in_dir(worker.root):
        run_dir = RUNS / spec.hash
        with run_lock(run_dir):
            if (run_dir / "result.json").exists():
                log.info("%s: finished meanwhile by another trainer; not trained again", spec.hash)
                return {"hash": spec.hash, "images_per_s": read_record(run_dir / "result.json", check=())["images_per_s"]}
            device = pick_device()
            if device.type == "cpu" and worker.cpu_threads:
                torch.set_num_threads(worker.cpu_threads)
            key = (os.getcwd(), str(device), repr(data))
            if key not in _DATA:
                _DATA.clear()
                _DATA[key] = DeviceDataCache(data, device)
            arrays, num_classes = _DATA[key].get(spec)
            write_json(run_dir / "spec.json", spec.to_dict())
            tracker = RunTracker(spec, profile, run_dir, device_info(device))
            try:
                tracker.log_datasets(dataset_inputs(*_DATA[key].prepared(spec.dataset),
                                                    data.prepared_dir(spec.dataset),
                                                    # split.val_size 0: the validation images were trained on
                                                    {"train": "training", "val": "training"
                                                     if val_joins_train(spec.data) else "validation"}))
                method = METHODS[spec.method]
                if member is None:
                    ctx = RunContext(spec, arrays, num_classes, device, runs=run_dir.parent.resolve(),
                                     cuda_graphs=worker.cuda_graphs)
                else:  # trained stacked: its step is the stack's (l2l/stacking.py), the rest its own (never
                    # captured as a CUDA graph: the stack's step is one computation of all its members)
                    stack, k = member
                    ctx = MemberContext(spec, arrays, num_classes, device, runs=run_dir.parent.resolve(),
                                        stack=stack, member=k)
                    method = stack.method(method, k)
                    tracker.set_tags({"l2l.execution": f"stacked_{stack.size}",
                                      "l2l.stack.seeds": ",".join(map(str, stack.seeds))})
                result = train_run(spec, method, ctx, run_dir, on_epoch=tracker.log_epoch,
                                   on_resume=tracker.backfill, checkpoint_every=worker.checkpoint_every,
                                   checkpoint_min_seconds=worker.checkpoint_min_seconds,
                                   progress=RunProgress(spec.label, bars=worker.progress_bars and bars_enabled()))
                # Per run once; val/test accuracy of final.pt and best.pt come from the evaluate stage
                # (logging them here too gave those keys two values at one step).
                # No best epoch without a validation split (split.val_size 0): nothing was selected.
                tracker.log_summary({"train_seconds": result["train_seconds"],
                                     **({"best_epoch": result["best"]["epoch"]} if "epoch" in result["best"] else {})})
                tracker.set_tags(result["tags"])
                tracker.log_artifacts(run_dir / "history.csv")
                log_model(tracker.c, tracker.run_id, tracker.exp_id, spec, run_dir / "final.pt", num_classes,
                          step=result["epochs"] - 1)
            except BaseException as e:  # KeyboardInterrupt too: the MLflow run must not stay RUNNING
                tracker.finish("FAILED" if isinstance(e, Exception) else "KILLED",
                               error="".join(traceback.format_exception_only(e)).strip())
                raise
            tracker.finish()
    return {"hash": spec.hash, "images_per_s": result["images_per_s"]}


class StackFailed(RunsFailed):
    """Some runs of a stack failed (the others finished): `hashes` names the failed ones."""

    def __init__(self, message: str, hashes: list[str]):
        super().__init__(message, hashes)
        self.hashes = hashes

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Stack:
    """Runs of the plan that differ only by seed, trained as one stacked computation (l2l/stacking.py):
    a task of any backend, in place of one run (hash, label and to_dict as a RunSpec's; its hash names
    its runs', joined by "+", which l2l.progress counts one by one)."""

    members: tuple[RunSpec, ...]

    @property
    def hash(self) -> str:
        return "+".join(s.hash for s in self.members)

    @property
    def label(self) -> str:
        s = self.members[0]
        return f"{s.experiment}/{s.model}/{s.dataset}/s{','.join(str(m.seed) for m in self.members)}"

    def to_dict(self) -> dict:
        return {"stack": [s.to_dict() for s in self.members], "experiment": self.members[0].experiment}


def train_stack(specs: list[dict], profile: str, data: DataSettings, worker: Worker) -> list:
    """Train runs that differ only by seed as one stack (l2l/stacking.py): each run as train_one trains
    it (its lock, MLflow run, resume, record), its step the stack's. A run that fails leaves the stack
    and fails alone; the others go on. Raises StackFailed naming the failed runs after the others ended."""
    members = [RunSpec.from_dict(s) for s in specs]
    stack = Lockstep(members)
    one = replace(worker, progress_bars=False)  # K bars would fight over one line: epoch lines per run
    log.info("stacked: %d runs of %s (seeds %s) as one computation", len(members),
             Stack(tuple(members)).label.rsplit("/s", 1)[0], ", ".join(map(str, stack.seeds)))
    outcomes = stack.run(lambda k: train_one(specs[k], profile, data, one, member=(stack, k)))
    for o in outcomes:
        if isinstance(o, BaseException) and not isinstance(o, Exception):
            raise o  # interrupted (SIGTERM, Ctrl-C): every run of the stack was marked KILLED
    failed = [(m, o) for m, o in zip(members, outcomes) if isinstance(o, BaseException)]
    if failed:
        m, err = failed[0]
        raise StackFailed(f"{len(failed)} of {len(members)} stacked runs failed; first: {_describe(m)}: "
                          f"{type(err).__name__}: {err}", [m.hash for m, _ in failed])
    return outcomes


def task_of(d: dict) -> RunSpec | Stack:
    """A backend's task from its dict (RunSpec.to_dict or Stack.to_dict)."""
    return Stack(tuple(RunSpec.from_dict(s) for s in d["stack"])) if "stack" in d else RunSpec.from_dict(d)


def train_group(specs: list[dict], profile: str, data: DataSettings, worker: Worker) -> list:
    """Several runs sharing this process's GPU concurrently (one worker process each); one run: in process."""
    if len(specs) == 1:
        return [train_one(specs[0], profile, data, worker)]
    todo = [task_of(s) for s in specs]  # a spec's dict holds its fields, not its hash
    return _pool(todo, profile, data, worker, slots=[None] * len(specs),
                 progress=StageProgress([s.hash for s in todo], bars=False))


# --- local ------------------------------------------------------------------------------

def local_slots(runs_per_gpu: int) -> list[int | None]:
    """GPU index per worker slot: runs_per_gpu slots on each visible GPU; [None] = this process."""
    n = torch.cuda.device_count()
    return [g for g in range(n) for _ in range(runs_per_gpu)] or [None]


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def stop_on_signals() -> None:
    """SIGTERM (and SIGINT) raise KeyboardInterrupt: a run being trained is marked KILLED in MLflow,
    a worker pool is ended, and the run resumes from its last resume state next time."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


def _die_with_parent() -> None:
    # A worker whose train stage was killed (even by SIGKILL) gets SIGINT instead of training on alone
    # (SIGINT, as the pool stops its workers: a worker of a Slurm job ignores SIGTERM, _slot_worker).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


class _LogToParent(logging.handlers.QueueHandler):
    """A worker's log records travel to the pool's process, which prints them (above its bars)."""

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", -1, record))


def _slot_worker(gpu: int | None, threads: int, tasks, results, job: tuple, first: tuple | None = None) -> None:
    """One worker process of the local pool: pinned to its GPU before CUDA starts, trains `first` (a
    retried run keeps its slot) and then the runs it takes from `tasks` until it takes None, reporting
    each start and outcome, and its log records, on `results`."""
    _die_with_parent()
    stop_on_signals()
    # Slurm signals every process of a job: USR2 before its time limit, SIGTERM and USR2 when it is
    # preempted. The job's own process (submitit) requeues the job and stops its workers with SIGINT
    # (their runs marked KILLED, resumed after the requeue); acting on either signal here first (USR2's
    # default action kills) would fail the runs instead. The parent started this process with both
    # blocked (_job_signals_blocked), so none was lost or acted on before these lines.
    if os.environ.get("SUBMITIT_EXECUTOR"):  # in a submitit job
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)
    setup_logging()
    logging.getLogger().handlers[:] = [_LogToParent(results)]
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # read when CUDA initialises, after the import of torch
    torch.set_num_threads(threads)
    profile, data, worker = job
    while (item := first or tasks.get()) is not None:
        first = None
        i, spec = item
        results.put(("start", i, os.getpid()))
        try:
            results.put(("done", i, train_one(spec, profile, data, worker)))
        except BaseException as e:  # noqa: BLE001 (reported to the parent, which names the run)
            if not isinstance(e, EXPECTED):
                log.exception("%s failed", spec["experiment"])
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001 (an error that cannot cross processes travels as its text)
                e = RuntimeError(f"{type(e).__name__}: {e}")
            results.put(("failed", i, e))
            if not isinstance(e, Exception):
                return


JOB_SIGNALS = {signal.SIGUSR2, signal.SIGTERM}  # what Slurm sends every process of a job it preempts


@contextlib.contextmanager
def _job_signals_blocked() -> Iterator[None]:
    """Slurm's signals held back in this process meanwhile (a pending one is acted on after), and
    blocked in the processes it starts meanwhile: a worker handles them once it can (_slot_worker), a
    helper process (multiprocessing's resource tracker) never sees them."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _report(outcomes: list[tuple[RunSpec, BaseException | None]]) -> None:
    failed = [(s, e) for s, e in outcomes if e is not None]
    if failed:
        spec, err = failed[0]
        raise RunsFailed(f"{len(failed)} of {len(outcomes)} runs failed; first: {_describe(spec)}: "
                         f"{type(err).__name__}: {err}")


def _pool(todo: list[RunSpec], profile: str, data: DataSettings, worker: Worker, slots: list[int | None],
          progress: StageProgress | None = None) -> list:
    """The runs of `todo` on one worker process per slot. A worker that dies (killed, out of memory)
    is replaced, and the run it was training is retried first by its replacement (it keeps its slot;
    worker.max_retries times, resuming from its last resume state); then that run alone fails (marked
    FAILED in MLflow) and the other workers' runs go on. Interrupted itself (SIGTERM, Ctrl-C, a Slurm
    requeue), the pool stops its workers (their runs are marked KILLED) before it re-raises.
    `progress`: the stage's count (default: this pool's own)."""
    progress = progress or StageProgress([s.hash for s in todo], bars=False)
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with _job_signals_blocked():  # the queues start multiprocessing's resource tracker, which Slurm signals too
        tasks, results = ctx.Queue(), ctx.Queue()
    for i, s in enumerate(todo):
        tasks.put((i, s.to_dict()))
    for _ in slots:
        tasks.put(None)
    threads = max(1, (os.cpu_count() or 1) // len(slots))

    def start(gpu, first=None):
        p = ctx.Process(target=_slot_worker, args=(gpu, threads, tasks, results, (profile, data, worker), first),
                        daemon=False)
        with _job_signals_blocked():
            p.start()
        return p

    procs = [start(g) for g in slots]
    running: dict[int, int] = {}  # worker PID -> index of the run it trains
    outcome: dict[int, BaseException | None] = {}
    out, ended, restarts, retries = [], set(), 0, {}

    def record(i: int, err: BaseException | None) -> None:
        outcome[i] = err
        progress.finished(todo[i].hash, todo[i].label, err)

    try:
        while len(outcome) < len(todo):
            try:
                kind, i, value = results.get(timeout=1.0)
            except queue.Empty:
                for k, p in enumerate(procs):
                    if p.exitcode is None or p.pid in ended:
                        continue
                    ended.add(p.pid)
                    i = running.pop(p.pid, None)
                    retry = None
                    if i is not None:  # died while training a run: retried first, or that run alone fails
                        how = (f"signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0
                               else f"exit status {p.exitcode}")
                        err = RuntimeError(f"worker process {p.pid} died ({how}) while training this run")
                        if retries.get(i, 0) < worker.max_retries:
                            retries[i] = retries.get(i, 0) + 1
                            retry = (i, todo[i].to_dict())
                            log.warning("%s: %s; retry %d of %d, first on its slot", _describe(todo[i]), err,
                                        retries[i], worker.max_retries)
                        else:
                            mark_failed(profile, todo[i].hash, str(err))
                            record(i, err)
                    if p.exitcode != 0 and (retry or restarts < len(todo)):
                        restarts += 1
                        procs[k] = start(slots[k], retry)  # takes the dead worker's share of the queue
                if not any(p.is_alive() for p in procs) and results.empty():
                    for i in sorted(set(range(len(todo))) - set(outcome)):
                        record(i, RuntimeError("not trained: every worker process ended before it"))
                continue
            if kind == "log":  # a worker's record, printed here (through tqdm while bars are drawn)
                logging.getLogger(value.name).handle(value)
                continue
            if kind == "start":
                running[value] = i
                progress.started(todo[i].hash, todo[i].label)
                continue
            running = {pid: j for pid, j in running.items() if j != i}
            record(i, None if kind == "done" else value)
            if kind == "done":
                out.append(value)
    except BaseException:
        for p in procs:
            if p.exitcode is None:  # the worker marks its run KILLED and exits (SIGINT, not SIGTERM: _slot_worker)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
        raise
    for p in procs:
        p.join(timeout=120)
    _report([(todo[i], outcome[i]) for i in range(len(todo))])
    return out


def run_local(todo: list[RunSpec], config: Config, worker: Worker, progress: StageProgress) -> None:
    cfg, profile = config.executor, config.profile.name
    slots = local_slots(cfg["runs_per_gpu"])
    if len(slots) == 1:  # one device, one run at a time: in this process, failures stop the stage
        for spec in todo:
            progress.started(spec.hash, spec.label)
            try:
                train_one(spec.to_dict(), profile, config.data, replace(worker, progress_bars=progress.bars))
            except Exception as e:
                progress.finished(spec.hash, spec.label, e)
                raise
            progress.finished(spec.hash, spec.label)
        return
    log.info("local: %d worker processes (%d per GPU)", len(slots), cfg["runs_per_gpu"])
    with single_writer(profile) as uri:
        _pool(todo, profile, config.data, replace(worker, tracking_uri=uri), slots, progress)


# --- ray --------------------------------------------------------------------------------

def _import(name: str, extra: str):
    try:
        return __import__(name)
    except ImportError:
        raise ConfigError(f"params.yaml: executor.backend: {extra} needs the {name} package "
                          f"(pip install 'l2l-bench[{extra}]')") from None


def _ray_task(*args) -> dict:
    setup_logging()  # progress lines reach the driver's log
    return train_one(*args)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _probe_ray_nodes(ray, root: str, uri: str, profile: str) -> None:
    """Before any run: a probe on every alive node (this checkout's l2l imports there, runs/ is the same
    shared folder, the prepared data is there, MLflow answers); the first problem in one line."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    with probe_file(root) as token:
        refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(root, token, uri, f"l2l-{profile}"): n["NodeManagerAddress"]
                for n in ray.nodes() if n["Alive"]}
        for ref, address in refs.items():
            try:
                problem = ray.get(ref, timeout=600)
            except Exception as e:  # noqa: BLE001 (e.g. l2l not importable from this checkout's path there)
                problem = (f"node {address} cannot run l2l from {root} (the same checkout at the same path on "
                           f"every node): {_one_line(getattr(e, 'cause', None) or e)}")
            if problem:
                raise ClusterError(f"ray: {problem}; nothing submitted")


def run_ray(todo: list[RunSpec], config: Config, worker: Worker, progress: StageProgress) -> None:
    """One Ray task per run, at most as many in flight as the cluster has slots now (+ ray.queue_ahead):
    the queue stays here, so a run whose worker or node died goes back to its front (worker.max_retries
    times; Ray's own retries, which queue behind every pending run, are off) and resumes from its last
    resume state on the next free slot. A run that raised fails for good, named with its error."""
    cfg, profile = config.executor, config.profile.name
    rc = cfg["ray"]
    ray = _import("ray", "ray")
    address = rc["address"]
    started = not ray.is_initialized()
    if started:  # workers import this checkout of l2l: the same path on every node of a cluster
        code = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p)
        # address null: a new local instance ("local"; None would join the cluster `ray start` last
        # started on this machine, or fail on the address file it left behind)
        ray.init(address=address or "local", runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpus = bool(gpus) if rc["use_gpus"] == "auto" else rc["use_gpus"]
        if address is not None and not use_gpus and rc["use_gpus"] == "auto":
            log.warning("ray: the cluster has no GPU now, so every run trains on CPU (executor.ray.use_gpus: "
                        "true waits for GPU nodes, e.g. of an autoscaling cluster)")
        share = 1 / cfg["runs_per_gpu"] if use_gpus else 0
        remote = address is not None and spans_machines([n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]])
        task = ray.remote(_ray_task).options(num_cpus=rc["cpus_per_run"], num_gpus=share, max_retries=0)
        with workers_tracking(profile, cfg["tracking"], worker.root, remote, "ray") as uri:
            if address is not None:
                _probe_ray_nodes(ray, worker.root, uri, profile)
            log.info("ray: %d runs on %s (%s GPUs, %s per run)", len(todo), address or "a local instance", gpus,
                     share or "no GPU")
            w = replace(worker, tracking_uri=uri)
            queue, in_flight, tries, outcomes = deque(todo), {}, {}, []
            while queue or in_flight:
                room = max(1, ray_slots(ray.cluster_resources(), rc["cpus_per_run"], share)) + rc["queue_ahead"]
                while queue and len(in_flight) < room:
                    spec = queue.popleft()
                    in_flight[task.remote(spec.to_dict(), profile, config.data, w)] = spec
                    progress.started(spec.hash, spec.label)
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=10)  # slots change as nodes come and go
                for ref in done:
                    spec, err = in_flight.pop(ref), None
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # the run raised: the same error again if retried
                        err = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
                    except ray.exceptions.RayError as e:  # its worker process or node died
                        if tries.get(spec.hash, 0) < worker.max_retries:
                            tries[spec.hash] = tries.get(spec.hash, 0) + 1
                            log.warning("%s: %s; retry %d of %d, first in the queue", _describe(spec), _one_line(e),
                                        tries[spec.hash], worker.max_retries)
                            queue.appendleft(spec)
                            continue
                        err = e
                        mark_failed(profile, spec.hash, _one_line(e))  # its process could not say so
                    outcomes.append((spec, err))
                    progress.finished(spec.hash, spec.label, err)
        _report(outcomes)
    finally:
        if started:
            ray.shutdown()


# --- slurm (submitit) -------------------------------------------------------------------

class SlurmJob:
    """A submitit job: train a group of runs; on timeout or preemption, requeue the same group
    (submitit calls ``checkpoint``), whose runs then resume from their last epoch checkpoint."""

    def __call__(self, specs: list[dict], profile: str, data: DataSettings, worker: Worker) -> list:
        setup_logging()  # progress lines in the job's log
        return train_group(specs, profile, data, worker)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)  # runs/<hash>/last.pt is the checkpoint


def run_slurm(todo: list[RunSpec], config: Config, worker: Worker, progress: StageProgress) -> None:
    """A job array, one job per GPU training runs_per_gpu runs. A job that times out or is preempted is
    requeued by submitit (slurm.max_requeue times) and its runs resume. A job that ended without a
    result (killed, node failure) is resubmitted with its unfinished runs (worker.max_retries times); a
    job that failed for good fails its unfinished runs, named with the job's error in one line."""
    submitit = _import("submitit", "slurm")
    cfg, profile = config.executor, config.profile.name
    s = cfg["slurm"]
    per_job = cfg["runs_per_gpu"] if s["gpus_per_task"] else 1
    groups = [todo[i:i + per_job] for i in range(0, len(todo), per_job)]
    with workers_tracking(profile, cfg["tracking"], worker.root, s["cluster"] == "slurm", "slurm") as uri:
        ex = submitit.AutoExecutor(folder=Path(worker.root) / s["folder"], cluster=s["cluster"],
                                   slurm_max_num_timeout=s["max_requeue"], local_max_num_timeout=s["max_requeue"])
        ex.update_parameters(name="l2l-train", timeout_min=s["timeout_min"], gpus_per_node=s["gpus_per_task"],
                             cpus_per_task=s["cpus_per_task"], mem_gb=s["mem_gb"], slurm_partition=s["partition"],
                             slurm_account=s["account"], slurm_array_parallelism=s["array_parallelism"])
        shared = (profile, config.data, replace(worker, tracking_uri=uri))
        jobs = ex.map_array(SlurmJob(), [[sp.to_dict() for sp in g] for g in groups],
                            *([x] * len(groups) for x in shared))
        log.info("slurm: %d jobs for %d runs, logs in %s", len(jobs), len(todo), s["folder"])
        pending, tries, outcomes = dict(zip(jobs, groups)), {}, []
        while pending:
            finished = [j for j in pending if j.done()]
            if not finished:
                time.sleep(1 if s["cluster"] == "local" else 15)
                continue
            for job in finished:
                group = pending.pop(job)
                error = job.exception()  # None, or what submitit says went wrong
                left = [sp for sp in group if not (Path(worker.root) / RUNS / sp.hash / "result.json").exists()]
                line = None if error is None and not left else \
                    job_error(error) if error is not None else "finished without training every run"
                # ended without a result (killed, node failure, out of memory), not cancelled by a person
                ended = re.search(r"has not produced any output \(state: ([^)]*)\)", str(error or ""))
                dead = ended is not None and "CANCELLED" not in ended.group(1)
                if left and dead and tries.get(job.job_id, 0) < worker.max_retries:
                    again = ex.submit(SlurmJob(), [sp.to_dict() for sp in left], *shared)
                    tries[again.job_id] = tries.get(job.job_id, 0) + 1
                    log.warning("slurm job %s (%d runs): %s; resubmitted as job %s with its %d unfinished runs "
                                "(retry %d of %d)", job.job_id, len(group), line, again.job_id, len(left),
                                tries[again.job_id], worker.max_retries)
                    pending[again] = left
                    group = [sp for sp in group if sp not in left]
                    left = []
                elif line:
                    log.error("slurm job %s (%d runs): %s", job.job_id, len(group), line)
                for sp in group:
                    err = RuntimeError(f"slurm job {job.job_id}: {line}") if sp in left else None
                    if err is not None:
                        mark_failed(profile, sp.hash, str(err))  # a killed job's runs stayed RUNNING
                    outcomes.append((sp, err))
                    progress.finished(sp.hash, sp.label, err)
    _report(outcomes)


RUNNERS: dict[str, Callable[[list[RunSpec], Config, Worker, StageProgress], None]] = {
    "local": run_local, "ray": run_ray, "slurm": run_slurm}


def waves(todo: list[RunSpec]) -> list[list[RunSpec]]:
    """`todo` in waves: a run that requires another run of `todo` (a distillation student its teacher,
    l2l.config.required_hashes) comes in a later wave than it; the plan's order within a wave."""
    wave_of: dict[str, int] = {}
    pending, hashes = list(todo), {s.hash for s in todo}
    while pending:
        before = len(pending)
        for s in list(pending):
            req = [h for h in required_hashes(s) if h in hashes]
            if all(h in wave_of for h in req):
                wave_of[s.hash] = 1 + max((wave_of[h] for h in req), default=-1)
                pending.remove(s)
        if len(pending) == before:  # the plan refuses cycles; a hand-made list may still have one
            raise RuntimeError(f"runs {', '.join(s.hash for s in pending)} require each other")
    out: list[list[RunSpec]] = [[] for _ in range(1 + max(wave_of.values(), default=-1))]
    for s in todo:
        out[wave_of[s.hash]].append(s)
    return out


def _describe(spec: RunSpec) -> str:
    return f"{spec.hash} ({spec.label})"


# --- how each run executes: separate, stacked, or several per GPU ---------------------------

def _resume_point(root: str | Path, spec: RunSpec) -> tuple | None:
    """(phase, epoch) of a run's newest resume state (its sidecar's record), None for a fresh run: the
    runs of one stack start from the same point."""
    side = Path(root) / RUNS / spec.hash / "last.pt.json"
    try:
        rec = read_json(side)
        return rec["phase"], rec["epoch"]
    except (OSError, IntegrityError, KeyError, TypeError):
        return None


def execution(wave: list[RunSpec], config: Config, root: str | Path = ".", device: str | None = None,
              throughput: Path = THROUGHPUT_FILE) -> list[tuple[int, list[RunSpec | Stack]]]:
    """The wave's tasks per number of runs in flight on a GPU (runs_per_gpu), each task one run or a
    Stack of runs that differ only by seed. executor.stack_seeds: auto = per model family the fastest
    mode measured on `device` (default: this process's; a cluster backend: the one GPU measured, if
    exactly one is) in benchmarks/throughput.json (l2l/modes.py), separate where none is; off; or K."""
    cfg = config.executor
    setting = cfg["stack_seeds"]
    measured_on, measured = None, {}
    if setting == "auto":
        if device is None and cfg["backend"] == "local":
            device = device_info(pick_device())["device_name"]
        measured_on, measured = modes.measured(Path(root) / throughput, device)
    groups: dict[str, list[RunSpec]] = {}
    for s in wave:
        groups.setdefault(seed_group(s), []).append(s)
    out: dict[int, list[RunSpec | Stack]] = {}
    for specs in groups.values():
        s = specs[0]
        name, family = modes.family_modes(s.model, s.model_cfg, measured, config.profile.models)
        mode = modes.decide(setting, family, modes.stack_refusal(s) is None, len(specs))
        if mode.images_per_s is not None:
            log.info("%s/%s/%s: %s, the fastest mode measured on %s (%s: %.0f images/s)", s.experiment, s.model,
                     s.dataset, mode.name, measured_on, name, mode.images_per_s)
        by_start: dict[tuple | None, list[RunSpec]] = {}  # a stack's runs start from the same resume state
        for m in specs:
            by_start.setdefault(_resume_point(root, m) if mode.members > 1 else None, []).append(m)
        for same in by_start.values():
            for chunk, m in modes.assign(same, setting, family, modes.stack_refusal(s) is None):
                n = m.concurrent if m.images_per_s is not None else cfg["runs_per_gpu"]
                out.setdefault(n, []).append(Stack(tuple(chunk)) if len(chunk) > 1 else chunk[0])
    return sorted(out.items())


def run_plan(todo: list[RunSpec], config: Config, root: str | Path = ".",
             estimates: dict[str, float | None] | None = None) -> None:
    """Train every run of `todo` with the backend params.yaml names, a run after the runs it requires
    (one call of the backend per wave, so every backend respects the order); raises if any run failed.
    A failed wave stops the stage: the later waves are not started and the error names the runs
    that required a run that did not finish (re-running the stage trains the rest).
    estimates: the cost model's seconds per run hash, for the stage's ETA (l2l.progress)."""
    if not todo:
        return
    parallel = len(local_slots(config.executor["runs_per_gpu"])) if config.executor["backend"] == "local" else 1
    progress = StageProgress([s.hash for s in todo], estimates, parallel=parallel)
    try:
        with bars_around_logging(progress.bars):
            _run_waves(todo, config, root, progress)
    finally:
        progress.close()


def _run_waves(todo: list[RunSpec], config: Config, root: str | Path, progress: StageProgress) -> None:
    cfg = config.executor
    worker = Worker(str(Path(root).resolve()), cpu_threads=cfg["cpu_threads"] or torch.get_num_threads(),
                    checkpoint_every=cfg["checkpoint_every"], checkpoint_min_seconds=cfg["checkpoint_min_seconds"],
                    cuda_graphs=cfg["cuda_graphs"], max_retries=cfg["max_retries"])
    by_hash = {s.hash: s for s in todo}

    def finished(h: str) -> bool:
        return (Path(worker.root) / RUNS / h / "result.json").exists()

    stages = waves(todo)
    for i, wave in enumerate(stages):
        if len(stages) > 1:
            log.info("wave %d of %d: %d runs", i + 1, len(stages), len(wave))
        unfinished = [(s, h) for s in wave for h in required_hashes(s) if not finished(h)]
        if unfinished:  # a required run outside `todo` that is not finished
            s, h = unfinished[0]
            raise RunsFailed(f"{len(unfinished)} runs require unfinished runs; first: {_describe(s)} requires "
                               f"{_describe(by_hash[h]) if h in by_hash else h}, which has no result.json")
        try:
            errors = []
            for runs_per_gpu, tasks in execution(wave, config, worker.root):
                try:  # each group of its own runs per GPU; a failure in one does not stop the other
                    RUNNERS[cfg["backend"]](tasks, replace(config, executor={**cfg, "runs_per_gpu": runs_per_gpu}),
                                            worker, progress)
                except Exception as e:  # noqa: BLE001 (re-raised below, after the wave's other runs)
                    errors.append(e)
            if errors:
                raise errors[0]
        except Exception as e:
            later = [s for w in stages[i + 1:] for s in w]
            if not later:
                raise
            failed = {s.hash for s in wave if not finished(s.hash)}
            blocked = [(s, h) for s in later for h in required_hashes(s) if h in failed]
            note = (f"; e.g. {_describe(blocked[0][0])} requires {_describe(by_hash[blocked[0][1]])}"
                    if blocked else "")
            raise RunsFailed(f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; {len(later)} runs of later "
                               f"waves not started, {len(blocked)} of them requiring a run that did not finish"
                               + note) from e

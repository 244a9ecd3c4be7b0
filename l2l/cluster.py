"""Workers on other machines (Ray nodes, Slurm jobs): the MLflow URI they log to, checked before
anything is submitted; what a Ray cluster can run at once; a dead job's error in one line.

Tracking choice (docs/cluster.md says why): workers log live to one MLflow server, the train stage's
own (``executor.tracking``: where it listens, what URI workers use) or the one MLFLOW_TRACKING_URI
names; artifacts go to the experiment's root inside the checkout, which every node sees at the same
path on the shared file system. A remote backend refuses a loopback URI, a URI that does not answer
(or whose server refuses the workers' Host header), and an artifact root outside the checkout, each
in one line, before it submits a run.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import secrets
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil

from l2l.checks import ClusterError, ConfigError, config_error
from l2l.tracking import REMOTE_SCHEMES, http_uri, single_writer, tracking_uri

WILDCARDS = ("0.0.0.0", "::")
PROBE_PREFIX = ".l2l-probe-"  # a file the driver writes in runs/ for the nodes to find (the shared file system)


# --- where the workers' MLflow is ---------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return host == "localhost"
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def this_machine() -> set[str]:
    """This machine's addresses (every interface's) and names."""
    out = {socket.gethostname(), socket.getfqdn(), "localhost"}
    for addrs in psutil.net_if_addrs().values():
        out.update(a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return out


def worker_host(listen_host: str) -> str:
    """The name workers reach a server listening on `listen_host` by (a wildcard: this node's name)."""
    return socket.getfqdn() if listen_host in WILDCARDS else listen_host


def allowed_hosts(host: str) -> list[str]:
    """Host headers the stage's server accepts (MLflow's --allowed-hosts; its default is loopback and
    RFC 1918 addresses, which a node's name is not): loopback and `host`, any port."""
    out = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]", "[[]::1]:*"]
    bracketed = f"[{host}]" if ":" in host else host
    return out + [bracketed, bracketed.replace("[", "[[]", 1) + ":*"]


def tracking_problem(uri: str, experiment: str, root: str | None = None, timeout_s: float = 10,
                     exists: bool = True) -> str | None:
    """Why workers could not log to the MLflow server at `uri` (None: they can). Asks it for the
    experiment through the REST API (not /health, which MLflow answers whatever the Host header):
    unreachable, refusing the Host header, not serving the experiment (if it should `exist` by now),
    or keeping its artifacts outside the checkout `root` (a path other nodes do not share)."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    for attempt in range(3):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                exp = json.loads(r.read())["experiment"]
            break
        except urllib.error.HTTPError as e:
            if e.code == 403:
                return (f"MLflow at {uri} refuses this Host header ({e.code}): start it with --allowed-hosts "
                        f"{urllib.parse.urlsplit(uri).netloc}")
            if e.code == 404:
                return f"MLflow at {uri} has no experiment {experiment} (not the store the train stage serves?)" \
                    if exists else None
            return f"MLflow at {uri} answers {e.code} {e.reason}"
        except (OSError, ValueError, KeyError) as e:
            if attempt == 2:
                why = getattr(e, "reason", None) or e
                return f"MLflow at {uri} does not answer ({type(why).__name__}: {why})"
    location = exp.get("artifact_location", "")
    if root is not None and location.startswith("file:"):
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path))
        if not path.is_relative_to(Path(root)):
            return (f"experiment {experiment} keeps its artifacts at {location}, outside the checkout {root}: "
                    "nodes would write to a path of their own machine (delete the experiment or move it)")
    return None


@contextlib.contextmanager
def workers_tracking(profile: str, tracking: dict, root: str, remote: bool, backend: str) -> Iterator[str]:
    """The MLflow URI workers log to, for the duration (:func:`l2l.tracking.single_writer`: the server in
    MLFLOW_TRACKING_URI, or the stage's own on ``tracking.host``:``tracking.port``; ``tracking.worker_uri``
    overrides what workers are given). With `remote` workers (other machines) a loopback URI is an error
    before any server starts, and the URI must answer from here with the experiment and an artifact root
    inside the checkout: one line each."""
    given = tracking_uri()
    served = not given.startswith(REMOTE_SCHEMES)
    if served:
        host = urllib.parse.urlsplit(tracking["worker_uri"]).hostname if tracking["worker_uri"] else \
            worker_host(tracking["host"])
        if remote and is_loopback(host):
            key = "worker_uri" if tracking["worker_uri"] else "host"
            raise config_error(f"executor.tracking.{key}", "0.0.0.0 or this node's cluster address for host "
                               "(or worker_uri: a server the workers reach)", tracking[key],
                               problem=f"{backend} workers on other machines cannot reach MLflow on this "
                                       "machine's loopback")
        cm = single_writer(profile, tracking["host"], tracking["port"],
                           None if is_loopback(tracking["host"]) else allowed_hosts(host))
    else:
        if remote and not tracking["worker_uri"] and is_loopback(urllib.parse.urlsplit(given).hostname or ""):
            raise ConfigError(f"MLFLOW_TRACKING_URI: {given} is this machine's loopback: {backend} workers on "
                              "other machines cannot reach it; expected a server address they reach")
        problem = remote and given.startswith(("http://", "https://")) and \
            tracking_problem(given, f"l2l-{profile}", exists=False)  # before MLflow's client waits minutes on it
        if problem:
            raise ClusterError(f"{backend}: MLFLOW_TRACKING_URI: {problem}; nothing submitted")
        cm = single_writer(profile)
    with cm as here:
        uri = tracking["worker_uri"] or (http_uri(host, urllib.parse.urlsplit(here).port) if served else here)
        if remote and uri.startswith(("http://", "https://")):
            problem = tracking_problem(uri, f"l2l-{profile}", root)
            if problem:
                raise ClusterError(f"{backend}: workers' tracking URI: {problem}; nothing submitted")
        yield uri


# --- Ray ----------------------------------------------------------------------------------

def ray_slots(resources: dict, cpus_per_run: float, gpu_share: float) -> int:
    """Runs a Ray cluster with `resources` (ray.cluster_resources()) trains at once."""
    slots = int(resources.get("CPU", 0) / cpus_per_run + 1e-9)
    if gpu_share:
        slots = min(slots, int(resources.get("GPU", 0) / gpu_share + 1e-9))
    return slots


def spans_machines(node_addresses: list[str]) -> bool:
    """Whether a cluster whose nodes have these addresses has a node on another machine."""
    here = this_machine()
    return any(a not in here and not is_loopback(a) for a in node_addresses)


@contextlib.contextmanager
def probe_file(root: str) -> Iterator[str]:
    """A file in runs/ that nodes must see (the shared file system) while the context lasts; its name."""
    runs = Path(root) / "runs"
    runs.mkdir(exist_ok=True)
    path = runs / f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    path.write_text("written by the train stage for its workers to find\n")
    try:
        yield path.name
    finally:
        path.unlink(missing_ok=True)


def probe_node(root: str, probe: str, uri: str, experiment: str) -> str | None:
    """Run on a worker node before any run is submitted: None if it can train (it imported this
    checkout's l2l, sees `probe` in runs/ and the prepared data, and reaches MLflow), else why."""
    node = socket.gethostname()
    if not (Path(root) / "runs" / probe).exists():
        return f"node {node} does not see {root}/runs as the train stage does (a shared file system at the same path)"
    if not (Path(root) / "data" / "prepared").is_dir():
        return f"node {node} has no {root}/data/prepared (the data stage's output, on the shared file system)"
    problem = tracking_problem(uri, experiment) if uri.startswith(("http://", "https://")) else None
    return f"node {node}: {problem}" if problem else None


# --- Slurm (submitit) ---------------------------------------------------------------------

def _exception_line(line: str) -> str:
    # "l2l.checks.RunsFailed: ..." -> "RunsFailed: ..."
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?::|$))", "", line.strip())


def job_error(e: BaseException) -> str:
    """A failed submitit job's error in one line: the exception its code raised (the last line of the
    traceback submitit keeps), or, for a job that ended without a result (killed, node failure), its
    state and the last error line of its log; never only a log path."""
    text = str(e)
    m = re.search(r"failed during processing with trace:\n-+\n(.*?)\n-+\n", text, re.S)
    if m:
        lines = [line for line in m.group(1).splitlines() if line.strip()]
        return _exception_line(lines[-1]) if lines else "failed (no traceback)"
    m = re.search(r"has not produced any output \(state: ([^)]*)\)", text)
    if m:
        log = text.split("-" * 40, 1)[1] if "-" * 40 in text else ""
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"error|exception|killed|cancelled|oom|signal|memory", line, re.I)]
        tail = (errors or lines or ["(its log is empty)"])[-1]
        return f"ended without a result (state {m.group(1)}); its log ends: {_exception_line(tail)[:300]}"
    return " ".join(text.split())[:500] or type(e).__name__

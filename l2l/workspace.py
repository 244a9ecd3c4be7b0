"""The workspace's selection while DVC runs a stage: held, checked unchanged, and visible to git.

Every stage reads its plan from params.yaml and run.yaml (l2l.config: PARAMS_FILE, RUN_FILE). DVC runs
an experiment in the workspace (`dvc exp run -S run.yaml:...`) by stashing the workspace, writing the
overrides into run.yaml and checking the result out into the workspace; it locks the workspace for
that (its experiments lock, .dvc/tmp/exps/rwlock, path "workspace") but not while the experiment
runs, and it releases its repository lock while a stage's command runs. A second `dvc exp run -S`
started then rewrote run.yaml (any key) under the running experiment, whose later stages and
dvc.lock followed the second's selection (issue 23). So:

- :func:`hold`: a stage that DVC runs holds DVC's experiments lock on the workspace for reading, with
  DVC's own lock function, while its command runs (between commands DVC holds its repository lock).
  DVC's check in a second `dvc exp run` (also ``--queue``, ``--temp``) then refuses it before it
  stashes or rewrites anything, naming this stage's PID; DVC drops the entry of a process that died.
- :func:`changes`: what changed in the selection files while the stage ran (a hand edit, or a second
  experiment in the moment before a stage holds the lock): the stage then fails in one line and DVC
  records nothing of it, rather than DVC recording a selection the stage did not run.
- :func:`let_git_see`: after a failed `dvc exp run -S`, run.yaml held the new value while git showed
  it clean and `git checkout run.yaml` did nothing. DVC's stash, reset and checkout write run.yaml
  twice within one second, the old content then the new one, and a value of the same length
  (``papers: all`` -> ``papers: P3``, comment column kept) leaves the same size; the index keeps the
  stat of the first write with the old blob, and git, comparing mtimes to the second, trusts it once
  the index is written again (DVC's last reset). The stage moves the file's mtime a second on when
  the index holds other content with the same size and second, so ``git status`` and
  ``git checkout run.yaml`` see the change.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import yaml

from l2l.checks import LockedError

# The files a stage reads its plan from: l2l.config's PARAMS_FILE and RUN_FILE (tests/test_workspace.py
# keeps the two in step; this module sits below l2l.config, which the report stage does not load).
SELECTION_FILES = (Path("params.yaml"), Path("run.yaml"))
DVC_STAGE_ENV = "DVC_STAGE"  # set by DVC for every stage command it runs (dvc.env.DVC_STAGE)
EXPERIMENTS_LOCK_DIR = Path(".dvc/tmp/exps")  # DVC's experiments lock (dvc.repo.experiments.utils.get_exp_rwlock)
WORKSPACE = "workspace"  # the path DVC locks there before it stashes the workspace for an experiment


def run_by_dvc() -> bool:
    """Whether DVC runs this process as a stage command in this repository (cwd: the repository root)."""
    return bool(os.environ.get(DVC_STAGE_ENV)) and Path(".dvc").is_dir()


@contextlib.contextmanager
def hold(stage: str) -> Iterator[None]:
    """While the context lasts, this process holds DVC's experiments lock on the workspace for reading
    (when DVC runs it; else nothing). A writer in progress (a `dvc exp run` stashing the workspace right
    now) is a LockedError naming it."""
    if not run_by_dvc():
        yield
        return
    # DVC's own lock code, imported only here: as mlflow, dvc stays out of every import of the library
    from dvc.config import Config
    from dvc.fs import localfs
    from dvc.lock import LockError
    from dvc.rwlock import rwlock

    EXPERIMENTS_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    hardlink = Config.from_cwd()["core"].get("hardlink_lock", False)
    cmd = (f"l2l stage {stage} of the pipeline running in this workspace (it reads run.yaml): "
           "wait for that run to end, then start this one")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(rwlock(str(EXPERIMENTS_LOCK_DIR), localfs, cmd, [WORKSPACE], [], hardlink))
        except LockError as e:
            holders = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("(PID"))
            raise LockedError(f"{SELECTION_FILES[1]}: being rewritten by another dvc exp run "
                              f"({holders or 'unknown'}); wait for it to finish, then re-run") from None
        yield


def snapshot(paths=SELECTION_FILES) -> dict[Path, bytes | None]:
    """Each file's bytes (None: absent)."""
    out = {}
    for p in paths:
        try:
            out[p] = p.read_bytes()
        except FileNotFoundError:
            out[p] = None
    return out


def changes(before: dict[Path, bytes | None]) -> str | None:
    """What changed in the files of `before` since it was taken: "<file>: <key> <old> -> <new>, ..."
    for every top-level key whose value differs (any key, whatever the schema), or None."""
    after = snapshot(tuple(before))
    parts = []
    for p, old in before.items():
        new = after[p]
        if new == old:
            continue
        try:
            a, b = (yaml.safe_load(x) if x is not None else None for x in (old, new))
        except yaml.YAMLError:
            a = b = None
        if isinstance(a, dict) and isinstance(b, dict):
            keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
            if keys:  # else the same values (a comment, the layout): nothing a stage reads
                parts.append(f"{p}: " + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys))
        else:
            parts.append(f"{p}: {'created' if old is None else 'removed' if new is None else 'rewritten'}")
    return "; ".join(parts) or None


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def let_git_see(path: Path = SELECTION_FILES[1]) -> bool:
    """If git's index holds other content for `path` than the file, with the same size and an mtime in
    the same second (git's stat cache would call it unchanged once the index is written again), move
    the file's mtime a second on so that git compares the content. Returns whether it did. Outside
    git, or for an untracked file: nothing."""
    try:
        entry = _git("ls-files", "--stage", "--debug", "--", str(path))
        lines = entry.stdout.splitlines()
        if entry.returncode != 0 or not lines:
            return False
        stat = dict(ln.strip().split(": ", 1) for ln in lines[1:] if ": " in ln)
        content = _git("hash-object", "--", str(path))
        if content.returncode != 0 or content.stdout.strip() == lines[0].split()[1]:
            return False
        st = path.stat()
        entry_s = int(stat["mtime"].split(":")[0])
        if int(stat["size"].split()[0]) != st.st_size or entry_s != st.st_mtime_ns // 1_000_000_000:
            return False  # git's stat check sees the change
        os.utime(path, ns=(st.st_atime_ns, max(time.time_ns(), (entry_s + 1) * 1_000_000_000)))
        return True
    except (OSError, KeyError, ValueError, IndexError):  # no git, an unexpected listing: nothing to repair
        return False

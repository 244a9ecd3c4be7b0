"""Small file helpers: every write goes to a temporary path and is renamed into place, so an
interrupted stage never leaves a half-written file behind; sealed records (a JSON file carrying
the sha256 of the files a result depends on, and of itself), checked where they are read; and
the lock a run folder is trained under."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from l2l.checks import IntegrityError, LockedError


def _clean(obj: Any) -> Any:
    # JSON has no NaN/inf: write null so every reader (pandas, DVC, browsers) agrees.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _clean(obj.item())
    return obj


def temp_path(path: Path, suffix: str = ".tmp") -> Path:
    """A temporary name beside `path`, unique per process and call (two writers never share one); it
    carries the writer's PID, so a write a kill left unfinished can be told from one in progress."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


_TEMP_NAME = re.compile(r"\.(\d+)\.[0-9a-f]{8}\.(tmp|old)$")  # temp_path's names (.old: a folder swapped out)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True


def remove_stale_temps(folder: Path, every: bool = False) -> list[Path]:
    """Remove the temporaries (temp_path's names: files, or folders of an atomic folder write) that a
    killed writer left in `folder`: those whose writer's PID runs no more, or every one when the caller
    holds the folder's lock (`every`: only its holder writes there). Returns what it removed."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for p in Path(folder).iterdir():
        m = _TEMP_NAME.search(p.name)
        pid = int(m.group(1)) if m else None
        if pid is None or pid == os.getpid() or not (every or not _process_exists(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class _HashingWriter:
    """A write-only file that hashes what passes through it: the hash costs no second read."""

    def __init__(self, f: IO[bytes]):
        self.f, self.h = f, hashlib.sha256()

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def read(self, *_):  # present (numpy takes a file object by it), never used: a stream only written
        raise io.UnsupportedOperation("write-only")


# The file system refused to grow a file: full, over a quota, or over the process's file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(e: BaseException | None) -> OSError | None:
    """The no-space OSError behind `e`: itself, or what it was raised from or during (torch.save turns
    the OSError of its file into a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> str:
    """write(f) into a temporary file beside `path`, then rename it into place; returns the
    sha256 of the bytes written (hashed as they were written). A file system out of space is an
    OSError naming `path` (the OS's own names no file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            write(w)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = no_space(e)
        if full is not None and full.filename is None:
            raise OSError(full.errno, full.strerror, str(path)) from e
        raise
    return w.h.hexdigest()


def write_text(path: Path, text: str) -> str:
    return write_atomic(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> str:
    return write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path, advice: str = "delete it and re-run the stage that writes it") -> Any:
    """The JSON in `path`; invalid JSON is an IntegrityError naming the file."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; corrupt, "
                             f"truncated or edited): {advice}") from None


def read_npz(path: Path, advice: str = "delete it and re-run the stage that writes it") -> dict[str, Any]:
    """Every array of an .npz (no pickles); a truncated or corrupt file is an IntegrityError naming it."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise IntegrityError(f"{path}: not a readable .npz ({type(e).__name__}: {e}): {advice}") from None


# --- sealed records ------------------------------------------------------------------------

SEAL = "sha256"  # the record's own digest: sha256 of its canonical JSON without this key
FILES = "files"  # name (in the record's folder) -> sha256 of every file the record's result depends on


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != SEAL}
    return hashlib.sha256(json.dumps(_clean(body), sort_keys=True, allow_nan=False).encode()).hexdigest()


def write_record(path: Path, record: dict, files: dict[str, str]) -> dict:
    """Write `record` with the sha256 of the files it depends on (names in its folder) and its own seal."""
    sealed = {**_clean(record), FILES: dict(files)}
    sealed[SEAL] = _digest(sealed)
    write_json(path, sealed)
    return sealed


def read_record(path: Path, check: Iterable[str] | None = None, advice: str | None = None) -> dict:
    """A sealed record, verified: its own seal, and the sha256 of each file named in `check`
    (default: every file it records). A mismatch is one IntegrityError naming the file and what to delete."""
    path = Path(path)
    advice = advice or f"delete {path.parent}/ and re-run the stage that writes it"
    record = read_json(path, advice)
    if not isinstance(record, dict) or SEAL not in record or not isinstance(record.get(FILES), dict):
        raise IntegrityError(f"{path}: no recorded hashes (written by an older l2l or by hand): {advice}")
    if record[SEAL] != _digest(record):
        raise IntegrityError(f"{path}: contents do not match its recorded sha256 (edited or corrupt): {advice}")
    for name in record[FILES] if check is None else check:
        f = path.parent / name
        expected = record[FILES].get(name)
        if expected is None:
            raise IntegrityError(f"{path}: records no sha256 for {name}: {advice}")
        if not f.exists():
            raise IntegrityError(f"{f}: missing (its record {path.name} lists it): {advice}")
        if sha256_file(f) != expected:
            raise IntegrityError(f"{f}: sha256 does not match {path.name} (modified, truncated or corrupt): {advice}")
    return record


# --- the lock a run folder is trained under ----------------------------------------------------

LOCK_NAME = ".lock"
_HELD: dict[str, list] = {}  # lock path -> [open file, depth]: re-entrant within a process


def lock_holder(lock: Path) -> str:
    try:
        return Path(lock).read_text().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


def is_locked(run_dir: Path) -> bool:
    """Whether some process (this one included) holds run_dir's lock right now."""
    lock = Path(run_dir) / LOCK_NAME
    if str(lock.resolve()) in _HELD:
        return True
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An OS lock (flock) on run_dir/.lock for as long as the context lasts; the OS releases it
    when the process ends, however it ends. Another process holding it: LockedError naming its PID."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    key = str(lock.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError(f"{run_dir}: being trained by {lock_holder(lock)} (it holds {lock}); "
                                  "wait for it to finish or stop that process, then re-run") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        _HELD[key] = [f, 1]
        remove_stale_temps(run_dir, every=True)  # only a holder writes here: any temporary is a killed write's
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            f = _HELD.pop(key)[0]
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

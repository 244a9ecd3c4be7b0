"""Original archives and prepared array directories: md5-checked before anything is read,
written atomically so that a crash never leaves a half-prepared directory. Shared by the CIFAR
(l2l/data.py) and Pascal VOC (l2l/voc.py) preparation."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tarfile
import uuid
from pathlib import Path

import numpy as np
from torchvision.datasets.utils import calculate_md5, check_integrity

from l2l.checks import DataError
from l2l.io import remove_stale_temps, temp_path, write_atomic

# Errors torchvision raises for a bad archive/batch file (RuntimeError = md5 check failed).
ARCHIVE_ERRORS = (RuntimeError, OSError, EOFError, tarfile.TarError, pickle.UnpicklingError, KeyError, ValueError)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def stage_mirror_archive(dataset: str, archive: Path, md5: str, root: Path) -> str:
    """Check a mirror's original archive against torchvision's md5, then put a copy where torchvision
    looks for it (root; temp name then rename), so torchvision skips the network and extracts it.
    Returns the md5."""
    if not archive.is_file():
        raise DataError(f"{dataset}: mirror archive not found: {archive}")
    actual = calculate_md5(archive)
    if actual != md5:
        raise DataError(f"{archive}: corrupt or truncated archive (md5 {actual}, expected {md5})")
    root.mkdir(parents=True, exist_ok=True)
    cached = root / archive.name
    if not check_integrity(cached, md5):
        part = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.part")
        try:
            shutil.copyfile(archive, part)
            os.replace(part, cached)
        finally:
            part.unlink(missing_ok=True)
    return actual


def array_sha256(a: np.ndarray) -> str:
    """sha256 of the array's raw C-order bytes (shape/dtype are checked separately)."""
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_prepared(out_dir: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], manifest: dict) -> None:
    """{split}_x.npy, {split}_y.npy and manifest.json into a temp dir beside out_dir, then swapped in
    with renames (same filesystem); the manifest is written last: its presence marks a complete dir."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir.parent)  # a killed data stage's (their names carry its PID)
    tmp, old = temp_path(out_dir), temp_path(out_dir, ".old")
    tmp.mkdir()
    try:
        for name, (x, y) in arrays.items():  # through write_atomic: a full disk is an error naming the file
            write_atomic(tmp / f"{name}_x.npy", lambda f, x=x: np.save(f, x))
            write_atomic(tmp / f"{name}_y.npy", lambda f, y=y: np.save(f, y))
        _write_json(tmp / "manifest.json", manifest)
        if out_dir.exists():
            os.replace(out_dir, old)  # a directory can't be os.replace'd onto a non-empty one
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old.exists():
                os.replace(old, out_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

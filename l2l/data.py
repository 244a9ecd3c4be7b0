"""Data preparation: read a source, carve stratified splits, write verified arrays.

CIFAR-10/100 here; Pascal VOC 2007 (multi-label) in l2l/voc.py; both check archives and write
atomically through l2l/archives.py, and load_prepared loads either. prepare_dataset() is the data stage's entry for any dataset.
CIFAR sources: torchvision download, a local mirror of the original archives, or an .npz of arrays.
Output (out_dir): {train,val,test}_{x,y}.npy (x uint8 NCHW, y int64) + manifest.json,
written atomically so a crash never leaves a half-prepared directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision.datasets
from torchvision.datasets.utils import calculate_md5

from l2l.archives import ARCHIVE_ERRORS, array_sha256, one_line, stage_mirror_archive, write_prepared
from l2l.checks import DataError
from l2l.datasets import DATASETS, DataSettings, SourceConfig, SplitConfig, val_joins_train
from l2l.device_data import DeviceData
from l2l.spec import RunSpec
from l2l.voc import prepare_voc2007

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


@dataclass
class _Raw:
    """What a source yields before splitting."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    classes: list[str]
    source: dict


# ---------------------------------------------------------------- sources


def _tv_class(dataset: str) -> type:
    # Looked up at call time so tests can monkeypatch the class attributes (md5s).
    return getattr(torchvision.datasets, DATASETS[dataset].torchvision)


def _load_torchvision(dataset: str, root: Path) -> tuple[np.ndarray, ...]:
    """Instantiate the torchvision class with download=True: it downloads/extracts only when the
    batch files are missing or fail md5, and checks every batch file's md5 before unpickling."""
    cls = _tv_class(dataset)
    train = cls(str(root), train=True, download=True)
    test = cls(str(root), train=False, download=True)
    x, xt = (np.ascontiguousarray(d.data.transpose(0, 3, 1, 2)) for d in (train, test))  # NHWC -> NCHW
    return x, np.asarray(train.targets), xt, np.asarray(test.targets), list(train.classes)


def _from_download(dataset: str, src: SourceConfig) -> _Raw:
    cls = _tv_class(dataset)
    try:
        x, y, xt, yt, classes = _load_torchvision(dataset, Path(src.root))
    except Exception as e:  # network errors come in many types (URLError, socket, HTTP, ...)
        raise DataError(
            f"{dataset}: download of {cls.url} into {src.root} failed ({one_line(e)}); offline options: "
            f"data.source=mirror with a dir holding {cls.filename}, or data.source=npz with an array file"
        ) from e
    return _Raw(x, y, xt, yt, classes, {"kind": "download", "path": cls.url, "md5": cls.tgz_md5})


def _from_mirror(dataset: str, src: SourceConfig) -> _Raw:
    if src.mirror is None:
        raise DataError(f"{dataset}: data.source=mirror needs a mirror directory (data.mirror)")
    cls = _tv_class(dataset)
    archive = Path(src.mirror) / cls.filename
    md5 = stage_mirror_archive(dataset, archive, cls.tgz_md5, Path(src.root))
    try:
        x, y, xt, yt, classes = _load_torchvision(dataset, Path(src.root))
    except ARCHIVE_ERRORS as e:
        raise DataError(f"{archive}: cannot extract or load archive ({one_line(e)})") from e
    return _Raw(x, y, xt, yt, classes, {"kind": "mirror", "path": str(archive), "md5": md5})


def _npz_x(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """Normalise (N,3072) / (N,3,32,32) / (N,32,32,3) uint8 to NCHW."""
    if x.dtype == np.uint8:
        if x.ndim == 2 and x.shape[1] == 3072:  # CIFAR row layout: 1024 R, 1024 G, 1024 B
            return x.reshape(-1, 3, 32, 32)
        if x.shape[1:] == (3, 32, 32):
            return x
        if x.shape[1:] == (32, 32, 3):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(
        f"{path}: key '{key}' must be uint8 of shape (N,3072), (N,3,32,32) or (N,32,32,3); got {x.dtype} {x.shape}"
    )


def _from_npz(dataset: str, src: SourceConfig) -> _Raw:
    if src.npz is None:
        raise DataError(f"{dataset}: data.source=npz needs an array file (data.npz)")
    path = Path(src.npz)
    if not path.is_file():
        raise DataError(f"{path}: npz file not found")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # not a zip / truncated
        raise DataError(f"{path}: not a readable .npz archive ({one_line(e)})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (a single .npy array?); need keys x_train, y_train")
    with z:
        missing = [k for k in ("x_train", "y_train") if k not in z.files]
        if missing:
            raise DataError(f"{path}: missing key '{missing[0]}' (need x_train (N,3072) uint8 and y_train (N,) int)")
        # x_test/y_test count only as a pair: a lone x_test (e.g. a partial test set) is ignored.
        keys = ["x_train", "y_train"] + (["x_test", "y_test"] if {"x_test", "y_test"} <= set(z.files) else [])
        arrays = {}
        for k in keys:  # NpzFile is lazy: truncation and pickled members show only when read
            try:
                arrays[k] = z[k]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"{path}: key '{k}' unreadable ({one_line(e)})") from e

    x = _npz_x(path, "x_train", arrays["x_train"])
    xt = _npz_x(path, "x_test", arrays["x_test"]) if "x_test" in arrays else None
    return _Raw(
        x, arrays["y_train"], xt, arrays.get("y_test"), list(DATASETS[dataset].classes),
        {"kind": "npz", "path": str(path), "md5": calculate_md5(path)},
    )


def _check_labels(where: str, key: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: key '{key}' must be a 1-D integer label array; got {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise DataError(f"{where}: key '{key}' has {len(y)} labels but the images have {len(x)} rows")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where}: key '{key}' labels must lie in [0, {num_classes}); got [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


_READERS = {"download": _from_download, "mirror": _from_mirror, "npz": _from_npz}


# ---------------------------------------------------------------- splits


def _stratified_take(y: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator, k: int):
    """Take n indices from pool with per-class counts proportional to the pool's (largest remainder,
    ties broken at random); returns (taken, rest), both sorted."""
    labels = y[pool]
    counts = np.bincount(labels, minlength=k)
    quota, rem = np.divmod(n * counts, len(pool))  # exact integer arithmetic
    short = n - int(quota.sum())
    # Classes with a larger remainder get the leftover slots; they always have spare images.
    quota[np.lexsort((rng.random(k), -rem))[:short]] += 1
    taken = np.sort(np.concatenate(
        [rng.choice(pool[labels == c], size=quota[c], replace=False) for c in range(k)]
    ).astype(np.int64))
    return taken, np.setdiff1d(pool, taken, assume_unique=True)


def _split(y: np.ndarray, has_test: bool, cfg: SplitConfig, k: int, where: str = "the source") -> dict[str, np.ndarray]:
    """Indices into the training set for each carved split (test only when the source has none).
    Sizes the training images cannot hold are a one-line error naming their keys (cfg.key)."""
    n = len(y)
    test = 0 if has_test else cfg.test_size
    sub = cfg.train_subset or 0
    if cfg.val_size < 1 or (not has_test and test < 1) or (cfg.train_subset is not None and sub < 1):
        raise DataError(f"split sizes must be >= 1: val_size={cfg.val_size}, test_size={cfg.test_size}, "
                        f"train_subset={cfg.train_subset}")
    # Without a subset the whole remainder is the train split, so it must not be empty.
    if test + cfg.val_size + sub > n or (cfg.train_subset is None and test + cfg.val_size >= n):
        parts = {"test_size": test, "val_size": cfg.val_size, "train_subset": cfg.train_subset}
        keys = [key for key, v in parts.items() if v]
        carved = {"test_size": " (carved: the source has no test set)"}
        total = " + ".join(f"{key} {parts[key]}{carved.get(key, '')}" for key in keys)
        need = (f"= {test + cfg.val_size + sub} > the {n} training images of {where}" if sub else
                f"leave no training image of the {n} of {where}")
        raise DataError(f"params.yaml: {cfg.key}: split sizes too large: {total} {need}; lower "
                        + ", ".join(reversed(keys)))
    rng = np.random.default_rng(cfg.seed)
    rest = np.arange(n, dtype=np.int64)
    out = {}
    if not has_test:
        out["test"], rest = _stratified_take(y, rest, test, rng, k)
    out["val"], rest = _stratified_take(y, rest, cfg.val_size, rng, k)
    out["train"] = _stratified_take(y, rest, sub, rng, k)[0] if cfg.train_subset is not None else rest
    return out


# ---------------------------------------------------------------- output


def prepare(dataset: str, source: SourceConfig, split: SplitConfig, out_dir: Path) -> dict:
    """Read the source, carve splits, write out_dir/{train,val,test}_{x,y}.npy + manifest.json
    atomically. Returns the manifest dict."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}' (known: {', '.join(DATASETS)})")
    if source.kind not in _READERS:
        raise DataError(f"{dataset}: unknown data source '{source.kind}' (known: {', '.join(_READERS)})")
    k = DATASETS[dataset].num_classes
    raw = _READERS[source.kind](dataset, source)
    where = raw.source["path"]
    y = _check_labels(where, "y_train", raw.x_train, raw.y_train, k)
    has_test = raw.x_test is not None
    if has_test:
        y_test = _check_labels(where, "y_test", raw.x_test, raw.y_test, k)

    idx = _split(y, has_test, split, k, where)
    arrays = {s: (raw.x_train[idx[s]], y[idx[s]]) for s in idx}
    if has_test:
        arrays["test"] = (np.ascontiguousarray(raw.x_test), y_test)
    arrays = {s: arrays[s] for s in SPLITS}

    splits = {
        s: {"count": len(ys), "class_counts": np.bincount(ys, minlength=k).tolist(),
            "sha256_x": array_sha256(xs), "sha256_y": array_sha256(ys)}
        for s, (xs, ys) in arrays.items()
    }
    n_test = splits["test"]["count"]
    unused = len(y) - splits["train"]["count"] - splits["val"]["count"] - (0 if has_test else n_test)
    if has_test:
        note = f"official test set ({n_test} images)"
    else:
        note = (f"test split carved from the training set ({n_test} images, stratified, seed {split.seed}): "
                f"the source had no official test set")
    note += f"; val carved from the training set ({split.val_size} images, stratified)"
    if unused:
        note += f"; {unused} training images unused (train_subset={split.train_subset})"
    fingerprint = hashlib.sha256(
        "".join(splits[s][h] for s in SPLITS for h in ("sha256_x", "sha256_y")).encode()
    ).hexdigest()
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "num_classes": k,
        "classes": list(raw.classes),
        "source": raw.source,
        "source_counts": {"train": len(y), "test": len(y_test) if has_test else None},
        "test_origin": "official" if has_test else "carved",
        "split_note": note,
        "split": {"val_size": split.val_size, "test_size": split.test_size,
                  "train_subset": split.train_subset, "seed": split.seed},
        "splits": splits,
        "fingerprint": fingerprint,
    }
    write_prepared(Path(out_dir), arrays, manifest)
    log.info("prepared %s from %s into %s: %s", dataset, source.kind, out_dir,
             ", ".join(f"{s} {splits[s]['count']}" for s in SPLITS))
    return manifest


def prepare_dataset(settings: DataSettings, split: dict, dataset: str, split_key: str = "split") -> dict:
    """The data stage's work for one dataset of the profile (its resolved data settings and split, set at
    `split_key`): the CIFARs through prepare(), voc2007 through l2l.voc. Returns the manifest."""
    if dataset == "voc2007":
        return prepare_voc2007(settings)
    return prepare(dataset, settings.source_for(dataset), settings.split_config(split, split_key),
                   settings.prepared_dir(dataset))


def load_prepared(out_dir: Path, verify: bool = True) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """-> ({"train": (x, y), "val": (x, y), "test": (x, y)}, manifest); x uint8 (N,3,S,S) with S the
    manifest's image_size (32 for the CIFARs, whose manifests have none); y int64 (N,) class indices, or
    for a multi-label manifest (task "multi-label", VOC) int8 (N, num_classes) in {1, 0, -1} (l2l.voc).
    verify=True checks each array's sha256 against the manifest."""
    out_dir = Path(out_dir)
    mpath = out_dir / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
        expected = {s: manifest["splits"][s] for s in SPLITS}
        size = manifest.get("image_size", 32)
        y_spec = ((np.int8, (manifest["num_classes"],)) if manifest.get("task") == "multi-label"
                  else (np.int64, ()))
    except FileNotFoundError as e:
        raise DataError(f"{mpath}: not found; run the data preparation step first") from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{mpath}: unreadable manifest ({one_line(e)})") from e

    data = {}
    for s in SPLITS:
        pair = []
        for part, (dtype, shape) in (("x", (np.uint8, (3, size, size))), ("y", y_spec)):
            path = out_dir / f"{s}_{part}.npy"
            try:
                a = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"{path}: unreadable array ({one_line(e)})") from e
            n = expected[s]["count"]
            if a.dtype != dtype or a.shape != (n, *shape):
                raise DataError(f"{path}: expected {np.dtype(dtype)} {(n, *shape)}, got {a.dtype} {a.shape}")
            if verify and array_sha256(a) != expected[s][f"sha256_{part}"]:
                raise DataError(f"{path}: sha256 mismatch with {mpath} (file modified or corrupt)")
            pair.append(a)
        data[s] = (pair[0], pair[1])
    return data, manifest


def join_val(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The split of a run whose experiment has split.val_size 0: the validation images appended to the
    training ones (train then val), an empty validation split, the same test split."""
    (xt, yt), (xv, yv) = arrays["train"], arrays["val"]
    return {**arrays, "train": (np.concatenate([xt, xv]), np.concatenate([yt, yv])), "val": (xv[:0], yv[:0])}


class DeviceDataCache:
    """Prepared arrays are loaded (and verified) once per dataset and kept on the device."""

    def __init__(self, data: DataSettings, device):
        self.settings, self.device, self._arrays, self._data = data, device, {}, {}

    def prepared(self, dataset: str) -> tuple[dict, dict]:
        """(the host arrays, the manifest) of a prepared dataset, loaded and verified once."""
        if dataset not in self._arrays:
            self._arrays[dataset] = load_prepared(self.settings.prepared_dir(dataset))
        return self._arrays[dataset]

    def get(self, spec: RunSpec):
        aug = spec.train["augment"]
        joined = val_joins_train(spec.data)
        key = (spec.dataset, aug["crop_padding"], aug["flip"], joined)
        if key not in self._data:
            arrays, manifest = self.prepared(spec.dataset)
            arrays = join_val(arrays) if joined else arrays
            self._data[key] = DeviceData(arrays, spec.dataset, self.device, crop_padding=key[1], flip=key[2],
                                         channels_last=self.device.type == "cuda")
        return self._data[key], DATASETS[spec.dataset].num_classes

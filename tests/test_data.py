"""Tests for l2l.data on small generated archives in the original CIFAR formats (no network)."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets
import torchvision.datasets.cifar
from torchvision.datasets.utils import calculate_md5

from l2l import archives
from l2l.checks import DataError
from l2l.data import load_prepared, prepare
from l2l.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES, DATASETS, SourceConfig, SplitConfig

REAL_NPZ = Path(os.environ.get(
    "L2L_CIFAR10_NPZ",
    Path(__file__).resolve().parents[2] / "shared/data/cifar10_train50k_test1017_arrays.npz",
))


@dataclass
class FakeCifar:
    mirror: Path  # dir holding the generated archive
    archive: Path
    x_train: np.ndarray  # (N, 3072) uint8, original row layout
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]


def _images(start: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random images whose first two bytes encode a global index, so every image is unique."""
    x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    idx = np.arange(start, start + n)
    x[:, 0], x[:, 1] = idx % 256, idx // 256
    return x


def image_index(x: np.ndarray) -> np.ndarray:
    """Inverse of _images for NCHW arrays: pixel (c0, row 0, col 0/1) = bytes 0/1 of the row."""
    return x[:, 0, 0, 0].astype(np.int64) + 256 * x[:, 0, 0, 1].astype(np.int64)


def make_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, per_file: int = 20) -> FakeCifar:
    """Write a tar.gz in torchvision's original layout and point the class md5s at its files,
    so the real verification code runs against them."""
    cls = getattr(torchvision.datasets, {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}[dataset])
    k = DATASETS[dataset].num_classes
    rng = np.random.default_rng(123)
    stage = tmp_path / "stage" / cls.base_folder
    stage.mkdir(parents=True)
    label_key = "labels" if dataset == "cifar10" else "fine_labels"
    # CIFAR-100 has one train file (several batches' worth) and one test file.
    train_names = [n for n, _ in cls.train_list]
    sizes = [per_file] * len(train_names) if dataset == "cifar10" else [per_file * 10]
    files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    start = 0
    for name, n in [*zip(train_names, sizes), (cls.test_list[0][0], sizes[0])]:
        files[name] = (_images(start, n, rng), (np.arange(start, start + n) % k))
        start += n
    classes = [f"name_{i}" for i in range(k)]

    def dump(name: str, obj: dict) -> str:
        # The originals are Python-2 pickles; read with encoding="latin1" their keys are str.
        (stage / name).write_bytes(pickle.dumps(obj, protocol=2))
        return calculate_md5(stage / name)

    md5 = {}
    for name, (x, y) in files.items():
        entry = {"batch_label": name, "data": x, label_key: y.tolist(), "filenames": [f"{i}.png" for i in range(len(y))]}
        if dataset == "cifar100":
            entry["coarse_labels"] = (y // 5).tolist()
        md5[name] = dump(name, entry)
    meta = {"label_names": classes} if dataset == "cifar10" else {
        "fine_label_names": classes, "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    md5[cls.meta["filename"]] = dump(cls.meta["filename"], meta)

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = mirror / cls.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(stage, arcname=cls.base_folder)
    monkeypatch.setattr(cls, "tgz_md5", calculate_md5(archive))
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n in train_names])
    monkeypatch.setattr(cls, "test_list", [[cls.test_list[0][0], md5[cls.test_list[0][0]]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[cls.meta["filename"]]})
    test_name = cls.test_list[0][0]
    train = [files[n] for n in train_names]
    return FakeCifar(
        mirror, archive,
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
        files[test_name][0], files[test_name][1], classes,
    )


def mirror_src(tmp_path: Path, fake: FakeCifar) -> SourceConfig:
    return SourceConfig(kind="mirror", root=tmp_path / "raw", mirror=fake.mirror)


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# ---------------------------------------------------------------- mirror


@pytest.mark.parametrize("dataset,val_size", [("cifar10", 20), ("cifar100", 100)])
def test_mirror_prepare_roundtrip(tmp_path, monkeypatch, dataset, val_size):
    fake = make_cifar(tmp_path, monkeypatch, dataset)
    k = DATASETS[dataset].num_classes
    out = tmp_path / "prepared" / dataset
    manifest = prepare(dataset, mirror_src(tmp_path, fake), SplitConfig(val_size, 7, None, seed=0), out)
    arrays, loaded = load_prepared(out)
    assert loaded == manifest
    assert leftovers(out.parent) == [dataset]  # no temp dirs beside the output

    n_train = len(fake.y_train)
    assert manifest["test_origin"] == "official"
    assert manifest["split_note"].startswith(f"official test set ({len(fake.y_test)} images)")
    assert manifest["classes"] == fake.classes
    assert manifest["source"] == {"kind": "mirror", "path": str(fake.archive), "md5": calculate_md5(fake.archive)}
    for s, (x, y) in arrays.items():
        assert x.dtype == np.uint8 and x.shape == (len(y), 3, 32, 32) and y.dtype == np.int64
        entry = manifest["splits"][s]
        assert entry["count"] == len(y)
        assert entry["class_counts"] == np.bincount(y, minlength=k).tolist()
        assert entry["sha256_x"] == sha(x) and entry["sha256_y"] == sha(y)

    # Official test set: unchanged, in order, CIFAR rows -> NCHW.
    xt, yt = arrays["test"]
    np.testing.assert_array_equal(xt, fake.x_test.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(yt, fake.y_test)
    # Train + val partition the training set; each image keeps its label and its pixels.
    assert manifest["splits"]["val"]["class_counts"] == [val_size // k] * k
    ids = {s: image_index(arrays[s][0]) for s in ("train", "val")}
    assert sorted(np.concatenate(list(ids.values()))) == list(range(n_train))
    for s in ("train", "val"):
        x, y = arrays[s]
        np.testing.assert_array_equal(y, fake.y_train[ids[s]])
        np.testing.assert_array_equal(x, fake.x_train[ids[s]].reshape(-1, 3, 32, 32))
    # One known image, pixel by pixel: green plane starts at byte 1024, blue at 2048.
    x, _ = arrays["train"]
    i = int(ids["train"][3])
    row = fake.x_train[i]
    assert x[3, 1, 0, 0] == row[1024] and x[3, 2, 31, 31] == row[3071] and x[3, 0, 1, 5] == row[32 + 5]


def test_mirror_reuses_verified_cache(tmp_path, monkeypatch):
    fake = make_cifar(tmp_path, monkeypatch, "cifar10")
    src = mirror_src(tmp_path, fake)
    m1 = prepare("cifar10", src, SplitConfig(10, 0, None), tmp_path / "a")
    m2 = prepare("cifar10", src, SplitConfig(10, 0, None), tmp_path / "a")  # overwrites in place
    assert m1["fingerprint"] == m2["fingerprint"]
    assert (src.root / fake.archive.name).is_file()


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_mirror_corrupt_archive(tmp_path, monkeypatch, damage):
    fake = make_cifar(tmp_path, monkeypatch, "cifar10")
    good_md5 = calculate_md5(fake.archive)
    damage(fake.archive)
    out = tmp_path / "prepared" / "cifar10"
    with pytest.raises(DataError, match="corrupt or truncated archive") as e:
        prepare("cifar10", mirror_src(tmp_path, fake), SplitConfig(10, 0, None), out)
    msg = str(e.value)
    assert str(fake.archive) in msg and good_md5 in msg and calculate_md5(fake.archive) in msg
    assert "\n" not in msg
    assert not out.exists() and leftovers(out.parent) == []


def test_mirror_truncated_archive_with_matching_md5(tmp_path, monkeypatch):
    """An archive that passes md5 (e.g. a wrong md5 in the config) but fails to extract."""
    fake = make_cifar(tmp_path, monkeypatch, "cifar10")
    _truncate(fake.archive)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", calculate_md5(fake.archive))
    out = tmp_path / "prepared" / "cifar10"
    with pytest.raises(DataError, match="cannot extract or load") as e:
        prepare("cifar10", mirror_src(tmp_path, fake), SplitConfig(10, 0, None), out)
    assert str(fake.archive) in str(e.value)
    assert not out.exists() and leftovers(out.parent) == []


def test_mirror_batch_md5_mismatch(tmp_path, monkeypatch):
    fake = make_cifar(tmp_path, monkeypatch, "cifar10")
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, "0" * 32] for n, _ in cls.train_list])
    with pytest.raises(DataError, match="not found or corrupted"):
        prepare("cifar10", mirror_src(tmp_path, fake), SplitConfig(10, 0, None), tmp_path / "out")


def test_mirror_missing(tmp_path):
    with pytest.raises(DataError, match="mirror archive not found: .*cifar-100-python.tar.gz"):
        prepare("cifar100", SourceConfig("mirror", tmp_path / "raw", mirror=tmp_path / "nowhere"),
                SplitConfig(10, 0, None), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_download_failure_suggests_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as e:
        prepare("cifar10", SourceConfig("download", tmp_path / "raw"), SplitConfig(10, 0, None), tmp_path / "out")
    msg = str(e.value)
    assert "cifar10" in msg and "name resolution" in msg and "npz" in msg and "mirror" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- npz


def balanced(n: int, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unique images (index in the first bytes), labels balanced and shuffled."""
    rng = np.random.default_rng(seed)
    return _images(0, n, rng), rng.permutation(np.arange(n) % k).astype(np.uint8)


def npz_src(tmp_path: Path, name: str = "a.npz", **arrays) -> SourceConfig:
    np.savez(tmp_path / name, **arrays)
    return SourceConfig("npz", tmp_path / "raw", npz=tmp_path / name)


def test_npz_heldout_split(tmp_path):
    x, y = balanced(300)
    src = npz_src(tmp_path, x_train=x, y_train=y, y_test=y[:5])  # y_test alone: no test set
    split = SplitConfig(val_size=30, test_size=50, train_subset=100, seed=0)
    m = prepare("cifar10", src, split, tmp_path / "p")
    arrays, _ = load_prepared(tmp_path / "p")

    assert m["test_origin"] == "carved" and m["source_counts"] == {"train": 300, "test": None}
    assert m["split_note"].startswith("test split carved from the training set (50 images, stratified, seed 0)")
    assert m["classes"] == CIFAR10_CLASSES
    assert m["source"]["md5"] == calculate_md5(tmp_path / "a.npz")
    assert [m["splits"][s]["class_counts"] for s in ("train", "val", "test")] == [[10] * 10, [3] * 10, [5] * 10]
    ids = {s: image_index(arrays[s][0]) for s in arrays}
    for s, (xs, ys) in arrays.items():
        np.testing.assert_array_equal(ys, y[ids[s]])  # labels follow their images
        np.testing.assert_array_equal(xs, x[ids[s]].reshape(-1, 3, 32, 32))
    all_ids = np.concatenate(list(ids.values()))
    assert len(set(all_ids.tolist())) == len(all_ids) == 180  # disjoint

    same = prepare("cifar10", src, split, tmp_path / "q")
    other = prepare("cifar10", src, SplitConfig(30, 50, 100, seed=1), tmp_path / "r")
    assert same["fingerprint"] == m["fingerprint"]
    assert other["fingerprint"] != m["fingerprint"]
    assert other["splits"]["test"]["class_counts"] == [5] * 10


def test_npz_uneven_sizes_stay_proportional(tmp_path):
    x, y = balanced(200)
    m = prepare("cifar10", npz_src(tmp_path, x_train=x, y_train=y), SplitConfig(25, 15, None, seed=3), tmp_path / "p")
    for s, n in (("val", 25), ("test", 15)):
        counts = m["splits"][s]["class_counts"]
        assert sum(counts) == n and max(counts) - min(counts) <= 1
    assert m["splits"]["train"]["count"] == 160


def test_npz_official_test_and_layouts(tmp_path):
    x, y = balanced(60)
    xt, yt = balanced(20, seed=1)
    nchw = lambda a: a.reshape(-1, 3, 32, 32)  # noqa: E731
    nhwc = lambda a: nchw(a).transpose(0, 2, 3, 1)  # noqa: E731
    split = SplitConfig(10, 999, None)
    ms = [
        prepare("cifar10", npz_src(tmp_path, f"{i}.npz", x_train=f(x), y_train=y, x_test=f(xt), y_test=yt),
                split, tmp_path / f"p{i}")
        for i, f in enumerate([lambda a: a, nchw, nhwc])
    ]
    assert len({m["fingerprint"] for m in ms}) == 1  # all three layouts give the same arrays
    assert ms[0]["test_origin"] == "official" and ms[0]["splits"]["test"]["count"] == 20
    arrays, _ = load_prepared(tmp_path / "p2")
    np.testing.assert_array_equal(arrays["test"][0], nchw(xt))


def test_npz_cifar100_names(tmp_path):
    x, y = balanced(300, k=100)
    m = prepare("cifar100", npz_src(tmp_path, x_train=x, y_train=y), SplitConfig(100, 100, None), tmp_path / "p")
    assert m["classes"] == CIFAR100_CLASSES and m["classes"][:2] == ["apple", "aquarium_fish"]
    assert len(set(m["classes"])) == 100 and m["classes"] == sorted(m["classes"])  # official order is alphabetical
    assert m["splits"]["val"]["class_counts"] == [1] * 100


_x, _y = balanced(40)


@pytest.mark.parametrize("arrays,key", [
    ({"x_train": _x.astype(np.float32), "y_train": _y}, "x_train"),  # wrong dtype
    ({"x_train": _x[:, :3000], "y_train": _y}, "x_train"),  # wrong shape
    ({"x_train": _x, "y_train": _y + 5}, "y_train"),  # labels out of range
    ({"x_train": _x, "y_train": _y.astype(np.float64)}, "y_train"),  # non-integer labels
    ({"x_train": _x}, "y_train"),  # missing key
    ({"x_train": _x, "y_train": _y[:-1]}, "y_train"),  # length mismatch
    ({"x_train": _x, "y_train": _y, "x_test": _x[:10], "y_test": _y[:9]}, "y_test"),
], ids=["dtype", "shape", "range", "float-labels", "missing", "length", "test-length"])
def test_npz_invalid(tmp_path, arrays, key):
    src = npz_src(tmp_path, **arrays)
    with pytest.raises(DataError, match=f"'{key}'") as e:
        prepare("cifar10", src, SplitConfig(5, 5, None), tmp_path / "p")
    assert str(src.npz) in str(e.value)
    assert leftovers(tmp_path) == ["a.npz"]


@pytest.mark.parametrize("content", [b"not a zip at all\n", b"", "truncated"])
def test_npz_unreadable(tmp_path, content):
    path = tmp_path / "bad.npz"
    if content == "truncated":
        x, y = balanced(40)
        np.savez(path, x_train=x, y_train=y)
        _truncate(path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match="bad.npz"):
        prepare("cifar10", SourceConfig("npz", tmp_path / "raw", npz=path), SplitConfig(5, 5, None), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.npz: npz file not found"):
        prepare("cifar10", SourceConfig("npz", tmp_path, npz=tmp_path / "nope.npz"), SplitConfig(5, 5, None), tmp_path / "p")


@pytest.mark.parametrize("split", [SplitConfig(0, 5, None), SplitConfig(5, 0, None), SplitConfig(20, 20, 1),
                                   SplitConfig(20, 20, None), SplitConfig(5, 5, 0)])
def test_bad_split_sizes(tmp_path, split):
    x, y = balanced(40)
    with pytest.raises(DataError, match="split sizes"):
        prepare("cifar10", npz_src(tmp_path, x_train=x, y_train=y), split, tmp_path / "p")


# ---------------------------------------------------------------- output integrity


def test_load_prepared_detects_tampering(tmp_path):
    x, y = balanced(60)
    prepare("cifar10", npz_src(tmp_path, x_train=x, y_train=y), SplitConfig(10, 10, None), tmp_path / "p")
    path = tmp_path / "p" / "val_x.npy"
    a = np.load(path)
    a[0, 0, 5, 5] ^= 1
    np.save(path, a)
    with pytest.raises(DataError, match="val_x.npy: sha256 mismatch"):
        load_prepared(tmp_path / "p")
    arrays, _ = load_prepared(tmp_path / "p", verify=False)
    assert arrays["val"][0][0, 0, 5, 5] == a[0, 0, 5, 5]

    np.save(path, a.astype(np.int64))  # wrong dtype is caught even without verify
    with pytest.raises(DataError, match="val_x.npy: expected uint8"):
        load_prepared(tmp_path / "p", verify=False)
    with pytest.raises(DataError, match="manifest.json: not found"):
        load_prepared(tmp_path / "nothing")


def test_write_failure_leaves_nothing(tmp_path, monkeypatch):
    x, y = balanced(60)
    src = npz_src(tmp_path, x_train=x, y_train=y)
    out = tmp_path / "prepared" / "c10"

    def fail(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archives, "_write_json", fail)
    with pytest.raises(OSError):
        prepare("cifar10", src, SplitConfig(10, 10, None), out)
    assert leftovers(out.parent) == []

    # A failed re-prepare keeps the previous complete output.
    monkeypatch.undo()
    first = prepare("cifar10", src, SplitConfig(10, 10, None), out)
    monkeypatch.setattr(archives, "_write_json", fail)
    with pytest.raises(OSError):
        prepare("cifar10", src, SplitConfig(10, 10, None, seed=5), out)
    assert leftovers(out.parent) == ["c10"]
    assert load_prepared(out)[1]["fingerprint"] == first["fingerprint"]


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_NPZ.is_file(), reason=f"offline CIFAR-10 npz not present at {REAL_NPZ}")
def test_real_cifar10_npz(tmp_path):
    m = prepare("cifar10", SourceConfig("npz", tmp_path / "raw", npz=REAL_NPZ),
                SplitConfig(val_size=500, test_size=1000, train_subset=2000), tmp_path / "p")
    assert m["test_origin"] == "carved"  # x_test_first1017 alone is not a test set
    assert m["source_counts"] == {"train": 50000, "test": None}
    assert [m["splits"][s]["class_counts"] for s in ("train", "val", "test")] == [[200] * 10, [50] * 10, [100] * 10]
    assert m["classes"] == CIFAR10_CLASSES
    arrays, _ = load_prepared(tmp_path / "p")
    x, y = arrays["test"]
    assert x.shape == (1000, 3, 32, 32) and y.dtype == np.int64
    with np.load(REAL_NPZ) as z:
        rows, labels = z["x_train"], z["y_train"]
    match = np.flatnonzero((rows == x[0].reshape(-1)).all(axis=1))  # the image exists in the source, NCHW-wise
    assert len(match) >= 1 and labels[match[0]] == y[0]

"""Pascal VOC 2007 as multi-label classification: parsing a VOC-format tree that the tests write
(JPEGs + annotation XMLs), its three sources (directory, mirror of the original archives, torchvision's
download from a local HTTP server), the data stage, the prepared arrays, the loss, and AP/mAP
against hand-checked cases."""
from __future__ import annotations

import contextlib
import functools
import http.server
import runpy
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.voc
import yaml
from PIL import Image
from torchvision.datasets.utils import calculate_md5

from l2l import voc
from l2l.checks import ConfigError, DataError
from l2l.data import load_prepared, prepare_dataset
from l2l.datasets import DataSettings, resolve_data
from l2l.tasks import average_precision, mean_average_precision, voc_bce_loss
from l2l.voc import ABSENT, CLASSES, DIFFICULT, PRESENT, parse_annotation, prepare_voc
from tests.conftest import REPO, smoke_params, write_npz

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def annotation_xml(image_id: str, size: tuple[int, int], objects: list[tuple[str, int]]) -> str:
    objs = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                   f"<ymax>5</ymax></bndbox></object>" for name, difficult in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def three_bands(w: int, h: int) -> Image.Image:
    """Left third red, middle third green, right third blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3], a[:, w // 3: 2 * w // 3], a[:, 2 * w // 3:] = RED, GREEN, BLUE
    return Image.fromarray(a)


# image id -> (width, height, objects (class, difficult))
TRAINVAL = {
    "000005": (60, 30, [("chair", 0), ("chair", 1), ("diningtable", 0)]),
    "000007": (30, 45, [("car", 0)]),
    "000009": (40, 40, [("horse", 0), ("person", 0), ("person", 0)]),
    "000012": (50, 35, [("car", 1)]),  # difficult only
    "000016": (35, 50, [("bicycle", 0), ("person", 1)]),
    "000017": (44, 33, [("tvmonitor", 0), ("sofa", 0)]),
}
TEST = {
    "000001": (48, 32, [("dog", 0), ("person", 0)]),
    "000002": (32, 48, [("train", 0)]),
    "000004": (40, 30, [("car", 0), ("car", 1)]),
}


def make_voc(root: Path, trainval=TRAINVAL, test=TEST) -> Path:
    """root/VOCdevkit/VOC2007 with the images, annotations and lists of the given sets (None: left out)."""
    base = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for image_set, items in (("trainval", trainval), ("test", test)):
        if items is None:
            continue
        for image_id, (w, h, objects) in items.items():
            three_bands(w, h).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (base / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, (w, h), objects))
        (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in items))
    return base


def make_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A mirror dir with the two archives in the original format (tar, members VOCdevkit/VOC2007/...:
    trainval's images, annotations and trainval.txt; test's and test.txt), and torchvision's md5
    table pointed at them, so its real verification and extraction run on them."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    table = torchvision.datasets.voc.DATASET_YEAR_DICT
    for key, sets in (("2007", {"test": None}), ("2007-test", {"trainval": None})):
        tree = tmp_path / "trees" / key
        make_voc(tree, **sets)
        archive = mirror / table[key]["filename"]
        with tarfile.open(archive, "w") as tar:
            tar.add(tree / "VOCdevkit", arcname="VOCdevkit")
        monkeypatch.setitem(table[key], "md5", calculate_md5(archive))
    return mirror


def voc_data(tmp_path: Path, **data) -> DataSettings:
    """The data settings a VOC preparation reads (the source's keys, data.voc2007 at a small size), resolved."""
    return resolve_data({"root": str(tmp_path / "data"), "source": "auto", "mirror": None, "split_seed": 0,
                         "voc2007": {"image_size": 12, "val_size": 2}, **data})


def expected_labels(objects) -> np.ndarray:
    y = np.full(20, ABSENT, np.int8)
    for name, difficult in objects:
        c = CLASSES.index(name)
        y[c] = max(y[c], DIFFICULT if difficult else PRESENT)
    return y


def check_labels(arrays: dict) -> None:
    """The prepared labels are the XMLs': test in the official order; train + val partition trainval."""
    for i, image_id in enumerate(TEST):
        np.testing.assert_array_equal(arrays["test"][1][i], expected_labels(TEST[image_id][2]))
    tv = np.concatenate([arrays["train"][1], arrays["val"][1]])
    assert sorted(map(bytes, tv)) == sorted(bytes(expected_labels(o)) for _, _, o in TRAINVAL.values())


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_parse_annotation_multi_hot_with_difficult(tmp_path):
    base = make_voc(tmp_path)
    y = parse_annotation(base / "Annotations" / "000005.xml")
    assert y.dtype == np.int8 and y.shape == (20,)
    assert y[CLASSES.index("chair")] == PRESENT  # one difficult chair does not hide a plain one
    assert y[CLASSES.index("diningtable")] == PRESENT
    assert (y == ABSENT).sum() == 18
    y = parse_annotation(base / "Annotations" / "000012.xml")
    assert y[CLASSES.index("car")] == DIFFICULT and (y == ABSENT).sum() == 19


def test_malformed_xml_names_the_file(tmp_path):
    base = make_voc(tmp_path)
    bad = base / "Annotations" / "000007.xml"
    bad.write_text("<annotation><object><name>car</name></object>")  # truncated
    with pytest.raises(DataError, match="malformed annotation XML") as e:
        prepare_voc(base, tmp_path / "out", size=16, val_size=2)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unknown_class_and_missing_files_name_the_file(tmp_path):
    base = make_voc(tmp_path)
    path = base / "Annotations" / "000009.xml"
    path.write_text(annotation_xml("000009", (40, 40), [("unicorn", 0)]))
    with pytest.raises(DataError, match=r"000009.xml: object class 'unicorn'"):
        parse_annotation(path)
    (base / "JPEGImages" / "000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"000001.jpg: unreadable image"):
        voc.read_image_set(base, "test", 16)
    with pytest.raises(DataError, match=r"val.txt: image list not found"):
        voc.read_image_set(base, "val", 16)


def test_prepare_and_load_roundtrip(tmp_path):
    base = make_voc(tmp_path)
    m = prepare_voc(base, tmp_path / "out", size=12, val_size=2, seed=0)
    arrays, loaded = load_prepared(tmp_path / "out")
    assert loaded == m and m["num_classes"] == 20 and m["classes"][0] == "aeroplane"
    assert m["task"] == "multi-label" and m["image_size"] == 12
    assert {s: len(arrays[s][1]) for s in arrays} == {"train": 4, "val": 2, "test": 3}
    x, y = arrays["test"]
    assert x.dtype == np.uint8 and x.shape == (3, 3, 12, 12) and y.dtype == np.int8 and y.shape == (3, 20)
    check_labels(arrays)
    assert m["splits"]["test"]["positives"][CLASSES.index("car")] == 1
    assert m["splits"]["test"]["difficult_only"][CLASSES.index("car")] == 0
    # another seed, another val split; the same seed, the same arrays
    assert prepare_voc(base, tmp_path / "same", size=12, val_size=2, seed=0)["fingerprint"] == m["fingerprint"]
    assert prepare_voc(base, tmp_path / "other", size=12, val_size=2, seed=3)["fingerprint"] != m["fingerprint"]


def test_resize_then_center_crop(tmp_path):
    base = make_voc(tmp_path)
    x, _, _ = voc.read_image_set(base, "test", 16)
    wide = x[0].astype(int)  # 48x32 -> 24x16 -> central 16 columns: 4 red-ish | 8 green | 4 blue-ish
    assert np.abs(wide[:, 8, 8] - GREEN).max() < 40  # centre stays green
    assert wide[0, 8, 0] > 150 and wide[2, 8, 15] > 150  # red on the left edge, blue on the right
    tall = x[1].astype(int)  # 32x48 -> 16x24 -> central 16 rows: every column band kept
    assert tall[0, 8, 1] > 150 and tall[1, 8, 8] > 150 and tall[2, 8, 14] > 150


def test_tampered_array_is_detected(tmp_path):
    prepare_voc(make_voc(tmp_path), tmp_path / "out", size=8, val_size=2)
    path = tmp_path / "out" / "train_y.npy"
    y = np.load(path)
    y[0, 0] = -y[0, 0]
    np.save(path, y)
    with pytest.raises(DataError, match="train_y.npy: sha256 mismatch") as e:
        load_prepared(tmp_path / "out")
    assert str(path) in one_line(e)
    np.save(path, y.astype(np.int64))  # single-label dtype in a multi-label manifest: caught without verify
    with pytest.raises(DataError, match=r"train_y.npy: expected int8 \(4, 20\), got int64"):
        load_prepared(tmp_path / "out", verify=False)
    np.save(path, y)
    (tmp_path / "out" / "test_x.npy").write_bytes(b"truncated")
    with pytest.raises(DataError, match="test_x.npy: unreadable array") as e:
        load_prepared(tmp_path / "out", verify=False)
    assert str(tmp_path / "out" / "test_x.npy") in one_line(e)
    with pytest.raises(DataError, match="manifest.json: not found") as e:
        load_prepared(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "manifest.json") in one_line(e)


# ---------------------------------------------------------------- sources


def test_mirror_of_the_original_archives(tmp_path, monkeypatch):
    mirror = make_archives(tmp_path, monkeypatch)
    m = prepare_dataset(voc_data(tmp_path, mirror=str(mirror)), None, "voc2007")
    arrays, loaded = load_prepared(tmp_path / "data" / "prepared" / "voc2007")
    assert loaded == m
    check_labels(arrays)
    table = torchvision.datasets.voc.DATASET_YEAR_DICT
    assert m["source"] == {"kind": "mirror", "archives": [
        {"path": str(mirror / table[k]["filename"]), "md5": table[k]["md5"]} for k in ("2007", "2007-test")]}
    # verified copies where torchvision finds them, no temp files; extracted by torchvision beside them
    raw = tmp_path / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted([table["2007"]["filename"], table["2007-test"]["filename"],
                                                            "VOCdevkit"])
    # the same images and labels as the extracted tree itself gives
    direct = prepare_voc(make_voc(tmp_path / "tree"), tmp_path / "direct", size=12, val_size=2, seed=0)
    assert direct["fingerprint"] == m["fingerprint"]


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip, _truncate, Path.unlink], ids=["corrupt", "truncated", "missing"])
@pytest.mark.parametrize("key", ["2007", "2007-test"])
def test_mirror_bad_archive_names_it(tmp_path, monkeypatch, key, damage):
    mirror = make_archives(tmp_path, monkeypatch)
    archive = mirror / torchvision.datasets.voc.DATASET_YEAR_DICT[key]["filename"]
    damage(archive)
    match = "mirror archive not found" if damage is Path.unlink else "corrupt or truncated archive"
    with pytest.raises(DataError, match=match) as e:
        prepare_dataset(voc_data(tmp_path, mirror=str(mirror)), None, "voc2007")
    assert str(archive) in one_line(e)
    assert not (tmp_path / "data" / "prepared").exists()


def test_mirror_archive_that_passes_md5_but_does_not_extract(tmp_path, monkeypatch):
    """A truncated archive whose md5 is the table's (a wrong table): torchvision's extraction fails."""
    mirror = make_archives(tmp_path, monkeypatch)
    archive = mirror / "VOCtest_06-Nov-2007.tar"
    _truncate(archive)
    monkeypatch.setitem(torchvision.datasets.voc.DATASET_YEAR_DICT["2007-test"], "md5", calculate_md5(archive))
    with pytest.raises(DataError, match="cannot extract archive") as e:
        prepare_dataset(voc_data(tmp_path, mirror=str(mirror)), None, "voc2007")
    assert str(archive) in one_line(e)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(directory: Path):
    """Serve directory on localhost: torchvision's download code does not take file:// URLs
    (its progress bar reads response.length, which file responses lack)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_through_torchvision(tmp_path, monkeypatch):
    mirror = make_archives(tmp_path, monkeypatch)
    table = torchvision.datasets.voc.DATASET_YEAR_DICT
    with http_server(mirror) as base_url:
        for key in ("2007", "2007-test"):
            monkeypatch.setitem(table[key], "url", f"{base_url}/{table[key]['filename']}")
        m = prepare_dataset(voc_data(tmp_path), None, "voc2007")
    assert m["source"] == {"kind": "download", "archives": [
        {"path": table[k]["url"], "md5": table[k]["md5"]} for k in ("2007", "2007-test")]}
    arrays, _ = load_prepared(tmp_path / "data" / "prepared" / "voc2007")
    check_labels(arrays)
    for key in ("2007", "2007-test"):  # downloaded and verified by torchvision
        assert calculate_md5(tmp_path / "data" / "raw" / table[key]["filename"]) == table[key]["md5"]


def test_download_failure_names_the_offline_options(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    table = torchvision.datasets.voc.DATASET_YEAR_DICT
    monkeypatch.setitem(table["2007"], "url", f"http://127.0.0.1:{port}/VOCtrainval_06-Nov-2007.tar")
    with pytest.raises(DataError, match="voc2007 trainval: download of .* failed .*refused") as e:
        prepare_dataset(voc_data(tmp_path), None, "voc2007")
    msg = one_line(e)
    assert "data.voc2007.root" in msg and "data.mirror" in msg
    assert "VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar" in msg
    assert not (tmp_path / "data" / "prepared").exists()


def test_extracted_directory(tmp_path):
    base = make_voc(tmp_path / "VOC")
    # root wins over the mirror and a forced source: it names VOC's own copy
    m = prepare_dataset(voc_data(tmp_path, source="mirror", mirror=str(tmp_path / "nowhere"),
                                   voc2007={"root": str(base), "image_size": 12, "val_size": 2}), None, "voc2007")
    assert m["source"] == {"kind": "directory", "path": str(base)}
    check_labels(load_prepared(tmp_path / "data" / "prepared" / "voc2007")[0])
    assert not (tmp_path / "data" / "raw").exists()


@pytest.mark.parametrize("missing", ["", "JPEGImages", "ImageSets/Main"])
def test_bad_root_names_it(tmp_path, missing):
    base = make_voc(tmp_path / "VOC") if missing else tmp_path / "no_such_dir"
    if missing:
        (base / missing).rename(tmp_path / "moved")
    with pytest.raises(DataError, match="not an extracted VOCdevkit/VOC2007 directory") as e:
        prepare_dataset(voc_data(tmp_path, voc2007={"root": str(base)}), None, "voc2007")
    msg = one_line(e)
    assert msg.startswith(f"{base}: ") and (missing or "Annotations") in msg and "data.voc2007.root" in msg


@pytest.mark.parametrize("data,key", [({"source": "npz"}, "data.source"),
                                      ({"npz": {"voc2007": "a.npz"}}, "data.npz.voc2007")])
def test_no_npz_source(tmp_path, data, key):
    with pytest.raises(ConfigError, match=f"params.yaml: {key}: voc2007 has no npz source") as e:
        prepare_dataset(voc_data(tmp_path, **data), None, "voc2007")
    assert "data.voc2007.root" in one_line(e)


def test_data_stage_prepares_voc_beside_cifar(tmp_path, monkeypatch):
    params = smoke_params(write_npz(tmp_path / "arrays.npz"))
    params["profiles"]["smoke"]["datasets"] = ["cifar10", "voc2007"]
    params["data"]["voc2007"] = {"root": str(make_voc(tmp_path / "VOC")), "image_size": 32, "val_size": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(REPO / "stages" / "data.py"))["run"]()
    arrays, m = load_prepared(tmp_path / "data" / "prepared" / "voc2007")
    assert m["dataset"] == "voc2007" and m["split"] == {"val_size": 2, "seed": 0}
    assert {s: (x.shape, y.dtype, y.shape) for s, (x, y) in arrays.items()} == {
        "train": ((4, 3, 32, 32), np.int8, (4, 20)), "val": ((2, 3, 32, 32), np.int8, (2, 20)),
        "test": ((3, 3, 32, 32), np.int8, (3, 20))}
    check_labels(arrays)
    cifar, _ = load_prepared(tmp_path / "data" / "prepared" / "cifar10")  # the CIFAR path unchanged
    assert cifar["train"][0].shape == (200, 3, 32, 32) and cifar["train"][1].dtype == np.int64


# ---------------------------------------------------------------- loss and metric

def test_bce_loss_and_difficult_rules():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    labels = torch.tensor([[PRESENT, ABSENT, DIFFICULT], [ABSENT, PRESENT, ABSENT]])
    full = lambda t: F.binary_cross_entropy_with_logits(logits, t, reduction="none")  # noqa: E731
    pos = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    assert voc_bce_loss(logits, labels, "positive").item() == pytest.approx(full(pos).mean().item())
    assert voc_bce_loss(logits, labels, "negative").item() == pytest.approx(full(pos * torch.tensor([1, 1, 0])).mean().item())
    ignore = full(pos)
    assert voc_bce_loss(logits, labels).item() == pytest.approx((ignore.sum() - ignore[0, 2]).item() / 5)


def test_average_precision_hand_checked():
    # ranked: TP, (difficult, left out), FP, TP, FP, TP -> precision at the hits 1, 2/3, 3/5; recall 1/3, 2/3, 1
    scores = np.array([0.9, 0.85, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([PRESENT, DIFFICULT, ABSENT, PRESENT, ABSENT, PRESENT])
    assert average_precision(scores, labels, "area") == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # 11 points: recall >= 0, .1, .2, .3 -> 1; .4, .5, .6 -> 2/3; .7, .8, .9, 1 -> 3/5
    assert average_precision(scores, labels, "11point") == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11)
    # the envelope: a later higher precision lifts an earlier dip (FP, TP, TP -> 1/2 at recall 1/2 and 2/3 at 1)
    assert average_precision(np.array([3.0, 2, 1]), np.array([ABSENT, PRESENT, PRESENT])) == pytest.approx(2 / 3)
    # perfect ranking, and no positive at all
    assert average_precision(np.array([0.9, 0.1]), np.array([PRESENT, ABSENT]), "11point") == 1.0
    assert np.isnan(average_precision(np.array([0.9, 0.1]), np.array([ABSENT, DIFFICULT])))
    with pytest.raises(ValueError, match="mode"):
        average_precision(scores, labels, "voc2012")


def test_mean_average_precision_skips_classes_without_positives():
    labels = np.array([[PRESENT, ABSENT, ABSENT], [ABSENT, ABSENT, PRESENT], [PRESENT, ABSENT, PRESENT]])
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.5, 0.8], [0.1, 0.5, 0.3]])
    m, ap = mean_average_precision(scores, labels)
    # class 0: TP (0.9), FP (0.2), TP (0.1) -> (1 + 2/3) / 2; class 2: TP (0.8), TP (0.3) -> 1
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2) and np.isnan(ap[1]) and ap[2] == 1.0
    assert m == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)

"""Pascal VOC 2007 as multi-label classification: parsing a VOC-format tree that the tests write
(JPEGs + annotation XMLs), the prepared arrays, the loss, and AP/mAP against hand-checked cases."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets
from PIL import Image

from l2l import voc
from l2l.data import DataError
from l2l.voc import (ABSENT, CLASSES, DIFFICULT, PRESENT, average_precision, fetch_voc2007, load_voc,
                     mean_average_precision, parse_annotation, prepare_voc, voc_bce_loss)

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
    base = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for image_set, items in (("trainval", trainval), ("test", test)):
        for image_id, (w, h, objects) in items.items():
            three_bands(w, h).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (base / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, (w, h), objects))
        (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in items))
    return base


def expected_labels(objects) -> np.ndarray:
    y = np.full(20, ABSENT, np.int8)
    for name, difficult in objects:
        c = CLASSES.index(name)
        y[c] = max(y[c], DIFFICULT if difficult else PRESENT)
    return y


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
    arrays, loaded = load_voc(tmp_path / "out")
    assert loaded == m and m["num_classes"] == 20 and m["classes"][0] == "aeroplane"
    assert {s: len(arrays[s][1]) for s in arrays} == {"train": 4, "val": 2, "test": 3}
    x, y = arrays["test"]
    assert x.dtype == np.uint8 and x.shape == (3, 3, 12, 12)
    for i, image_id in enumerate(TEST):  # the official order is kept
        np.testing.assert_array_equal(y[i], expected_labels(TEST[image_id][2]))
    # train + val partition trainval, each image with its own labels
    tv = np.concatenate([arrays["train"][1], arrays["val"][1]])
    assert sorted(map(bytes, tv)) == sorted(bytes(expected_labels(o)) for _, _, o in TRAINVAL.values())
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
    with pytest.raises(DataError, match="train_y.npy: sha256 mismatch"):
        load_voc(tmp_path / "out")
    (tmp_path / "out" / "test_x.npy").write_bytes(b"truncated")
    with pytest.raises(DataError, match="test_x.npy: unreadable array"):
        load_voc(tmp_path / "out", verify=False)
    with pytest.raises(DataError, match="manifest.json: not found"):
        load_voc(tmp_path / "nothing")


def test_download_goes_through_torchvision_with_md5(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        make_voc(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.voc, "download_and_extract_archive", fake_download)
    root = fetch_voc2007(tmp_path / "raw")
    assert root == tmp_path / "raw" / "VOCdevkit" / "VOC2007" and (root / "Annotations").is_dir()
    table = torchvision.datasets.voc.DATASET_YEAR_DICT
    assert calls == [(table[k]["url"], table[k]["filename"], table[k]["md5"]) for k in ("2007", "2007-test")]
    assert all(md5 and len(md5) == 32 for _, _, md5 in calls)

    def offline(*args, **kwargs):
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets.voc, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="voc2007 trainval: download .* failed .*corrupted"):
        fetch_voc2007(tmp_path / "raw2")


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

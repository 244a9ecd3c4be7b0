"""Pascal VOC 2007 as 20-class multi-label image classification (P5's second dataset).

The DVC data stage prepares it (l2l.data.prepare_dataset -> prepare_voc2007) when the profile
lists voc2007, from the first source params.yaml gives:
  data.voc2007.root  an extracted VOCdevkit/VOC2007 directory (Annotations, JPEGImages,
                     ImageSets/Main), read as it is, whatever data.source says;
  data.mirror        a directory holding the two original archives, VOCtrainval_06-Nov-2007.tar
                     and VOCtest_06-Nov-2007.tar (also when data.source is mirror): each is checked
                     against torchvision's md5, copied into data/raw and extracted by torchvision;
  otherwise          torchvision.datasets.VOCDetection(year="2007", download=True) for image sets
                     "trainval" and "test": it downloads the two archives into data/raw, checks
                     their md5 against its table and extracts VOCdevkit/VOC2007.
There is no npz source for VOC. No offline copy exists here, so VOC is not in the smoke profile;
the tests build a small VOC-format tree (and archives of it) instead.

Labels follow the VOC devkit's classification convention (its <class>_<set>.txt files): per
image and class, 1 = at least one object of the class not marked "difficult", 0 = only
difficult objects (ignored by the evaluation), -1 = absent. Stored as int8 (N, 20).

Images: shorter side resized to `size` (bilinear, antialiased), then the central size x size
square: uint8 (N, 3, size, size). Splits: the official test set (4,952 images); val carved
from trainval (`val_size` images, uniformly at random with `seed`: stratifying multi-label
data has no single answer, so it is not attempted); train = the rest of trainval.
Output (data/prepared/voc2007): {train,val,test}_{x,y}.npy + manifest.json (task "multi-label",
image_size, the source's kind and archives' md5s, sha256 of every array), written atomically as
the CIFAR preparation does; l2l.data.load_prepared loads and verifies both formats.

This module only prepares the data. Training and evaluation on it (per-class BCE, sigmoid KD,
mAP) are the multi-label task's, in l2l/tasks.py; the classes and label values in l2l/datasets.py.
"""
from __future__ import annotations

import hashlib
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torchvision.datasets
from PIL import Image, UnidentifiedImageError

from l2l.archives import ARCHIVE_ERRORS, array_sha256, one_line, stage_mirror_archive, write_prepared
from l2l.checks import DataError, config_error
from l2l.datasets import VOC_ABSENT as ABSENT
from l2l.datasets import VOC_CLASSES as CLASSES
from l2l.datasets import VOC_DIFFICULT as DIFFICULT
from l2l.datasets import VOC_NO_NPZ, VOC_PRESENT as PRESENT, DataSettings

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# ---------------------------------------------------------------- sources

SUBDIRS = ("Annotations", "JPEGImages", "ImageSets/Main")
_TV_KEYS = {"trainval": "2007", "test": "2007-test"}  # image set -> its key in torchvision's table


def _archives() -> dict[str, dict]:
    """image set -> torchvision's url, filename and md5 of its official archive. Looked up at call
    time so tests can monkeypatch the table."""
    return {s: torchvision.datasets.voc.DATASET_YEAR_DICT[k] for s, k in _TV_KEYS.items()}


def _torchvision_extract(root: Path, image_set: str) -> None:
    """VOCDetection(download=True): downloads the image set's archive into root unless a copy that
    passes its md5 is there, checks the md5 and extracts VOCdevkit/VOC2007 under root."""
    torchvision.datasets.VOCDetection(str(root), year="2007", image_set=image_set, download=True)


def fetch_voc2007(root: Path) -> tuple[Path, dict]:
    """Download (md5-verified by torchvision) and extract VOC2007 trainval and test under root;
    returns the VOCdevkit/VOC2007 directory and the manifest's source record."""
    archives = _archives()
    for image_set, a in archives.items():
        try:
            _torchvision_extract(root, image_set)
        except Exception as e:  # network errors come in many types; RuntimeError = md5 mismatch
            raise DataError(
                f"voc2007 {image_set}: download of {a['url']} into {root} failed ({one_line(e)}); offline options: "
                f"data.voc2007.root (an extracted VOCdevkit/VOC2007 directory), or data.mirror (a dir holding "
                f"{' and '.join(x['filename'] for x in archives.values())})") from e
    return Path(root) / "VOCdevkit" / "VOC2007", {
        "kind": "download", "archives": [{"path": a["url"], "md5": a["md5"]} for a in archives.values()]}


def from_mirror(mirror: Path, root: Path) -> tuple[Path, dict]:
    """The two original archives in mirror: md5-checked (both, before extracting either), copied
    into root and extracted there by torchvision. Returns (VOC2007 dir, source record)."""
    table = _archives()
    archives = {s: Path(mirror) / a["filename"] for s, a in table.items()}
    md5 = {s: stage_mirror_archive("voc2007", archives[s], table[s]["md5"], Path(root)) for s in table}
    for image_set, archive in archives.items():
        try:
            _torchvision_extract(root, image_set)
        except ARCHIVE_ERRORS as e:
            raise DataError(f"{archive}: cannot extract archive ({one_line(e)})") from e
    return Path(root) / "VOCdevkit" / "VOC2007", {
        "kind": "mirror", "archives": [{"path": str(archives[s]), "md5": md5[s]} for s in archives]}


def check_voc_root(root: Path) -> Path:
    """root, if it is an extracted VOCdevkit/VOC2007 directory (its SUBDIRS exist)."""
    missing = [d for d in SUBDIRS if not (Path(root) / d).is_dir()]
    if missing:
        raise DataError(f"{root}: not an extracted VOCdevkit/VOC2007 directory (no {', '.join(missing)}); "
                        f"data.voc2007.root must name one")
    return Path(root)


def prepare_voc2007(settings: DataSettings) -> dict:
    """The data stage for voc2007: the resolved data settings' source (module docstring) and
    data.voc2007 -> data/prepared/voc2007. Returns the manifest."""
    cfg = settings.voc2007
    if cfg["root"] is not None:
        voc_root, source = check_voc_root(Path(cfg["root"])), {"kind": "directory", "path": cfg["root"]}
    else:
        if settings.source == "npz":
            raise config_error("data.source", problem=VOC_NO_NPZ)
        src = settings.source_for("voc2007")  # kind mirror (data.mirror set or forced) or download
        voc_root, source = from_mirror(src.mirror, src.root) if src.kind == "mirror" else fetch_voc2007(src.root)
    return prepare_voc(voc_root, settings.prepared_dir("voc2007"), cfg["image_size"], cfg["val_size"],
                       settings.split_seed, source)


# ---------------------------------------------------------------- parsing

def parse_annotation(path: Path) -> np.ndarray:
    """int8 (20,) labels of one annotation XML (PRESENT / DIFFICULT / ABSENT per class)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed annotation XML ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable annotation ({e.strerror or e})") from None
    labels = np.full(len(CLASSES), ABSENT, dtype=np.int8)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASSES:
            raise DataError(f"{path}: object class {name!r} is not one of the 20 VOC classes")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        c = CLASSES.index(name)
        labels[c] = max(labels[c], DIFFICULT if difficult else PRESENT)
    return labels


def load_image(path: Path, size: int) -> np.ndarray:
    """uint8 (3, size, size): shorter side resized to `size`, then the central square."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def read_image_set(voc_root: Path, image_set: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and ids of ImageSets/Main/<image_set>.txt, in the file's order."""
    list_file = Path(voc_root) / "ImageSets" / "Main" / f"{image_set}.txt"
    try:
        ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    except OSError:
        raise DataError(f"{list_file}: image list not found (is {voc_root} a VOC2007 directory?)") from None
    if not ids:
        raise DataError(f"{list_file}: empty image list")
    x = np.stack([load_image(Path(voc_root) / "JPEGImages" / f"{i}.jpg", size) for i in ids])
    y = np.stack([parse_annotation(Path(voc_root) / "Annotations" / f"{i}.xml") for i in ids])
    return x, y, ids


# ---------------------------------------------------------------- prepared arrays

def prepare_voc(voc_root: Path, out_dir: Path, size: int = 128, val_size: int = 500, seed: int = 0,
                source: dict | None = None) -> dict:
    """VOC2007 tree -> out_dir/{train,val,test}_{x,y}.npy + manifest.json (atomically)."""
    if size < 1 or val_size < 1:
        raise DataError(f"voc2007: size and val_size must be >= 1, got size={size}, val_size={val_size}")
    x_tv, y_tv, ids_tv = read_image_set(voc_root, "trainval", size)
    x_te, y_te, ids_te = read_image_set(voc_root, "test", size)
    if val_size >= len(ids_tv):
        raise DataError(f"data.voc2007.val_size: {val_size} leaves no training image of the {len(ids_tv)} in "
                        f"{voc_root}'s trainval; lower data.voc2007.val_size")
    perm = np.random.default_rng(seed).permutation(len(ids_tv))
    val, train = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    arrays = {"train": (x_tv[train], y_tv[train]), "val": (x_tv[val], y_tv[val]), "test": (x_te, y_te)}
    ids = {"train": [ids_tv[i] for i in train], "val": [ids_tv[i] for i in val], "test": ids_te}
    splits = {s: {"count": len(y), "positives": (y == PRESENT).sum(0).tolist(),
                  "difficult_only": (y == DIFFICULT).sum(0).tolist(), "sha256_x": array_sha256(x), "sha256_y": array_sha256(y),
                  "ids_sha256": hashlib.sha256("\n".join(ids[s]).encode()).hexdigest()}
              for s, (x, y) in arrays.items()}
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": "voc2007", "task": "multi-label", "num_classes": len(CLASSES),
        "classes": CLASSES, "source": source or {"kind": "directory", "path": str(voc_root)},
        "image_size": size, "label_values": {"present": PRESENT, "difficult_only": DIFFICULT, "absent": ABSENT},
        "split": {"val_size": val_size, "seed": seed},
        "split_note": (f"official VOC2007 test set ({len(ids_te)} images); val carved from trainval "
                       f"({val_size} images, uniformly at random, seed {seed}); images: shorter side resized to "
                       f"{size}, central {size}x{size} crop"),
        "splits": splits,
        "fingerprint": hashlib.sha256("".join(splits[s][h] for s in arrays for h in ("sha256_x", "sha256_y"))
                                      .encode()).hexdigest(),
    }
    write_prepared(Path(out_dir), arrays, manifest)
    log.info("prepared voc2007 into %s: %s", out_dir, ", ".join(f"{s} {v['count']}" for s, v in splits.items()))
    return manifest

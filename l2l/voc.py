"""Pascal VOC 2007 as 20-class multi-label image classification (P5's second dataset).

Source: torchvision.datasets.VOCDetection(year="2007", download=True) for image sets
"trainval" and "test": it downloads the two official archives, checks their md5 against
torchvision's table and extracts VOCdevkit/VOC2007. No offline copy exists, so VOC is not in
the smoke profile; the tests build a small VOC-format tree instead.

Labels follow the VOC devkit's classification convention (its <class>_<set>.txt files): per
image and class, 1 = at least one object of the class not marked "difficult", 0 = only
difficult objects (ignored by the evaluation), -1 = absent. Stored as int8 (N, 20).

Images: shorter side resized to `size` (bilinear, antialiased), then the central size x size
square: uint8 (N, 3, size, size). Splits: the official test set (4,952 images); val carved
from trainval (`val_size` images, uniformly at random with `seed`: stratifying multi-label
data has no single answer, so it is not attempted); train = the rest of trainval.
Output (out_dir): {train,val,test}_{x,y}.npy + manifest.json with sha256 of every array,
written atomically, as the CIFAR preparation does.

Metric: average precision per class over the test images, averaged over classes (mAP), in two
documented variants (`mode`): "area" (VOC2010 and later: area under the precision-recall curve
with precision made monotone) and "11point" (VOC2007's devkit: mean of the interpolated precision
at recall 0, 0.1, ..., 1).

Not wired into the training pipeline: the engine's per-batch accuracy and RunContext.evaluate
assume single-label targets; multi-label training needs voc_bce_loss and
l2l.losses.multilabel_kd_loss in the step and mAP in the evaluation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets
from PIL import Image, UnidentifiedImageError

from l2l.data import DataError, _sha256, _write_atomic

log = logging.getLogger(__name__)

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
PRESENT, DIFFICULT, ABSENT = 1, 0, -1
AP_MODES = ("area", "11point")
DIFFICULT_RULES = ("ignore", "positive", "negative")
FORMAT_VERSION = 1


# ---------------------------------------------------------------- source

def fetch_voc2007(root: Path) -> Path:
    """Download (md5-verified by torchvision) and extract VOC2007 trainval and test under root;
    returns the VOCdevkit/VOC2007 directory."""
    for image_set in ("trainval", "test"):
        try:
            torchvision.datasets.VOCDetection(str(root), year="2007", image_set=image_set, download=True)
        except Exception as e:  # network errors come in many types; RuntimeError = md5 mismatch
            raise DataError(f"voc2007 {image_set}: download into {root} failed "
                            f"({type(e).__name__}: {' '.join(str(e).split())})") from e
    return Path(root) / "VOCdevkit" / "VOC2007"


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
        raise DataError(f"voc2007: val_size {val_size} leaves no training image of the {len(ids_tv)} in trainval")
    perm = np.random.default_rng(seed).permutation(len(ids_tv))
    val, train = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    arrays = {"train": (x_tv[train], y_tv[train]), "val": (x_tv[val], y_tv[val]), "test": (x_te, y_te)}
    ids = {"train": [ids_tv[i] for i in train], "val": [ids_tv[i] for i in val], "test": ids_te}
    splits = {s: {"count": len(y), "positives": (y == PRESENT).sum(0).tolist(),
                  "difficult_only": (y == DIFFICULT).sum(0).tolist(), "sha256_x": _sha256(x), "sha256_y": _sha256(y),
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
    _write_atomic(Path(out_dir), arrays, manifest)
    log.info("prepared voc2007 into %s: %s", out_dir, ", ".join(f"{s} {v['count']}" for s, v in splits.items()))
    return manifest


def load_voc(out_dir: Path, verify: bool = True) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """-> ({split: (x uint8 (N,3,S,S), y int8 (N,20))}, manifest); verify checks every sha256."""
    mpath = Path(out_dir) / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
        size = manifest["image_size"]
    except FileNotFoundError:
        raise DataError(f"{mpath}: not found; prepare VOC first (l2l.voc.prepare_voc)") from None
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
    out = {}
    for s, entry in manifest["splits"].items():
        pair = []
        for part, dtype, shape in (("x", np.uint8, (3, size, size)), ("y", np.int8, (len(CLASSES),))):
            path = Path(out_dir) / f"{s}_{part}.npy"
            try:
                a = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"{path}: unreadable array ({type(e).__name__}: {e})") from None
            if a.dtype != dtype or a.shape != (entry["count"], *shape):
                raise DataError(f"{path}: expected {np.dtype(dtype)} {(entry['count'], *shape)}, got {a.dtype} {a.shape}")
            if verify and _sha256(a) != entry[f"sha256_{part}"]:
                raise DataError(f"{path}: sha256 mismatch with {mpath} (file modified or corrupt)")
            pair.append(a)
        out[s] = (pair[0], pair[1])
    return out, manifest


# ---------------------------------------------------------------- loss and metric

def voc_bce_loss(logits: torch.Tensor, labels: torch.Tensor, difficult: str = "ignore") -> torch.Tensor:
    """Binary cross-entropy with logits over the 20 classes, mean over the counted entries.
    difficult-only entries (label 0) are left out ("ignore", as the VOC evaluation does), or
    count as "positive" or "negative" targets."""
    if difficult not in DIFFICULT_RULES:
        raise ValueError(f"voc_bce_loss: difficult must be one of {DIFFICULT_RULES}, got {difficult!r}")
    target = ((labels == PRESENT) | ((labels == DIFFICULT) & (difficult == "positive"))).float()
    weight = ((labels != DIFFICULT) | (difficult != "ignore")).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight, reduction="sum")
    return loss / weight.sum().clamp_min(1.0)


def average_precision(scores: np.ndarray, labels: np.ndarray, mode: str = "area") -> float:
    """AP of one class: scores (N,), labels (N,) in {1, 0, -1}; difficult-only (0) entries are
    left out. Images are ranked by descending score; tied scores keep their input order (a
    stable sort, as the devkit's). NaN when the class has no positive image."""
    if mode not in AP_MODES:
        raise ValueError(f"average_precision: mode must be one of {AP_MODES}, got {mode!r}")
    keep = labels != DIFFICULT
    s, pos = np.asarray(scores, dtype=float)[keep], labels[keep] == PRESENT
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    hits = pos[np.argsort(-s, kind="stable")]
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    recall, precision = tp / n_pos, tp / (tp + fp)
    if mode == "11point":
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))
    # VOC2010+: precision envelope (max precision at any higher recall), integrated over recall
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * envelope).sum())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray, mode: str = "area") -> tuple[float, np.ndarray]:
    """(mAP over the classes that have a positive image, per-class AP with NaN for the others)."""
    ap = np.array([average_precision(scores[:, c], labels[:, c], mode) for c in range(labels.shape[1])])
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"), ap

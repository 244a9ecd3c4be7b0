"""Every fact about a dataset, and params.yaml's ``data:`` section (closed, defaults here).

Facts: classes, label kind (the task: :mod:`l2l.tasks`), image size, normalisation, and where
torchvision keeps the originals. Settings: where the data comes from (``data.source``, mirror,
npz, VOC's root), how it is carved (the profile's ``split`` and ``data.split_seed``), and what of
that a run on a dataset depends on (:meth:`DataSettings.run_data`, part of the run's hash).
Preparation itself lives in l2l/data.py (CIFAR) and l2l/voc.py (Pascal VOC 2007).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2l.checks import (Key, choice, config_error, nonneg_int, optional_str, path_str, pos_int, resolve)

SINGLE_LABEL, MULTI_LABEL = "single-label", "multi-label"

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
# VOC labels per image and class, the devkit's classification convention (<class>_<set>.txt)
VOC_PRESENT, VOC_DIFFICULT, VOC_ABSENT = 1, 0, -1


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: tuple[str, ...]
    task: str  # SINGLE_LABEL | MULTI_LABEL
    normalization: tuple[tuple[float, float, float], tuple[float, float, float]]  # per-channel mean, std
    image_size: int | None  # None: a setting (VOC: data.voc2007.image_size)
    torchvision: str  # the torchvision.datasets class of its originals
    train_images: int  # in the official training set (VOC: trainval)
    test_images: int  # in the official test set
    download_bytes: int = 0  # its original archives, as a download fetches them (l2l plan's disk figures)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: dict[str, Dataset] = {
    # mean/std: the papers' CIFAR pipelines (P3's code for CIFAR-10)
    "cifar10": Dataset("cifar10", tuple(CIFAR10_CLASSES), SINGLE_LABEL,
                       ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)), 32, "CIFAR10", 50000, 10000,
                       download_bytes=170_498_071),  # cifar-10-python.tar.gz
    "cifar100": Dataset("cifar100", tuple(CIFAR100_CLASSES), SINGLE_LABEL,
                        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), 32, "CIFAR100", 50000, 10000,
                        download_bytes=169_001_437),  # cifar-100-python.tar.gz
    # Pascal VOC: the ImageNet statistics that VOC classification pipelines use (torchvision's)
    "voc2007": Dataset("voc2007", tuple(VOC_CLASSES), MULTI_LABEL,
                       ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), None, "VOCDetection", 5011, 4952,
                       download_bytes=460_032_000 + 451_020_800),  # VOCtrainval_06-Nov-2007.tar, VOCtest_...tar
}
DATA_SOURCES = ("auto", "download", "mirror", "npz")
VOC_AP_MODES = ("area", "11point")
VOC_DIFFICULT_RULES = ("ignore", "positive", "negative")


def _optional_path(v: Any, path: str) -> str | None:
    return optional_str(v, path, "a path or null")


DATA: dict[str, Key] = {
    "root": Key(path_str, "data", "downloads under <root>/raw, prepared arrays under <root>/prepared"),
    "source": Key(lambda v, p: choice(v, p, DATA_SOURCES), "auto",
                  "auto: per dataset its npz if given, else the mirror if given, else torchvision's download"),
    "mirror": Key(_optional_path, None, "a directory holding the original archives"),
    "npz": Key({name: Key(_optional_path, None) for name, d in DATASETS.items() if d.task == SINGLE_LABEL}),
    "split_seed": Key(nonneg_int, 0, "the stratified validation (and carved test) split"),
    "voc2007": Key({
        "root": Key(_optional_path, None, "an extracted VOCdevkit/VOC2007 directory"),
        "image_size": Key(pos_int, 128, "shorter side resized to this, then the central square"),
        "val_size": Key(pos_int, 500, "carved from trainval at random (seed split_seed)"),
        "ap_mode": Key(lambda v, p: choice(v, p, VOC_AP_MODES), "area"),
        "difficult": Key(lambda v, p: choice(v, p, VOC_DIFFICULT_RULES), "ignore"),
    }),
}

SPLIT: dict[str, Key] = {
    "val_size": Key(pos_int, doc="carved from the training set, stratified, always"),
    "test_size": Key(pos_int, doc="only carved when the source has no official test set"),
    "train_subset": Key(lambda v, p: v if v is None else pos_int(v, p), None,
                        "a stratified subset of the remaining training images; null = all"),
}


def _no_val(v: Any, path: str) -> int | None:
    if v is None or (v == 0 and not isinstance(v, bool)):
        return v
    raise config_error(path, "0 (the validation images join the training split: no model selection) or absent "
                             "(the profile's split)", v)


# An experiment's own split (profiles.<p>.experiments.<e>.split): only val_size: 0, for experiments
# that never select a model (P3 reports the last epoch: its code trains on all 50,000 images).
EXPERIMENT_SPLIT: dict[str, Key] = {
    "val_size": Key(_no_val, None, "0: the profile's validation images join the training split; "
                                   "absent (null): the profile's split"),
}


def val_joins_train(run_data: dict) -> bool:
    """Whether a run's validation images join its training split (its experiment's split.val_size: 0):
    the run then has no validation split and selects nothing (best-validation metrics are NaN)."""
    return run_data.get("val_size") == 0


@dataclass(frozen=True)
class SourceConfig:
    kind: str  # "download" | "mirror" | "npz"
    root: Path  # cache dir for torchvision downloads/extraction
    mirror: Path | None = None  # dir holding the original archives (cifar-10-python.tar.gz, ...)
    npz: Path | None = None  # .npz with x_train, y_train and optionally x_test, y_test


@dataclass(frozen=True)
class SplitConfig:
    val_size: int  # carved from the training set, stratified, always
    test_size: int  # only used when the source has no test set
    train_subset: int | None  # stratified subset of the remaining training images
    seed: int = 0
    key: str = "split"  # where its sizes are set (messages name it), e.g. profiles.smoke.split


@dataclass(frozen=True)
class DataSettings:
    """params.yaml's ``data:`` section, resolved (every default filled in)."""

    root: str
    source: str
    mirror: str | None
    npz: dict
    split_seed: int
    voc2007: dict

    def source_for(self, dataset: str) -> SourceConfig:
        """Where `dataset`'s originals come from (for the CIFARs; VOC also takes voc2007.root)."""
        npz = self.npz.get(dataset)
        kind = self.source
        if kind == "auto":  # per dataset: its .npz if one is given, else the mirror if given, else download
            kind = "npz" if npz else "mirror" if self.mirror else "download"
        if kind == "npz" and not npz:
            raise config_error(f"data.npz.{dataset}", "a .npz path (data.source is npz)", npz)
        return SourceConfig(kind=kind, root=Path(self.root) / "raw",
                            mirror=Path(self.mirror) if self.mirror else None, npz=Path(npz) if npz else None)

    def prepared_dir(self, dataset: str) -> Path:
        return Path(self.root) / "prepared" / dataset

    def split_config(self, split: dict, key: str = "split") -> SplitConfig:
        """The CIFAR split the data stage carves: a profile's resolved ``split`` (set at `key`) with
        data.split_seed."""
        return SplitConfig(val_size=split["val_size"], test_size=split["test_size"],
                           train_subset=split["train_subset"], seed=self.split_seed, key=key)

    def run_data(self, split: dict, dataset: str, experiment_split: dict | None = None) -> dict:
        """What of the data settings a run on `dataset` depends on (part of its RunSpec, so of its hash):
        CIFAR: the profile's split; VOC: its preparation (image size, val split) and its task (metric,
        difficult-only labels). The split seed for both. An experiment's split.val_size 0 sets val_size 0
        (the prepared validation images join training: :func:`val_joins_train`; the data's fingerprint
        still names the prepared arrays)."""
        if DATASETS[dataset].task == SINGLE_LABEL:
            out = {**split, "split_seed": self.split_seed}
        else:
            v = self.voc2007
            out = {"image_size": v["image_size"], "val_size": v["val_size"], "split_seed": self.split_seed,
                   "task": {"kind": MULTI_LABEL, "ap_mode": v["ap_mode"], "difficult": v["difficult"]}}
        if (experiment_split or {}).get("val_size") == 0:
            out["val_size"] = 0
        return out


VOC_NO_NPZ = ("voc2007 has no npz source; set data.voc2007.root (an extracted VOCdevkit/VOC2007 directory) "
              "or data.mirror (its original archives)")


def resolve_data(given: Any) -> DataSettings:
    if isinstance(given, dict) and isinstance(given.get("npz"), dict) and given["npz"].get("voc2007") is not None:
        raise config_error("data.npz.voc2007", problem=VOC_NO_NPZ)
    d = resolve(DATA, given, "data")
    if d["source"] == "mirror" and d["mirror"] is None:
        raise config_error("data.mirror", "a directory path (data.source is mirror)", None)
    return DataSettings(**d)


def resolve_split(given: Any, path: str) -> dict:
    return resolve(SPLIT, given, path)


def resolve_experiment_split(given: Any, path: str) -> dict:
    return resolve(EXPERIMENT_SPLIT, given, path)

"""What a dataset's labels ask of training and evaluation: its loss, its distillation loss, its
metric, and the per-example predictions the evaluate stage saves.

Two tasks, picked by the run's data settings (RunSpec.data["task"], set by l2l.config for VOC):
- single-label (CIFAR): cross-entropy, Hinton KD, metric top-1 accuracy (%), predictions = class ids;
- multi-label (Pascal VOC, prepared by l2l/voc.py): binary cross-entropy per class (difficult-only labels
  handled by data.voc2007.difficult), KD on per-class sigmoids, metric mAP (%, data.voc2007.ap_mode),
  predictions = per-class sigmoid scores.

The metric fills the `acc` fields everywhere (history, result.json, eval.json, results/*.csv): it is
the dataset's primary metric, named by `metric` (results/runs.csv column `metric`, the reports).
The training value (train_acc) is the metric over the epoch's augmented batches as the model was
being trained, the usual running figure; validation and test values are on un-augmented images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from l2l.datasets import MULTI_LABEL, SINGLE_LABEL, VOC_AP_MODES, VOC_DIFFICULT, VOC_DIFFICULT_RULES, VOC_PRESENT
from l2l.losses import kd_loss, multilabel_kd_loss


class TopOneMeter:
    """Correct top-1 predictions, counted on the device (no host sync per batch)."""

    def __init__(self, device: torch.device):
        self.correct, self.seen = torch.zeros((), device=device, dtype=torch.long), 0

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def value(self) -> float:
        return 100.0 * self.correct.item() / max(self.seen, 1)


class ScoreMeter:
    """Keeps the batches' outputs (on the device) and scores them together at the end: a ranking
    metric like mAP is not a sum over batches."""

    def __init__(self, task: "MultiLabel"):
        self.task, self.logits, self.labels = task, [], []

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        # copies: a replayed CUDA graph's outputs are overwritten by its next replay (l2l/graphs.py)
        self.logits.append(logits.detach().to(torch.float32, copy=True))
        self.labels.append(y.clone())

    def value(self) -> float:
        return self.task.score(torch.cat(self.logits), torch.cat(self.labels))


@dataclass(frozen=True)
class SingleLabel:
    kind = SINGLE_LABEL
    metric = "top-1 accuracy (%)"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y)

    def kd(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, temperature)

    def meter(self, device: torch.device) -> TopOneMeter:
        return TopOneMeter(device)

    def score(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        return 100.0 * (logits.argmax(1) == y).float().mean().item()

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        return logits.argmax(1).cpu().numpy().astype(np.int16)


@dataclass(frozen=True)
class MultiLabel:
    ap_mode: str = "area"
    difficult: str = "ignore"
    kind = MULTI_LABEL

    @property
    def metric(self) -> str:
        return f"mAP (%, {self.ap_mode})"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return voc_bce_loss(logits, y, self.difficult)

    def kd(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return multilabel_kd_loss(student_logits, teacher_logits, temperature)

    def meter(self, device: torch.device) -> ScoreMeter:
        return ScoreMeter(self)

    def score(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        return 100.0 * mean_average_precision(logits.float().cpu().numpy(), y.cpu().numpy(), self.ap_mode)[0]

    def predictions(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().sigmoid().cpu().numpy().astype(np.float16)


Task = SingleLabel | MultiLabel


# --- the multi-label loss and metric (labels per class: VOC_PRESENT, VOC_DIFFICULT (difficult-only), VOC_ABSENT)
# mAP: average precision per class over the images, averaged over classes, in two documented variants
# (`mode`): "area" (VOC2010 and later: area under the precision-recall curve with precision made monotone)
# and "11point" (VOC2007's devkit: mean of the interpolated precision at recall 0, 0.1, ..., 1).

def voc_bce_loss(logits: torch.Tensor, labels: torch.Tensor, difficult: str = "ignore") -> torch.Tensor:
    """Binary cross-entropy with logits over the 20 classes, mean over the counted entries.
    difficult-only entries (label 0) are left out ("ignore", as the VOC evaluation does), or
    count as "positive" or "negative" targets."""
    if difficult not in VOC_DIFFICULT_RULES:
        raise ValueError(f"voc_bce_loss: difficult must be one of {VOC_DIFFICULT_RULES}, got {difficult!r}")
    target = ((labels == VOC_PRESENT) | ((labels == VOC_DIFFICULT) & (difficult == "positive"))).float()
    weight = ((labels != VOC_DIFFICULT) | (difficult != "ignore")).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, weight=weight, reduction="sum")
    return loss / weight.sum().clamp_min(1.0)


def average_precision(scores: np.ndarray, labels: np.ndarray, mode: str = "area") -> float:
    """AP of one class: scores (N,), labels (N,) in {1, 0, -1}; difficult-only (0) entries are
    left out. Images are ranked by descending score; tied scores keep their input order (a
    stable sort, as the devkit's). NaN when the class has no positive image."""
    if mode not in VOC_AP_MODES:
        raise ValueError(f"average_precision: mode must be one of {VOC_AP_MODES}, got {mode!r}")
    keep = labels != VOC_DIFFICULT
    s, pos = np.asarray(scores, dtype=float)[keep], labels[keep] == VOC_PRESENT
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



def task_of(data: dict) -> Task:
    """The task of a run from its data settings (RunSpec.data)."""
    t = data.get("task") or {}
    if t.get("kind") == MULTI_LABEL:
        return MultiLabel(ap_mode=t["ap_mode"], difficult=t["difficult"])
    return SingleLabel()

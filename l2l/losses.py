"""The losses of teacher-student training (P4 generations, P5 distillation), in one home.

Every function takes raw logits (any dtype; computed in float32, so bf16 autocast is safe)
and returns the batch mean, so they add up into one objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TSD_NORMS = ("K-1", "K")
# TSD's primary class: the top-scored class (argmax, the AAAI text's f_{a_1}, "the largest element") or the
# label (the v2 abstract: "a primary class (the ground-truth)"); the scores it compares: the softmax
# probabilities (the text's f(x; theta), whose log is the cross-entropy's) or the raw logits ("scores").
TSD_PRIMARIES = ("argmax", "label")
TSD_INPUTS = ("probabilities", "logits")


def tsd(logits: torch.Tensor, k: int, norm: str = "K-1", primary: str = "argmax", y: torch.Tensor | None = None,
        scores: str = "probabilities") -> torch.Tensor:
    """Top score difference (P4): with f the scores of one example (``scores``: its softmax
    probabilities, or its logits), TSD = f(primary) - (sum of the K-1 highest other scores) / d,
    d = K-1 (their mean) or K, averaged over the batch.

    ``primary`` ``argmax``: the primary class is the top-scored one, so the secondary classes are
    ranks 2..K (the AAAI text's f_{a_1} - 1/(K-1) sum_{k=2..K} f_{a_k}, a_k the k-th largest).
    ``label``: the primary class is the label ``y`` and the secondary ones the K-1 highest of the
    other classes. The readings agree wherever the model ranks the label first; on an example it
    misranks, argmax TSD still rewards flattening around the wrong class.

    Minimised next to cross-entropy it lowers the top score and raises the K-1 next classes, so the
    teacher keeps a few secondary classes alive. On probabilities, for a correctly ranked training
    example whose remaining probability sits in the K-1 runners-up, the logit gradients of CE
    (p(1) - 1) and of w * TSD (w * p(1) * (1 - p(1)) * (d + 1) / d) cancel at p(1) = d / (w * (d + 1)):
    0.8 for w = 1 (the text's eta = 0.5 in eta * CE + (1 - eta) * TSD), K = 5, d = K-1. Below
    w = d / (d + 1), TSD only slows the growth of p(1).
    """
    if norm not in TSD_NORMS:
        raise ValueError(f"tsd: norm must be one of {TSD_NORMS}, got {norm!r}")
    if primary not in TSD_PRIMARIES or scores not in TSD_INPUTS:
        raise ValueError(f"tsd: primary must be one of {TSD_PRIMARIES} and scores one of {TSD_INPUTS}, "
                         f"got {primary!r}, {scores!r}")
    f = logits.float().softmax(1) if scores == "probabilities" else logits.float()
    d = k - 1 if norm == "K-1" else k
    if primary == "argmax":
        top = f.topk(k, dim=1).values
        return (top[:, 0] - top[:, 1:].sum(1) / d).mean()
    if y is None:
        raise ValueError("tsd: primary 'label' needs the labels y")
    first = f.gather(1, y[:, None])[:, 0]
    others = f.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).values  # the label cannot be secondary
    return (first - others.sum(1) / d).mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-example entropy (nats) of softmax(logits)."""
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def label_smoothing_ce(logits: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Cross-entropy against (1 - epsilon) * one-hot + epsilon / C (Szegedy et al. 2016)."""
    return F.cross_entropy(logits.float(), y, label_smoothing=epsilon)


def confidence_penalty_ce(logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """Cross-entropy + beta * negative entropy of the output (Pereyra et al. 2017)."""
    return F.cross_entropy(logits.float(), y) - beta * entropy(logits).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch.

    The T^2 factor keeps its gradients on the scale of the cross-entropy's as T changes.
    """
    t = temperature
    log_p = (teacher_logits.float() / t).log_softmax(1)
    log_q = (student_logits.float() / t).log_softmax(1)
    # F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) in its own ops, the same values and gradients
    # bit for bit (tests/test_teacher_student.py), which vmap batches (aten's kl_div has no vmap rule: a stack of
    # runs, l2l/stacking.py, would loop over its members)
    return (log_p.exp() * (log_p - log_q)).sum() / log_q.size(0) * t * t


def kd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_loss: torch.Tensor,
                 temperature: float, kd_weight: float, kd=None) -> torch.Tensor:
    """(1 - w) * label_loss + w * KD: the student's loss in both methods (w = kd_weight). kd is the
    task's distillation loss (l2l/tasks.py): kd_loss (softmax, the default) or multilabel_kd_loss."""
    kd = kd or kd_loss
    return (1.0 - kd_weight) * label_loss + kd_weight * kd(student_logits, teacher_logits, temperature)


def multilabel_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                       ) -> torch.Tensor:
    """KD for multi-label outputs (sigmoid per class, e.g. Pascal VOC): T^2 * the binary KL
    between sigmoid(t/T) and sigmoid(s/T), summed over classes, mean over the batch.

    Written as BCE(s/T, q) - BCE(t/T, q) with q = sigmoid(t/T) (the second term is q's entropy),
    so it is zero for identical logits and numerically stable for large ones.
    """
    t = temperature
    s, te = student_logits.float() / t, teacher_logits.float() / t
    q = te.sigmoid()
    kl = (F.binary_cross_entropy_with_logits(s, q, reduction="none")
          - F.binary_cross_entropy_with_logits(te, q, reduction="none"))
    return kl.sum(1).mean() * t * t

"""Filter pruning for P3's compression experiment (P3-C5).

Criterion: the first-order Taylor expansion of Molchanov et al. (2016, "Pruning convolutional
neural networks for resource efficient inference"): for feature map c of activation z,

    Theta(z_c) = | 1/HW * sum_{h,w} z_c,h,w * dC/dz_c,h,w |   per example, averaged over examples,

then L2-normalised across the layer's feature maps (which does not change the ranking within
one layer). The filters with the lowest Theta are pruned.

Pruning keeps module shapes (resume reloads state into a network built the same way): a
:class:`l2l.models.ChannelMask` zeroes the pruned channels, which is exactly what removing the
filters and the next layer's matching input channels does. :func:`slice_pruned` builds the
physically smaller network and :func:`count_parameters` measures it.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from l2l.models import ChannelMask


def taylor_scores(prefix: nn.Module, head: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """Molchanov's Theta for every channel of ``prefix``'s output, with ``head`` on top and the
    cross-entropy with the labels as the cost. Both modules are used as they are (the caller
    sets eval mode) and are never updated."""
    total, n = None, 0
    for x, y in batches:
        with torch.no_grad(), autocast():
            z = prefix(x)
        z = z.float().requires_grad_(True)
        with autocast():
            logits = head(z)
        # reduction="sum": each example's own gradient dC_n/dz_n, as in the per-example criterion
        (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), z)
        per_example = (z.detach() * grad).mean(dim=(2, 3)).abs()  # (N, C)
        total = per_example.sum(0) if total is None else total + per_example.sum(0)
        n += len(y)
    if total is None:
        raise ValueError("taylor_scores: no batches")
    theta = total / n
    return theta / theta.norm().clamp_min(1e-12)


def prune_lowest(mask: ChannelMask, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Zero the mask of the lowest-scoring channels so that ``keep`` channels stay live.
    Already-pruned channels count as pruned first; ties break by channel index. Returns the
    indices pruned now."""
    alive = mask.mask.bool()
    if keep > int(alive.sum()):
        raise ValueError(f"prune_lowest: cannot keep {keep} of {int(alive.sum())} live channels")
    ranked = torch.where(alive, scores.to(mask.mask.device).float(), torch.tensor(-float("inf"),
                         device=mask.mask.device))
    order = torch.argsort(ranked, stable=True)
    drop = order[:len(order) - keep]
    newly = drop[alive[drop]]
    with torch.no_grad():
        mask.mask[drop] = 0.0
    return newly


def _expand(keep: torch.Tensor | None, factor: int) -> torch.Tensor | None:
    """Channel c of a tensor becomes channels c*factor .. c*factor+factor-1 after PixelUnshuffle
    or after flattening a map of ``factor`` pixels."""
    if keep is None or factor == 1:
        return keep
    return (keep[:, None] * factor + torch.arange(factor, device=keep.device)).flatten()


def _next_mask(leaves: list[nn.Module], i: int) -> ChannelMask | None:
    """The mask acting on the output of conv leaves[i] (before the next conv or linear), if any."""
    for m in leaves[i + 1:]:
        if isinstance(m, ChannelMask):
            return m
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return None
    return None


def _slice_param(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    t = getattr(module, name)
    if t is None:
        return
    new = t.detach().index_select(dim, index.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)  # a registered buffer is replaced in place


SUPPORTED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, ChannelMask, nn.PixelUnshuffle, nn.AdaptiveAvgPool2d,
             nn.Flatten, nn.Linear, nn.Identity)


def slice_pruned(model: nn.Module) -> nn.Module:
    """A copy of a masked chain network (e.g. ``layerwise_cnn(..., channel_mask=True)``) with the
    pruned filters physically removed, together with the matching input channels of the layer
    that follows (conv, or linear after pooling). Its outputs equal the masked network's.

    Supports chains of Conv2d, BatchNorm2d, ReLU, ChannelMask, PixelUnshuffle,
    AdaptiveAvgPool2d, Flatten and Linear, in registration order = forward order.
    """
    model = copy.deepcopy(model)
    leaves = [m for m in model.modules() if not list(m.children())]
    for m in leaves:
        if not isinstance(m, SUPPORTED):
            raise ValueError(f"slice_pruned: unsupported layer {type(m).__name__}")
    keep: torch.Tensor | None = None  # live channels of the current activation (None: all)
    pixels = 1  # spatial size of the map that Flatten will unroll
    for i, m in enumerate(leaves):
        if isinstance(m, nn.Conv2d):
            if keep is not None:
                _slice_param(m, "weight", keep, 1)
                m.in_channels = len(keep)
            mask = _next_mask(leaves, i)
            keep = mask.kept() if mask is not None else None
            if keep is not None:
                _slice_param(m, "weight", keep, 0)
                _slice_param(m, "bias", keep, 0)
                m.out_channels = len(keep)
        elif isinstance(m, nn.BatchNorm2d) and keep is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(m, name, keep, 0)
            m.num_features = len(keep)
        elif isinstance(m, ChannelMask) and keep is not None:
            _slice_param(m, "mask", keep, 0)  # all ones now
        elif isinstance(m, nn.PixelUnshuffle):
            keep = _expand(keep, m.downscale_factor ** 2)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
            pixels = size[0] * size[1]
        elif isinstance(m, nn.Flatten):
            keep = _expand(keep, pixels)
        elif isinstance(m, nn.Linear):
            if keep is not None:
                _slice_param(m, "weight", keep, 1)
                m.in_features = len(keep)
            keep = None
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""Prepared arrays living on the training device, with batched on-device augmentation.

The uint8 arrays are moved to the device once; each batch is gathered, cropped, flipped and
normalised there in a few tensor ops, with no per-sample Python. Randomness (order, crop
offsets, flips) is drawn per epoch from a CPU generator keyed by (seed, phase, epoch), so
the same seed gives the same data stream on any device and a resumed run continues it.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from l2l.datasets import DATASETS

def epoch_generator(seed: int, phase: int, epoch: int) -> torch.Generator:
    g = torch.Generator()
    # A distinct, reproducible stream per (seed, phase, epoch).
    g.manual_seed(int(np.random.SeedSequence([seed, phase, epoch]).generate_state(1)[0]))
    return g


class DeviceData:
    def __init__(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]], dataset: str, device: torch.device, *,
                 crop_padding: int, flip: bool, channels_last: bool = False):
        """crop_padding, flip: a run's train.augment (no defaults here: they are the train schema's)."""
        self.device, self.pad, self.flip = device, crop_padding, flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.x = {k: torch.from_numpy(np.ascontiguousarray(x)).to(device) for k, (x, _) in arrays.items()}
        self.y = {k: torch.from_numpy(y.astype(np.int64)).to(device) for k, (_, y) in arrays.items()}
        # Pad the training images once (zeros, as torchvision's RandomCrop(padding=p)).
        self.train_padded = F.pad(self.x["train"], (self.pad,) * 4) if self.pad else self.x["train"]
        mean, std = DATASETS[dataset].normalization
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_t
        self._offsets = torch.arange(self.x["train"].shape[-1], device=device)

    def __len__(self) -> int:
        return len(self.y["train"])

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self._shift, x_uint8.float(), self._scale)  # (x/255 - mean) / std in one op
        return x.contiguous(memory_format=self.memory_format)

    def epoch_plan(self, seed: int, phase: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, crop offsets (N, 2), flip flags) for one epoch, on the device."""
        g = epoch_generator(seed, phase, epoch)
        n = len(self)
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        return order.to(self.device), offsets.to(self.device), flips.to(self.device)

    def augment(self, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Random crop (of the zero-padded image) and horizontal flip for the images `idx`."""
        imgs = self.train_padded[idx]
        if self.pad:
            rows = (offsets[:, 0, None] + self._offsets)[:, :, None]  # (B, H, 1)
            cols = (offsets[:, 1, None] + self._offsets)[:, None, :]  # (B, 1, W)
            batch = torch.arange(len(idx), device=self.device)[:, None, None]
            imgs = imgs[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indexing puts C last
        if self.flip:
            imgs = torch.where(flips[:, None, None, None], imgs.flip(-1), imgs)
        return self.normalise(imgs)

    def train_batches(self, seed: int, phase: int, epoch: int, batch_size: int
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self.epoch_plan(seed, phase, epoch)
        if not self.flip:
            flips = torch.zeros_like(flips)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.augment(idx, offsets[idx], flips[idx]), self.y["train"][idx]

    def epoch_by_position(self, seed: int, phase: int, epoch: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch of train_batches in batch order: image ids, their crop offsets, flips and labels."""
        order, offsets, flips = self.epoch_plan(seed, phase, epoch)
        if not self.flip:
            flips = torch.zeros_like(flips)
        return order, offsets[order], flips[order], self.y["train"][order]

    def stacked_batch(self, plans: tuple[torch.Tensor, ...], start: int, stop: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [start, stop) of K runs' epochs (epoch_by_position of each, stacked: (K, N) each),
        augmented in one call: images (K, B, C, H, W) and labels (K, B); each run's images are exactly
        those train_batches gives it (augmentation is per image)."""
        order, crops, flips, labels = (t[:, start:stop] for t in plans)
        x = self.augment(order.reshape(-1), crops.reshape(-1, 2), flips.reshape(-1))
        return x.view(*order.shape, *x.shape[1:]), labels

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.x[split], self.y[split]
        for i in range(0, len(y), batch_size):
            yield self.normalise(x[i:i + batch_size]), y[i:i + batch_size]

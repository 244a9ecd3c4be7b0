"""Linear probes: how linearly separable each stage's frozen features are (P2's comparison).

At every stage of a trained network (:func:`l2l.models.stage_ends`) a probe of the same form as
P3's k=1 auxiliary head reads the frozen features: average pooling to a 2x2 map, flattening,
standardisation with the training set's per-feature mean and std (so one learning rate suits
every stage), and a linear layer. All stages' probes train together, one forward pass of the
frozen network per batch, with the harness's augmented training stream (as the layerwise heads
they are compared with), SGD with momentum 0.9, the run's weight decay and a cosine schedule.
Accuracy is then measured on the un-augmented training split and the test split (reporting
only: nothing is selected on it).

Units (:data:`l2l.models.UNITS`): probes read the output of every stage ("stage", metrics
``stage{s}_probe_*``) and/or of every layer ("layer", ``layer{l}_probe_*``). A stage ends where
its last layer ends, and each probe trains on its own parameters only, so one probe per distinct
boundary serves both units, and a probe's initialisation depends only on the seed and where it
reads: the same numbers as probing each unit alone.

The probed network is only read: eval mode (BatchNorm statistics untouched) and no gradients.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from l2l.checks import config_error
from l2l.models import UNITS, layer_stage_ends, layer_view, stage_ends, stage_outputs

log = logging.getLogger(__name__)

PROBE_PHASE = 10_000  # the probes' own data stream: epoch_generator(seed, PROBE_PHASE, epoch)

# The probe budget, one definition for every method that probes (conventional, layerwise): P2's
# comparison of early layers is like with like only when both networks' probes get the same budget.
OPTIONS: dict = {
    "probe_epochs": 0,  # 0: no probes; else epochs of linear-probe training after the network's training
    "probe_lr": 0.1,  # the probes' SGD learning rate (cosine to 0), on standardised features
}


def check_budget(out: dict, path: str) -> None:
    """The probe budget of a method's validated options (which hold :data:`OPTIONS`)."""
    if out["probe_epochs"] < 0:
        raise config_error(f"{path}.probe_epochs", "a non-negative integer", out["probe_epochs"])
    if out["probe_lr"] <= 0:
        raise config_error(f"{path}.probe_lr", "a positive number", out["probe_lr"])


class LinearProbe(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.register_buffer("mean", torch.zeros(4 * channels))
        self.register_buffer("std", torch.ones(4 * channels))
        self.linear = nn.Linear(4 * channels, num_classes)

    def features(self, f: torch.Tensor) -> torch.Tensor:
        return self.pool(f.float())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear((self.features(f) - self.mean) / self.std)


def _probe(channels: int, num_classes: int, seed: int, key: int) -> LinearProbe:
    with torch.random.fork_rng(devices=[]):  # the run's random stream is left as it was
        torch.manual_seed(seed * 100_003 + PROBE_PHASE + key)
        return LinearProbe(channels, num_classes)


class _Probed(nn.Module):
    """Logits of every stage's probe and, last, of the network's own classifier, stacked on a
    new leading axis: one forward pass evaluates them all."""

    def __init__(self, model: nn.Sequential, probes: nn.ModuleList, ends: list[int]):
        super().__init__()
        self.model, self.probes, self.ends = model, probes, ends

    def forward(self, x):
        feats = stage_outputs(self.model, x, self.ends)
        logits = [p(f).float() for p, f in zip(self.probes, feats)]
        return torch.stack([*logits, self.model.classifier(feats[-1]).float()])


def probe_stages(model: nn.Sequential, ctx, epochs: int, lr: float, units: tuple[str, ...] = ("stage",)
                 ) -> dict[str, float]:
    """Train a linear probe on every unit (each of ``units``) of the (trained, frozen) ``model``;
    returns ``{"<unit><s>_probe_train_acc", "<unit><s>_probe_test_acc"}`` for s = 1..S of each unit
    and ``model_train_acc`` / ``model_test_acc`` (the network's own classifier), in %.
    Train accuracies are on the un-augmented training split."""
    if not units or set(units) - set(UNITS):
        raise ValueError(f"probe units: expected some of {', '.join(UNITS)}, got {units!r}")
    was_training = model.training
    model.eval()
    full = model
    model = layer_view(full) if "layer" in units else full
    ends = stage_ends(model)
    at = {"stage": [ends.index(e) for e in layer_stage_ends(full)] if model is not full else list(range(len(ends))),
          "layer": list(range(len(ends)))}
    spec = ctx.spec
    bs = spec.train["batch_size"]
    eval_bs = spec.train["eval_batch_size"]
    with torch.no_grad(), ctx.autocast():
        x0 = next(iter(ctx.data.eval_batches("train", 2)))[0]
        widths = [f.shape[1] for f in stage_outputs(model, x0, ends)]
    # Each probe's initialisation depends on the run's seed and where it reads (its layer count), not
    # on which other probes exist: probing stages alone or with layers gives the same stage probes.
    keys = layer_stage_ends(full) if model is full else list(ends)
    probes = nn.ModuleList(_probe(c, ctx.num_classes, spec.seed, k) for c, k in zip(widths, keys)).to(ctx.device)
    _standardise(model, probes, ends, ctx, eval_bs)
    opt = torch.optim.SGD(probes.parameters(), lr=lr, momentum=0.9,
                          weight_decay=spec.train["optimizer"].get("weight_decay", 0.0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(epochs):
        for x, y in ctx.data.train_batches(spec.seed, PROBE_PHASE, epoch, bs):
            with torch.no_grad(), ctx.autocast():
                feats = stage_outputs(model, x, ends)
            loss = sum(F.cross_entropy(p(f), y) for p, f in zip(probes, feats))
            ctx.update(opt, loss)
        sched.step()
    out = {}
    for split in ("train", "test"):
        *acc, own = _accuracies(_Probed(model, probes, ends), ctx, split, eval_bs)
        for unit in units:
            out.update({f"{unit}{s}_probe_{split}_acc": acc[i] for s, i in enumerate(at[unit], 1)})
        out[f"model_{split}_acc"] = own
    full.train(was_training)
    for unit in units:
        log.info("probes: test acc by %s %s", unit,
                 [round(out[f"{unit}{s}_probe_test_acc"], 2) for s in range(1, len(at[unit]) + 1)])
    return out


@torch.no_grad()
def _standardise(model, probes, ends, ctx, batch_size: int) -> None:
    """Set each probe's mean/std to its pooled features' statistics on the training split."""
    n, s1, s2 = 0, [0.0] * len(probes), [0.0] * len(probes)
    for x, _ in ctx.data.eval_batches("train", batch_size):
        with ctx.autocast():
            feats = stage_outputs(model, x, ends)
        for i, (p, f) in enumerate(zip(probes, feats)):
            z = p.features(f).double()
            s1[i] = s1[i] + z.sum(0)
            s2[i] = s2[i] + (z * z).sum(0)
        n += len(x)
    for i, p in enumerate(probes):
        mean = s1[i] / n
        var = (s2[i] / n - mean * mean).clamp_min(0)
        p.mean.copy_(mean.float())
        p.std.copy_(var.sqrt().float().clamp_min(1e-6))


@torch.no_grad()
def _accuracies(probed: nn.Module, ctx, split: str, batch_size: int) -> list[float]:
    correct, n = None, 0
    for x, y in ctx.data.eval_batches(split, batch_size):
        with ctx.autocast():
            hits = (probed(x).argmax(-1) == y).sum(1)
        correct = hits if correct is None else correct + hits
        n += len(y)
    return [100.0 * c / n for c in correct.tolist()]

"""Conventional end-to-end training: the whole network, cross-entropy, one update per batch."""
from __future__ import annotations

from typing import Iterator

import torch.nn as nn

from l2l.config import RunSpec
from l2l.engine import Phase, RunContext
from l2l.methods.options import validate
from l2l.models import build_model

OPTIONS: dict = {}


def validate_options(options: dict, path: str) -> dict:
    return validate(options, OPTIONS, path)


def predictor(spec: RunSpec, num_classes: int) -> nn.Module:
    return build_model(spec.model_cfg, num_classes)


def phases(spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
    model = ctx.prepare(predictor(spec, ctx.num_classes))
    opt = ctx.optimizer(model.parameters())
    epochs = spec.train["epochs"]
    yield Phase("end_to_end", epochs, {"model": model}, {"sgd": opt}, ctx.cross_entropy_step(model, opt),
                predictor=model, schedulers={"lr": ctx.scheduler(opt, epochs)})

"""Conventional end-to-end training: the whole network, the task's loss (cross-entropy; per-class
binary cross-entropy on a multi-label dataset), one update per batch.

Option ``probe_epochs`` > 0 adds, after training, a linear probe on every stage's frozen
features (:mod:`l2l.probe`): per-stage probe train/test accuracy lands in results/phases.csv
(phase ``end_to_end``), the end-to-end twin's side of P2's per-stage comparison with
layerwise training. The probes never change the trained network.
"""
from __future__ import annotations

from typing import Iterator

from l2l.checks import config_error
from l2l.datasets import MULTI_LABEL, SINGLE_LABEL
from l2l.engine import Phase, RunContext
from l2l.methods.base import Method, model_predictor
from l2l.methods.options import validate
from l2l.probe import probe_stages
from l2l.spec import RunSpec

OPTIONS: dict = {
    "probe_epochs": 0,  # 0: no probes; else epochs of linear-probe training per stage after training
    "probe_lr": 0.1,  # the probes' SGD learning rate (cosine to 0), on standardised features
}


def supported_tasks(options: dict) -> tuple[str, ...]:
    # the linear probes are softmax classifiers scored by top-1 accuracy
    return (SINGLE_LABEL,) if options["probe_epochs"] else (SINGLE_LABEL, MULTI_LABEL)


def validate_options(options: dict, path: str) -> dict:
    out = validate(options, OPTIONS, path)
    if out["probe_epochs"] < 0:
        raise config_error(f"{path}.probe_epochs", "a non-negative integer", out["probe_epochs"])
    if out["probe_lr"] <= 0:
        raise config_error(f"{path}.probe_lr", "a positive number", out["probe_lr"])
    return out


def phases(spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
    model = ctx.prepare(model_predictor(spec, ctx.num_classes))
    opt = ctx.optimizer(model.parameters())
    epochs = spec.train["epochs"]
    probe_epochs = spec.options.get("probe_epochs", 0)
    on_end = (lambda: probe_stages(model, ctx, probe_epochs, spec.options["probe_lr"])) if probe_epochs else None
    yield Phase("end_to_end", epochs, {"model": model}, {"sgd": opt}, ctx.supervised_step(model, opt),
                predictor=model, schedulers={"lr": ctx.scheduler(opt, epochs)}, on_end=on_end)


METHOD = Method("conventional", OPTIONS, phases, validate=validate_options, supported_tasks=supported_tasks)

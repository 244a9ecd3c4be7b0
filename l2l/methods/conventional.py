"""Conventional end-to-end training: the whole network, the task's loss (cross-entropy; per-class
binary cross-entropy on a multi-label dataset), one update per batch.

Option ``probe_epochs`` > 0 adds, after training, a linear probe on every unit's frozen
features (:mod:`l2l.probe`; ``probe_units``: stages and/or layers): per-unit probe train/test
accuracy lands in results/phases.csv (phase ``end_to_end``), the end-to-end twin's side of P2's
per-unit comparison with layerwise training. The probes never change the trained network.
"""
from __future__ import annotations

from typing import Iterator

from l2l.checks import config_error
from l2l.datasets import MULTI_LABEL, SINGLE_LABEL
from l2l.engine import Phase, RunContext
from l2l.methods.base import Method, model_predictor
from l2l.methods.options import validate
from l2l.models import LAYER_ARCHS, UNITS
from l2l.probe import OPTIONS as PROBE_OPTIONS, check_budget, probe_stages
from l2l.spec import RunSpec

OPTIONS: dict = {
    **PROBE_OPTIONS,
    # the units probed (l2l.models.UNITS): stage (the twin of stage-wise layerwise runs) and/or layer
    # (of per-layer runs); both from one set of probes (a stage ends where its last layer ends)
    "probe_units": ["stage"],
}


def supported_tasks(options: dict) -> tuple[str, ...]:
    # the linear probes are softmax classifiers scored by top-1 accuracy
    return (SINGLE_LABEL,) if options["probe_epochs"] else (SINGLE_LABEL, MULTI_LABEL)


def validate_options(options: dict, path: str) -> dict:
    out = validate(options, OPTIONS, path)
    check_budget(out, path)
    units = out["probe_units"]
    if not units or any(u not in UNITS for u in units) or len(set(units)) < len(units):
        raise config_error(f"{path}.probe_units", "a non-empty list of distinct units among " + ", ".join(UNITS), units)
    return out


def check(spec: RunSpec, num_classes: int, path: str) -> None:
    """Plan time: layer probes only on an architecture with layer units."""
    if spec.options["probe_epochs"] and "layer" in spec.options["probe_units"] \
            and spec.model_cfg["arch"] not in LAYER_ARCHS:
        raise config_error(f"{path}.probe_units", "stage for this model (layer units exist for "
                           + ", ".join(LAYER_ARCHS) + ")", spec.model)


def phases(spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
    model = ctx.prepare(model_predictor(spec, ctx.num_classes))
    opt = ctx.optimizer(model.parameters())
    epochs = spec.train["epochs"]
    probe_epochs = spec.options.get("probe_epochs", 0)
    on_end = (lambda: probe_stages(model, ctx, probe_epochs, spec.options["probe_lr"],
                                   tuple(spec.options["probe_units"]))) if probe_epochs else None
    yield Phase("end_to_end", epochs, {"model": model}, {"sgd": opt}, ctx.supervised_step(model, opt),
                predictor=model, schedulers={"lr": ctx.scheduler(opt, epochs)}, on_end=on_end)


METHOD = Method("conventional", OPTIONS, phases, validate=validate_options, supported_tasks=supported_tasks,
                check=check, stackable=lambda options: None)

"""The contract every training method fulfils, with its defaults: one :class:`Method` per module
(``METHOD`` at its bottom), registered in :mod:`l2l.methods`.

The replay rule: ``phases(spec, ctx)`` builds its phases lazily, one at a time, and building one
has no side effect beyond the modules and optimizers it creates (no file read before the phase
is trained, no training inside the generator's setup). The engine relies on it to resume (it
replays the generator and skips finished phases), and :func:`l2l.cost.planned_epochs` to count a
run's epochs without training it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch.nn as nn

from l2l.datasets import SINGLE_LABEL
from l2l.engine import Phase, RunContext
from l2l.models import build_model
from l2l.spec import RunSpec
from l2l.methods.options import validate


def model_predictor(spec: RunSpec, num_classes: int) -> nn.Module:
    """The default predictor: the run's model itself."""
    return build_model(spec.model_cfg, num_classes)


@dataclass(frozen=True)
class Method:
    """name: the params.yaml ``method:`` value; OPTIONS: its options with their defaults
    (``experiments.<e>.options``); phases: the entry point (the replay rule above).

    Defaults, overridden where a method differs:
    - validate(options, path) -> options with defaults filled in (unknown keys and other types
      than the default's rejected, one line naming the key path);
    - predictor(spec, num_classes): an untrained module shaped like the final predictor, into which
      the saved final.pt / best.pt load (evaluation);
    - supported_tasks(options): the label kinds it trains on (l2l.datasets: single-label,
      multi-label); the plan refuses a dataset of another kind;
    - requires(options) -> {name: {experiment, model}}: other runs of the plan (same dataset and
      seed) it reads, e.g. distill's teacher; the plan puts each one's identity into the options as
      ``<name>_run`` = {hash, model_cfg}, and the train stage trains them first;
    - check(spec, num_classes, path): plan-time checks that need the run (its model, its dataset's
      classes), so an option error surfaces before any training, naming ``path`` (the options' key);
    - phase_metrics(options, model_cfg) -> {phase name: measure names}: the phases of a run of that model
      whose measures (results/phases.csv) a claim's arm may name, and those measures (a claim naming
      another is refused at plan time).
    - stackable(options) -> None where runs that differ only by seed may train as one stack
      (l2l/stacking.py: each step makes ONE update of one optimizer, as its last effect, reading only
      the phase's modules and its own batch), else why not in a few words (default: not declared).
    """

    name: str
    OPTIONS: dict
    phases: Callable[[RunSpec, RunContext], Iterator[Phase]]
    validate: Callable[[dict, str], dict] | None = None
    predictor: Callable[[RunSpec, int], nn.Module] = model_predictor
    supported_tasks: Callable[[dict], tuple[str, ...]] = lambda options: (SINGLE_LABEL,)
    requires: Callable[[dict], dict[str, dict]] = lambda options: {}
    check: Callable[[RunSpec, int, str], None] = lambda spec, num_classes, path: None
    phase_metrics: Callable[[dict, dict], dict[str, tuple[str, ...]]] = lambda options, model_cfg: {}
    stackable: Callable[[dict], str | None] = lambda options: "its step is not declared stackable"

    def validate_options(self, options: dict, path: str) -> dict:
        return self.validate(options, path) if self.validate else validate(options, self.OPTIONS, path)

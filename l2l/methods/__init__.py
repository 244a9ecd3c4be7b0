"""Training methods. Each is one module exposing:

- ``OPTIONS``: its options with their defaults (params.yaml ``experiments.<name>.options``);
- ``validate_options(options, path)`` -> options with defaults filled in (one-line errors);
- ``phases(spec, ctx)``: the entry point, yielding the :class:`l2l.engine.Phase` s the engine runs;
- ``supported_tasks(options)``: the label kinds it trains on ("single-label", "multi-label":
  :mod:`l2l.tasks`); the plan refuses a dataset of another kind;
- ``predictor(spec, num_classes)``: an untrained module shaped like the final predictor,
  into which the saved ``final.pt`` / ``best.pt`` state loads (for evaluation);
- optionally ``requires(options)`` -> {name: {experiment, model}}: other runs of the plan (same
  dataset and seed) this run reads, e.g. distill's teacher. The plan puts each one's identity into
  the run's options as ``<name>_run`` = {hash, model_cfg} (so the run's hash covers theirs), and the
  train stage trains them first (:func:`l2l.executor.run_plan`); ``RunContext.runs`` is where
  their folders are.
"""
from l2l.methods import conventional, distill, generations, l2l, layerwise

METHODS = {
    "conventional": conventional,
    "l2l": l2l,
    "layerwise": layerwise,
    "generations": generations,
    "distill": distill,
}

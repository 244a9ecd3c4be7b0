"""A training run's model as an MLflow 3 logged model that loads weights-only.

Every finished run gets a LoggedModel (the experiment's "Models" tab, the run's "Logged models"),
linked to its run as the run's output at its last epoch. Its artifacts:

- ``model.pt``: the run's ``final.pt``, byte for byte: ``torch.save`` of the predictor's state dict
  (tensors only), the checkpoint the evaluate stage scores;
- ``model.json``: what rebuilds the architecture (the run's spec: method, model config; classes)
  and model.pt's sha256.

:func:`load_model` checks the sha256, builds the architecture with the method's predictor (the one
the evaluate stage loads final.pt into) and reads the weights with ``torch.load(weights_only=True)``:
nothing is unpickled. Not ``mlflow.pytorch.log_model``: its pickle format unpickles whatever the
file holds, and its pt2 format (torch.export) needs every method's predictor to export and infers
pip requirements, seconds per run.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch.nn as nn

from l2l.checks import IntegrityError
from l2l.engine import load_checkpoint
from l2l.io import sha256_file
from l2l.methods import METHODS
from l2l.spec import RunSpec
from l2l.tracking import HASH_TAG, client, tracking_uri

MODEL_TYPE = "l2l-state-dict"  # the logged model's type: a torch state dict plus the spec that rebuilds it


def log_model(c, run_id: str, experiment_id: str, spec: RunSpec, checkpoint: Path, num_classes: int,
              step: int) -> str:
    """Log `checkpoint` (a run's final.pt) as the logged model of MLflow run `run_id` (once: a run
    that has its model already keeps it). Returns the model's id."""
    from mlflow.entities import LoggedModelOutput

    run = c.get_run(run_id)
    if run.outputs is not None and run.outputs.model_outputs:
        return run.outputs.model_outputs[0].model_id
    model = c.create_logged_model(experiment_id, name=f"{spec.experiment}-{spec.model}-{spec.dataset}-s{spec.seed}",
                                  source_run_id=run_id, model_type=MODEL_TYPE,
                                  tags={HASH_TAG: spec.hash, "l2l.method": spec.method},
                                  params={"method": spec.method, "model": spec.model, "arch": spec.model_cfg["arch"],
                                          "num_classes": str(num_classes)})
    with tempfile.TemporaryDirectory(prefix="l2l-model-") as tmp:
        (Path(tmp) / "model.pt").write_bytes(Path(checkpoint).read_bytes())
        (Path(tmp) / "model.json").write_text(json.dumps(
            {"spec": spec.to_dict(), "num_classes": num_classes, "sha256": sha256_file(checkpoint),
             "weights": "model.pt: torch.save(state_dict); load with torch.load(weights_only=True)",
             "load": "l2l.mlflow_model.load_model(model_id)"}, indent=1))
        c.log_model_artifacts(model.model_id, tmp)
    c.finalize_logged_model(model.model_id, "READY")
    c.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


def load_model(model_id: str, uri: str | None = None) -> nn.Module:
    """The logged model `model_id` (store: `uri`, default the harness's) as its architecture with its
    weights, on the CPU, in eval mode; model.pt must match its recorded sha256."""
    import mlflow

    c = client() if uri is None else mlflow.MlflowClient(tracking_uri=uri)
    model = c.get_logged_model(model_id)
    with tempfile.TemporaryDirectory(prefix="l2l-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp,
                                                         tracking_uri=uri or tracking_uri()))
        meta = json.loads((local / "model.json").read_text())
        spec = RunSpec.from_dict(meta["spec"])
        net = METHODS[spec.method].predictor(spec, meta["num_classes"])
        if sha256_file(local / "model.pt") != meta["sha256"]:
            raise IntegrityError(f"logged model {model_id}: model.pt does not match the sha256 in its model.json "
                                 f"({meta['sha256'][:12]}...): refusing to load it")
        net.load_state_dict(load_checkpoint(local / "model.pt"))
    return net.eval()

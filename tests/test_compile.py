"""train.compile reaches every method's step (graphs compiled > 0, no fallback to eager), a
recompile-limit hit is logged as an error, and train.deterministic sets torch's kernel choice
and is recorded in the result. Inductor compiles for minutes on 2 CPU cores, so these trace
with the aot_eager backend (the same Dynamo graph capture, eager kernels)."""
import logging

import pytest
import torch
import torch.nn as nn

from l2l import compiling
from l2l.compiling import RunCompiler
from l2l.engine import RunContext, train_run
from l2l.methods import conventional, distill, generations, l2l, layerwise
from tests.conftest import make_spec
from tests.test_teacher_student import TRAIN, make, student, teacher_run

COMPILED = {**TRAIN, "compile": True}


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setitem(compiling.COMPILE_OPTIONS, "backend", "aot_eager")


@pytest.mark.parametrize("method, options, modules", [
    (layerwise, {}, 2 * 3 - 1),  # per stage: the frozen prefix (none at stage 1) and the stage with its head
    (l2l, {"reading": "alternating"}, 2),  # student and teacher parts
    (generations, {"generations": 1}, 3),  # gen0; gen1 and its on-the-fly teacher
])
def test_every_methods_step_is_compiled(tmp_path, method, options, modules):
    spec, ctx = make(method, options, model_cfg={"arch": "cnn", "width": 4}, train=COMPILED)
    result = train_run(spec, method, ctx, tmp_path / "run")
    assert result["compile"]["modules"] == modules
    assert result["compile"]["graphs"] > 0 and result["compile"]["fallbacks_to_eager"] == 0
    assert result["tags"]["train.compile"] == "true"


def test_distill_step_compiles_student_and_teacher(tmp_path):
    teacher, _ = teacher_run(tmp_path)
    spec, ctx = student(tmp_path, teacher, train=COMPILED)
    result = train_run(spec, distill, ctx, tmp_path / spec.hash)
    assert result["compile"]["modules"] == 2
    assert result["compile"]["graphs"] > 0 and result["compile"]["fallbacks_to_eager"] == 0


def test_fallback_to_eager_is_an_error_naming_the_run(monkeypatch, caplog):
    monkeypatch.setattr(compiling, "RECOMPILES_PER_MODULE", 1)
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch would delete the config entry on undo)
        compiler = RunCompiler("run-abc")
        try:
            forward = compiler(nn.Linear(4, 2))
            for n in (3, 5, 7):  # static shapes: each batch size is a recompile; the limit is one entry
                forward(torch.zeros(n, 4))
            with caplog.at_level(logging.ERROR, logger="l2l.compiling"):
                summary = compiler.summary()
        finally:
            compiler.close()
        assert torch._dynamo.config.recompile_limit == 1  # close() put the limit back
    assert summary["fallbacks_to_eager"] >= 1
    assert any("run-abc" in r.getMessage() and "eagerly" in r.getMessage() for r in caplog.records)


def test_deterministic_switch_sets_torch_and_is_recorded(tmp_path, tiny_data):
    spec = make_spec(train={**make_spec().train, "epochs": 1, "deterministic": True})
    try:
        result = train_run(spec, conventional,
                           RunContext(spec, tiny_data, 10, torch.device("cpu")), tmp_path / "det")
        assert torch.are_deterministic_algorithms_enabled()
        assert result["deterministic"] is True and result["tags"]["train.deterministic"] == "true"
        RunContext(make_spec(), tiny_data, 10, torch.device("cpu"))  # the next run's default
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


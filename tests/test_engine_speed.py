"""train.compile: the plain step runs through torch.compile, trains the same parameters (the
checkpoint keeps the plain module's keys) to the same numbers as eager, up to float rounding.
Inductor compiles for minutes on 2 CPU cores, so the test traces with the aot_eager backend
(Dynamo + AOTAutograd, the same graph capture, eager kernels); benchmarks/throughput.py times
the inductor path."""
import pytest
import torch

from l2l import compiling
from l2l.engine import RunContext, load_checkpoint, train_run
from l2l.methods import conventional
from tests.conftest import make_spec


def test_compiled_step_trains_like_eager(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setitem(compiling.COMPILE_OPTIONS, "backend", "aot_eager")
    eager_spec = make_spec()
    compiled_spec = make_spec(train={**eager_spec.train, "compile": True})
    cpu = torch.device("cpu")
    eager = train_run(eager_spec, conventional, RunContext(eager_spec, tiny_data, 10, cpu), tmp_path / "eager")
    torch._dynamo.reset()
    compiled = train_run(compiled_spec, conventional, RunContext(compiled_spec, tiny_data, 10, cpu),
                         tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really went through Dynamo
    a, b = load_checkpoint(tmp_path / "eager/final.pt"), load_checkpoint(tmp_path / "compiled/final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
    assert compiled["final"]["train_loss"] == pytest.approx(eager["final"]["train_loss"], rel=1e-4)

import pandas as pd
import pytest
import torch

from l2l.engine import RunContext, load_checkpoint, train_run
from l2l.methods import conventional
from tests.conftest import make_spec


def _run(spec, data, run_dir, **kw):
    return train_run(spec, conventional, RunContext(spec, data, 10, torch.device("cpu")), run_dir, **kw)


def test_same_seed_same_numbers_on_cpu(tmp_path, tiny_data):
    spec = make_spec()
    a = _run(spec, tiny_data, tmp_path / "a")
    b = _run(spec, tiny_data, tmp_path / "b")
    assert pd.read_csv(tmp_path / "a/history.csv").drop(columns=["epoch_seconds", "images_per_s"]).equals(
        pd.read_csv(tmp_path / "b/history.csv").drop(columns=["epoch_seconds", "images_per_s"]))
    assert a["final"] == b["final"]
    sa, sb = (load_checkpoint(tmp_path / f"{r}/final.pt") for r in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _run(make_spec(seed=1), tiny_data, tmp_path / "c")
    assert c["final"] != a["final"]


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, tiny_data):
    spec = make_spec(train={**make_spec().train, "epochs": 3})
    full = _run(spec, tiny_data, tmp_path / "full")
    assert _run(spec, tiny_data, tmp_path / "cut", stop_after_epochs=1) == {"interrupted": True}
    assert (tmp_path / "cut/last.pt").exists() and not (tmp_path / "cut/result.json").exists()
    resumed = []
    again = _run(spec, tiny_data, tmp_path / "cut", on_resume=resumed.extend)
    assert len(resumed) == 1  # the epoch finished before the interruption, handed over for back-filling
    assert again["final"] == full["final"] and again["best"]["val_acc"] == full["best"]["val_acc"]
    a, b = load_checkpoint(tmp_path / "full/final.pt"), load_checkpoint(tmp_path / "cut/final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut/last.pt").exists()  # resume state removed once the run is complete


def test_outputs_and_best_checkpoint(tmp_path, tiny_data):
    spec = make_spec(train={**make_spec().train, "epochs": 3})
    result = _run(spec, tiny_data, tmp_path)
    hist = pd.read_csv(tmp_path / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2] and hist["updates"].iloc[-1] == 3 * 3  # 96 images / 32 per batch
    assert result["best"]["val_acc"] == hist["val_acc"].max()
    best_epoch = int(hist["val_acc"].idxmax())
    assert result["best"]["epoch"] == best_epoch
    assert hist["lr"].iloc[0] == pytest.approx(0.05) and hist["lr"].iloc[-1] < 0.05  # cosine decays
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "final.pt", sha256="0" * 64)
    assert set(load_checkpoint(tmp_path / "final.pt", sha256=result["final_sha256"])) == set(
        conventional.METHOD.predictor(spec, 10).state_dict())

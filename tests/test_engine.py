import pandas as pd
import pytest
import torch

from l2l.engine import RunContext, load_checkpoint, train_run
from l2l.checks import IntegrityError, LockedError
from l2l.io import read_record, run_lock
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
    assert not list((tmp_path / "cut").glob("*.pt.*")) and not (tmp_path / "cut/last.pt").exists()  # resume states gone
    assert not list((tmp_path / "cut").glob("*.tmp"))


def _same_weights(a, b):
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def three_epochs(tmp_path, tiny_data):
    spec = make_spec(train={**make_spec().train, "epochs": 3})
    return spec, _run(spec, tiny_data, tmp_path / "full")


@pytest.mark.parametrize("damage", ["truncate_last", "flip_byte_last", "truncate_both", "no_sidecar"])
def test_a_damaged_resume_state_falls_back_and_ends_as_uninterrupted(tmp_path, tiny_data, three_epochs, damage, caplog):
    spec, full = three_epochs
    cut = tmp_path / "cut"
    _run(spec, tiny_data, cut, stop_after_epochs=2)  # last.pt after epoch 2, previous.pt after epoch 1
    last, prev = cut / "last.pt", cut / "previous.pt"
    assert last.exists() and prev.exists()
    if damage.startswith("truncate"):
        for p in ([last, prev] if damage == "truncate_both" else [last]):
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "flip_byte_last":
        b = bytearray(last.read_bytes())
        b[len(b) // 2] ^= 0xFF
        last.write_bytes(bytes(b))
    else:
        (cut / "last.pt.json").unlink()
    resumed = []
    with caplog.at_level("WARNING", logger="l2l.engine"):
        again = _run(spec, tiny_data, cut, on_resume=resumed.extend)
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{last}: ") for m in warned)
    if damage == "truncate_both":
        assert resumed == [] and any(m.startswith(f"{prev}: ") and "first epoch" in m for m in warned)
    else:
        assert len(resumed) == 1 and "resuming from previous.pt" in warned[0]
    assert again["final"] == full["final"] and again["best"] == full["best"]
    assert _same_weights(cut / "final.pt", tmp_path / "full/final.pt")
    assert _same_weights(cut / "best.pt", tmp_path / "full/best.pt")


def test_checkpoint_every_n_epochs_and_at_phase_ends(tmp_path, tiny_data, three_epochs):
    spec, full = three_epochs
    cut = tmp_path / "cut"
    _run(spec, tiny_data, cut, stop_after_epochs=1, checkpoint_every=2)
    assert not (cut / "last.pt").exists()  # epoch 1 of 3 is no checkpoint at every 2
    _run(spec, tiny_data, cut, stop_after_epochs=2, checkpoint_every=2)
    assert load_checkpoint(cut / "last.pt")["epoch"] == 1 and not (cut / "previous.pt").exists()
    resumed = []
    again = _run(spec, tiny_data, cut, checkpoint_every=2, on_resume=resumed.extend)
    assert len(resumed) == 2 and again["final"] == full["final"]
    assert _same_weights(cut / "final.pt", tmp_path / "full/final.pt")


def test_checkpoint_min_seconds_skips_states_until_that_much_time_has_passed(tmp_path, tiny_data, three_epochs):
    """executor.checkpoint_min_seconds: a fast epoch is not worth a state (a GPU epoch of a small ResNet takes
    seconds, a state up to one); the phase's end always gets one, and a run cut before it restarts, identically."""
    spec, full = three_epochs
    cut = tmp_path / "cut"
    _run(spec, tiny_data, cut, stop_after_epochs=2, checkpoint_min_seconds=3600)
    assert not (cut / "last.pt").exists()  # two epochs, far less than an hour
    resumed = []
    again = _run(spec, tiny_data, cut, checkpoint_min_seconds=3600, on_resume=resumed.extend)
    assert resumed == [] and again["final"] == full["final"]
    assert _same_weights(cut / "final.pt", tmp_path / "full/final.pt")


def test_result_records_the_sha256_of_every_file_it_depends_on(tmp_path, tiny_data, three_epochs):
    full_dir = tmp_path / "full"
    record = read_record(full_dir / "result.json")  # verifies the record and each file
    assert set(record["files"]) == {"final.pt", "best.pt", "history.csv"}
    assert record["files"]["final.pt"] == record["final_sha256"] and record["files"]["best.pt"] == record["best"]["sha256"]
    text = (full_dir / "result.json").read_text()
    (full_dir / "result.json").write_text(text.replace('"val_acc": ', '"val_acc": 9', 1))
    with pytest.raises(IntegrityError, match=r"result.json: contents do not match its recorded sha256"):
        read_record(full_dir / "result.json")


def test_a_second_trainer_of_a_locked_run_is_refused(tmp_path, tiny_data):
    import subprocess
    import sys

    spec = make_spec()
    run_dir = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from l2l.io import run_lock\n"
                               f"with run_lock({str(run_dir)!r}):\n print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as e:
            _run(spec, tiny_data, run_dir)
        assert str(e.value).startswith(f"{run_dir}: being trained by PID {holder.pid} on ")
        assert not (run_dir / "result.json").exists() and not (run_dir / "last.pt").exists()
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    _run(spec, tiny_data, run_dir)  # the lock ends with its process
    with run_lock(run_dir), run_lock(run_dir):  # re-entrant within one process
        pass
    assert (run_dir / "result.json").exists()


def test_outputs_and_best_checkpoint(tmp_path, tiny_data):
    spec = make_spec(train={**make_spec().train, "epochs": 3})
    result = _run(spec, tiny_data, tmp_path)
    hist = pd.read_csv(tmp_path / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2] and hist["updates"].iloc[-1] == 3 * 3  # 96 images / 32 per batch
    assert result["best"]["val_acc"] == hist["val_acc"].max()
    best_epoch = int(hist["val_acc"].idxmax())
    assert result["best"]["epoch"] == best_epoch
    assert hist["lr"].iloc[0] == pytest.approx(0.05) and hist["lr"].iloc[-1] < 0.05  # cosine decays
    with pytest.raises(IntegrityError, match="final.pt: checksum mismatch"):
        load_checkpoint(tmp_path / "final.pt", sha256="0" * 64)
    assert set(load_checkpoint(tmp_path / "final.pt", sha256=result["final_sha256"])) == set(
        conventional.METHOD.predictor(spec, 10).state_dict())

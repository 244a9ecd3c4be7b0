"""`l2l plan`: runs per experiment and per claim, done vs remaining, and an estimate that names
the measurement it comes from (and says so when no GPU was measured)."""
import json

import pytest
import yaml

from l2l.cli import _hours, main
from l2l.config import load_config, plan
from l2l.cost import EVAL_SPEEDUP, load_throughput, train_flops_per_image
from tests.conftest import REPO, smoke_params, write_npz
from tests.test_pipeline import CLAIMS, run_stage

CPU = {"stamp": {"device": "cpu", "device_name": "Test CPU", "date": "2026-11-22"}, "steps": 3,
       "models": {"cnn": {"cfg": {"arch": "cnn", "width": 4}, "engine_images_per_s": 0.01,
                          "engine_compiled_images_per_s": None, "train_gflop_per_image": 0.004}}}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    params = smoke_params(write_npz(tmp_path / "arrays.npz"))
    params["profiles"]["smoke"]["models"]["wide"] = {"arch": "cnn", "width": 8}
    params["profiles"]["smoke"]["experiments"]["conventional"]["models"] = ["cnn", "wide"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(CLAIMS))
    (tmp_path / "throughput.json").write_text(json.dumps({"measurements": {"Test CPU": CPU}}))
    monkeypatch.chdir(tmp_path)
    run_stage("data")
    return tmp_path


def _plan(capsys, *args) -> str:
    main(["plan", "--throughput", "throughput.json", *args])
    return capsys.readouterr().out


def test_counts_done_and_estimate_from_the_named_measurement(workspace, capsys):
    out = _plan(capsys)
    assert "4 runs, 0 done, 4 remaining." in out
    assert "Test CPU (cpu), measured 2026-11-22" in out and "No GPU measurement" in out and "CPU hours" in out
    # smoke split: train 200, val 50, test 100; 1 epoch; the measured cnn trains 0.01 images/s
    cnn = (200 + (50 + 2 * (50 + 100)) / EVAL_SPEEDUP) / 0.01 / 3600
    wide = cnn * train_flops_per_image({"arch": "cnn", "width": 8}) / 1e9 / 0.004  # the same FLOP/s
    assert (f"| cnn | cifar10 | 2 | 0 | 2 | 1 | {_hours(cnn)} | {_hours(2 * cnn)} | measured (cnn); "
            "step x1.00 of conventional |") in out
    assert (f"| wide | cifar10 | 2 | 0 | 2 | 1 | {_hours(wide)} | {_hours(2 * wide)} | FLOPs-scaled from cnn; "
            "step x1.00 of conventional |") in out

    fingerprint = json.loads((workspace / "data/prepared/cifar10/manifest.json").read_text())["fingerprint"]
    spec = plan(load_config(), {"cifar10": fingerprint})[0]
    (workspace / "runs" / spec.hash).mkdir(parents=True)
    (workspace / "runs" / spec.hash / "result.json").write_text("{}")  # a finished run
    out = _plan(capsys, "--runs")
    assert "4 runs, 1 done, 3 remaining." in out
    assert f"| {spec.hash} | conventional | conventional | cnn | cifar10 | 0 | done |" in out
    assert f"| **total** |  |  |  | 4 | 1 | 3 |  |  | {_hours(cnn + 2 * wide)} |" in out


def test_per_claim_rows(workspace, capsys):
    out = _plan(capsys)
    claims = out[out.index("## Per claim"):]
    assert "| PX-C1 | conventional/cnn | cifar10 | 2 | 0 | 2 |" in claims
    assert "| PX-C2 | conventional/cnn | cifar100 | 0 | 0 | 0 | not run: conventional/cnn not in profile smoke |" \
        in claims
    # power: PX-C1 alone in its family in smoke (PX-C2 not trained), 2 seeds, planning sd 0.6, TOST +-1.0
    from l2l.stats import seeds_for_power, tost_power

    power = out[out.index("## Power per claim"):]
    n80 = seeds_for_power(lambda n: tost_power(0.0, 1.0, 0.6, n, 0.05))
    assert f"| PX-C1 | PX (1) | reported_value | 2 | 1 | 0.60 | {100 * tost_power(0.0, 1.0, 0.6, 2, 0.05):.0f}% | " \
           f"{n80} |" in power and "PX-C2" not in power
    # the sequential design (smoke: looks at 2 and 3 seeds): per claim its power, seeds and hours at sd 0.2 /
    # 0.6 / 1.0 beside the fixed plan's, and per paper; 2 seeds test nothing (min_seeds 3), so it goes to 3
    seq = out[out.index("## The sequential design"):]
    assert "looks at 2, 3 seeds per arm (cap 3)" in seq
    row = next(line for line in seq.splitlines() if line.startswith("| PX-C1 | PX (1) | 2 |"))
    cells = row.split(" | ")
    assert cells[4] == "0% / 0% / 0%" and all(c.split(", ")[1] == "3.0" for c in cells[5:8]) and cells[8] == "3"
    assert "| PX | 1 |" in seq


def test_unknown_device_one_line_error(workspace, capsys):
    with pytest.raises(SystemExit) as e:
        _plan(capsys, "--device", "TPU v9")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("l2l: error: throughput.json: no measurement for device 'TPU v9' (measured: Test CPU); no data "
                   "sheet for it either (l2l/devices.py: H100 PCIe, H100 NVL, H100, H200, A100, L40S, L4)")


def test_paper_profile_from_the_committed_measurement(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the shipped params.yaml; run.yaml's profile and papers overridden
    n = len(plan(load_config(profile="paper", run=None)))
    # the throughput path (no per-run calibration, whatever machine this runs on)
    main(["plan", "--profile", "paper", "--papers", "all", "--timing", str(tmp_path / "none.json")])
    out = capsys.readouterr().out
    assert f"{n} runs," in out and "remaining hours" in out
    tp = load_throughput()
    assert tp is not None, "benchmarks/throughput.json: the benchmark's measurement is committed"
    assert tp.label in out
    assert ("No GPU measurement" in out) == (tp.device != "cuda")


def test_epochs_summed_over_the_methods_phases(monkeypatch):
    """A multi-phase method (one stretch per block, per generation) is priced by all its epochs,
    read by replaying its phase generator without training."""
    from types import SimpleNamespace

    from l2l import methods
    from l2l.cost import planned_epochs
    from l2l.engine import Phase
    from tests.conftest import make_spec

    def phases(spec, ctx):
        for j in range(3):
            yield Phase(f"block{j}", 2 + j, {}, {}, step=None, predictor=None)

    monkeypatch.setitem(methods.METHODS, "three_blocks", SimpleNamespace(phases=phases, stackable=lambda o: "no"))
    assert planned_epochs(make_spec(method="three_blocks")) == 2 + 3 + 4
    assert planned_epochs(make_spec()) == make_spec().train["epochs"]


def test_timing_fit_recovers_a_known_cost_model():
    """Runs priced 3 s + 0.5 s/epoch + 1 ms/image + 0.2 s/GFLOP are fitted back (non-negative terms)."""
    from l2l.timing import fit_timing

    feats = [(e, e * n, e * n * g) for e in (1, 2, 4) for n in (200, 2000) for g in (0.001, 0.05)]
    secs = [3 + 0.5 * e + 1e-3 * i + 0.2 * f for e, i, f in feats]
    t = fit_timing(feats, secs, "Test CPU", "synthetic")
    assert (t.run_s, t.epoch_s, t.image_s, t.gflop_s) == pytest.approx((3, 0.5, 1e-3, 0.2), rel=1e-6)
    assert t.seconds(3, 600, 1.5) == pytest.approx(3 + 1.5 + 0.6 + 0.3)


def test_calibrated_estimate_and_its_error_against_measured_runs(workspace, capsys):
    from l2l.cost import run_costs
    from l2l.timing import Timing, save_timing

    timing = Timing("Test CPU", 2.0, 0.5, 1e-3, 0.1, runs=30, source="test")
    save_timing(timing, workspace / "timing.json")
    out = _plan(capsys, "--timing", "timing.json", "--device", "Test")
    assert "calibrated per run (Test CPU)" in out and "No finished run in runs/ measured on that device" in out
    config = load_config()
    costs, _ = run_costs(config, None)
    cnn = next(c for c in costs if c.spec.model == "cnn")
    train_s = timing.seconds(*cnn.features)  # 1 epoch, 200 train + 50 val images
    assert cnn.features[:2] == (1.0, 200 + 50 / EVAL_SPEEDUP)
    assert f"the train stage's remaining runs {sum(timing.seconds(*c.features) for c in costs):,.0f} s" in out

    (workspace / "runs" / cnn.spec.hash).mkdir(parents=True)
    (workspace / "runs" / cnn.spec.hash / "result.json").write_text(json.dumps(
        {"run_seconds": 2 * train_s, "device_name": "Test CPU"}))
    out = _plan(capsys, "--timing", "timing.json", "--device", "Test")
    assert (f"Against the 1 finished runs in runs/ measured on it: predicted {train_s:,.0f} s, measured "
            f"{2 * train_s:,.0f} s (x0.50).") in out


def test_run_timing_benchmark_fits_the_measured_runs(workspace, capsys):
    """benchmarks/run_timing.py: held-out error (even seeds fit, odd predicted) and the fit written per device."""
    import importlib.util

    from l2l.cost import run_costs
    from l2l.timing import load_timing

    spec = importlib.util.spec_from_file_location("run_timing", REPO / "benchmarks/run_timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    costs, _ = run_costs(load_config(), None)
    for c in costs:  # measured: 4 s per run + 0.01 s per image
        (workspace / "runs" / c.spec.hash).mkdir(parents=True)
        (workspace / "runs" / c.spec.hash / "result.json").write_text(json.dumps(
            {"run_seconds": 4 + 0.01 * c.features[1], "device_name": "Test CPU"}))
    module.main(["--write", "timing.json"])
    out = capsys.readouterr().out
    assert "Test CPU: held out (fit on 2 even-seed runs, predicting 2 odd-seed runs)" in out
    t = load_timing("Test CPU", workspace / "timing.json")
    assert t.runs == 4 and t.seconds(*costs[0].features) == pytest.approx(4 + 0.01 * costs[0].features[1], rel=1e-3)


# --- GPU pricing: an unmeasured device's estimate, measured execution modes ------------------------

def test_an_unmeasured_gpu_is_an_estimate_with_its_assumptions(workspace, capsys):
    """`--device H100` (not measured, in l2l/devices.py): every figure marked an estimate, the assumptions
    printed, each run the longer of its FLOPs at the share of peak and its launches at the launch cost."""
    from l2l.cost import device_estimate, model_counts, phase_costs, run_costs

    out = _plan(capsys, "--device", "H100")
    assert "**H100 SXM: estimate, not measured**" in out and "estimate (H100 SXM, not measured), separate" in out
    assert "bf16 989.4 TFLOP/s" in out and "at 30% of that peak" in out and "launches x 6 us" in out
    assert "## What this profile needs" in out and "H100 SXM GPU-hours (estimate, not measured)" in out
    config = load_config()
    spec = next(c.spec for c in run_costs(config, None)[0] if c.spec.model == "cnn")
    n, b, eb = {"train": 200, "val": 50, "test": 100}, spec.train["batch_size"], spec.train["eval_batch_size"]
    flops, _, fwd_launches, _ = model_counts(spec.model_cfg, 10, b)
    (phase,) = phase_costs(spec)
    batches = 1 * 1 + 2 * (1 + 1)  # one epoch's validation batch, the evaluate stage's val and test of two checkpoints
    compute_only = device_estimate("H100", launch_us=0.0)
    peak = 0.30 * 989.4e12
    assert compute_only.run_seconds(spec, n) == pytest.approx(
        4 * phase.step_flops * b / peak + batches * flops / EVAL_SPEEDUP * eb / peak, rel=1e-9)  # 4 steps of 50
    launch_bound = device_estimate("H100", launch_us=1e4)
    assert launch_bound.run_seconds(spec, n) == pytest.approx(4 * phase.launches * 1e-2 + batches * fwd_launches * 1e-2)
    # a stack of 2 takes one stacked step (its own launches) for both: each run half of it
    assert launch_bound.run_seconds(spec, n, members=2) == pytest.approx(
        4 * phase.stacked_launches * 1e-2 * launch_bound.stacked_host / 2 + batches * fwd_launches * 1e-2)
    out = _plan(capsys, "--device", "H100", "--launch-us", "10000")
    assert "Stacked where the method allows" in out and "stacked_2" in out


def test_measured_modes_are_chosen_and_priced_per_family(workspace, capsys, monkeypatch):
    """A measurement with modes: each family runs (and is priced) in its fastest executable mode, separate where
    none was measured; the executor builds the same tasks."""
    from l2l.cost import run_costs
    from l2l.executor import Stack, execution

    gpu = {**CPU, "stamp": {"device": "cuda", "device_name": "Test GPU", "date": "2026-12-06"},
           "modes": {"cnn": {"separate": {"images_per_s": 100.0, "runs": 1},
                             "stacked_2": {"images_per_s": 300.0, "runs": 2},
                             "runs_per_gpu_2": {"images_per_s": 150.0, "runs": 2},
                             "stacked_2_cuda_graphs": {"images_per_s": 900.0, "runs": 2}}}}
    (workspace / "throughput.json").write_text(json.dumps({"measurements": {"Test GPU": gpu}}))
    out = _plan(capsys, "--device", "Test GPU")
    cnn = (200 + (50 + 2 * (50 + 100)) / EVAL_SPEEDUP) / 300.0 / 3600  # aggregate images/s of the stack
    assert f"| cnn | cifar10 | 2 | 0 | 2 | 1 | {_hours(cnn)} | {_hours(2 * cnn)} | measured stacked_2 (cnn);" in out
    assert "| wide | cifar10 | 2 | 0 | 2 | 1 |" in out and "FLOPs-scaled from cnn; step" in out  # nothing measured
    config = load_config()
    tp = load_throughput(workspace / "throughput.json", "Test GPU")
    assert {c.spec.model: c.mode for c in run_costs(config, tp)[0]} == {"cnn": "stacked_2", "wide": "separate"}
    tasks = dict(execution(plan(config), config, workspace, "Test GPU", "throughput.json"))
    assert [type(t) for t in tasks[1]] == [Stack, type(plan(config)[0]), type(plan(config)[0])]
    # a family whose fastest measured mode is several processes per GPU: its runs in flight two at a time
    gpu["modes"]["cnn"]["runs_per_gpu_2"]["images_per_s"] = 400.0
    (workspace / "throughput.json").write_text(json.dumps({"measurements": {"Test GPU": gpu}}))
    tasks = dict(execution(plan(config), config, workspace, "Test GPU", "throughput.json"))
    assert sorted(tasks) == [1, 2] and [s.model for s in tasks[2]] == ["cnn", "cnn"]


def test_step_counter_equals_the_flop_counter_and_stacked_launches_do_not_grow_with_the_stack():
    from l2l.cost import _count_stacked_step
    from l2l.engine import RunContext
    from l2l.methods import METHODS
    from l2l.profiling import StepCounter, flop_counter, _MEMO
    from l2l.stacking import MemberContext, Recorder, StackedPhase
    from tests.conftest import make_spec, random_arrays
    from l2l.device_data import DeviceData
    import torch

    spec = make_spec(model_cfg={"arch": "cifar_resnet", "depth": 20})
    data = DeviceData(random_arrays(), "cifar10", torch.device("cpu"), crop_padding=4, flip=True)
    rec = Recorder([spec])
    ctx = MemberContext(spec, data, 10, torch.device("meta"), runs=REPO, stack=rec, member=0)
    with torch.device("meta"):
        phase = next(METHODS["conventional"].phases(spec, ctx))
    x, y = torch.empty(32, 3, 32, 32, device="meta"), torch.zeros(32, dtype=torch.long, device="meta")
    _MEMO.clear()
    with StepCounter() as cold:
        phase.step(x, y)
    with StepCounter() as warm, flop_counter() as reference:
        phase.step(x, y)
    assert cold.flops == warm.flops == reference.get_total_flops() and cold.launches == warm.launches
    assert 160 < cold.launches < 200  # issue #21's torch.profiler count: 173 per ResNet-20 step (fused SGD: 1-2)
    counts = {}
    for k in (2, 8):
        stacked = StackedPhase([phase] * k, rec)
        with StepCounter() as c:
            stacked.step(torch.stack([x] * k), torch.stack([y] * k))
        counts[k] = c.launches
    assert counts[2] == counts[8] == _count_stacked_step(phase, rec, x, y, set()) < 1.5 * cold.launches


def test_disk_and_downloads_of_a_profile():
    from l2l.cost import disk_bytes, model_counts, run_costs

    config = load_config(REPO / "params.yaml", profile="smoke", run=None)
    costs, _ = run_costs(config, None)
    d = disk_bytes(costs)
    assert d["downloads"] == 170_498_071  # smoke: CIFAR-10 only
    assert d["prepared"] == 60_000 * 3 * 32 * 32
    c = costs[0]
    params = model_counts(c.spec.model_cfg, 10, c.spec.train["batch_size"])[3]
    assert params == sum(p.numel() for p in __import__("l2l.models", fromlist=["build_model"]).build_model(
        c.spec.model_cfg, 10).parameters())

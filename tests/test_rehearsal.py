"""The CUDA-faithful rehearsal (issue 21): every method and option variant trains on a CPU through
the engine's CUDA branches (bf16 autocast, channels_last data and models, fused SGD; TF32 flags
set), on real CIFAR-10 images and labels (the shared offline arrays, L2L_CIFAR10_NPZ), to an accuracy
a permutation test puts above chance, in a few steps; an interrupted and resumed run, and the same
seed twice, equal an uninterrupted run bit for bit under the same settings. Plus what the
rehearsal found: fused SGD's momentum mix (l2l incremental + mutual + keep), the fused flag of a
checkpoint loaded on another device, the per-device CUDA random state; executor.cuda_graphs'
capture-and-replay bookkeeping (l2l.graphs.Rehearsal) gives the eager numbers; train.tf32 is set
and recorded.

Sizes: 640 training images (10 batches of 64), 500 validation and 500 test images, 2 epochs per
phase, models 4-8 channels wide: the file runs in about a minute on 2 cores (README, Tests)."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from l2l import engine, optim
from l2l.datasets import MULTI_LABEL, VOC_ABSENT, VOC_DIFFICULT, VOC_PRESENT
from l2l.device_data import DeviceData
from l2l.engine import RunContext, load_checkpoint, train_run
from l2l.graphs import WARMUP, Rehearsal
from l2l.methods import METHODS
from l2l.report import tf32_note
from l2l.spec import RunSpec, resolve_train
from tests.conftest import real_cifar10

TRAIN = resolve_train({"epochs": 2, "batch_size": 32, "eval_batch_size": 250,
                       "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
                       "schedule": {"name": "cosine"}, "augment": {"crop_padding": 4, "flip": True}}, "rehearsal.train")
CNN = {"arch": "cnn", "width": 8}
RESNET = {"arch": "cifar_resnet", "depth": 8, "width": 8}
COMPRESS = {"arch": "layerwise_cnn", "preset": "compress", "M": 8, "M_tilde": 8, "final_M_tilde": 4,
            "downsample_at": [1]}
VOC = {"task": {"kind": MULTI_LABEL, "ap_mode": "area", "difficult": "ignore"}}
TEACHER = ("conventional", RESNET, {})  # the distill variants' teacher run (as p5_teacher)
LATENCY = {"latency_batches": [1, 8], "latency_warmup": 1, "latency_repeats": 3}
EPOCHS = {"layerwise": 1}  # epochs per phase (layerwise: 3 or 6 phases; 2 epochs elsewhere)
INCREMENTAL = {"reading": "incremental", "incremental_splits": [1, 2]}  # the split moves at epoch 1 of 2

# label -> (method, model, options, dataset, epochs trained before the interruption of the resume check:
# l2l's incremental split moves at its resumed epoch, layerwise resumes in its second phase, pruning
# at its first pruned phase, generations in generation 1, whose cached teacher is computed again)
VARIANTS = {
    "conventional": ("conventional", CNN, {}, "cifar10", 1),
    "conventional_probes": ("conventional", CNN, {"probe_epochs": 1, "probe_units": ["stage", "layer"]}, "cifar10", 1),
    "layerwise_stages_ensemble": ("layerwise", CNN, {"predict": "ensemble"}, "cifar10", 2),
    "layerwise_layers_probes": ("layerwise", RESNET, {"unit": "layer", "probe_epochs": 1}, "cifar10", 2),
    "layerwise_pruning": ("layerwise", COMPRESS, {"prune_to": 4, "prune_finetune_epochs": 1}, "cifar10", 1),
    "l2l_alternating": ("l2l", CNN, {"reading": "alternating"}, "cifar10", 1),
    "l2l_mutual_frozen_eval": ("l2l", CNN, {"reading": "mutual", "frozen_bn": "eval"}, "cifar10", 1),
    **{f"l2l_incremental_{step}_{state}": ("l2l", CNN, {**INCREMENTAL, "incremental_step": step,
                                                        "optimizer_state": state}, "cifar10", 1)
       for step in ("alternating", "mutual") for state in ("keep", "reset")},
    "generations_on_the_fly": ("generations", CNN, {"generations": 1}, "cifar10", 3),
    "generations_cached_teacher": ("generations", CNN, {"generations": 1, "teacher_on_the_fly": False}, "cifar10", 3),
    "distill": ("distill", CNN, LATENCY, "cifar10", 1),
    "voc_conventional": ("conventional", CNN, {}, "voc2007", 1),
    "voc_distill": ("distill", CNN, LATENCY, "voc2007", 1),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on shared cores: one intra-op thread (CPU results depend on the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def voc_labels(y: np.ndarray) -> np.ndarray:
    """20 multi-label columns (VOC's layout) from CIFAR-10's real classes: the class itself (0-9), its pair
    (10-14: airplane/automobile, bird/cat, ...), vehicle (15; difficult-only for automobiles, which the
    loss and mAP ignore), animal, mammal, flying, water."""
    groups = [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7], [3, 4, 5, 7], [0, 2], [6, 8]]
    out = np.full((len(y), 20), VOC_ABSENT, dtype=np.int64)
    out[np.arange(len(y)), y] = VOC_PRESENT
    out[np.arange(len(y)), 10 + y // 2] = VOC_PRESENT
    for j, g in enumerate(groups):
        out[np.isin(y, g), 15 + j] = VOC_PRESENT
    out[y == 1, 15] = VOC_DIFFICULT
    return out


@functools.lru_cache(maxsize=None)
def arrays(dataset: str) -> dict:
    real = real_cifar10()
    if dataset == "voc2007":
        return {k: (x, voc_labels(y)) for k, (x, y) in real.items()}
    return real


def device_data(dataset: str) -> DeviceData:
    """channels_last on the CPU, as the train stage prepares data for a CUDA device."""
    return DeviceData(arrays(dataset), dataset, torch.device("cpu"), crop_padding=4, flip=True, channels_last=True)


def spec_of(label: str, seed: int = 0, **train) -> RunSpec:
    if label in VARIANTS:
        method, cfg, options, dataset, _ = VARIANTS[label]
    else:  # teacher_<dataset>
        (method, cfg, options), dataset = TEACHER, label.removeprefix("teacher_")
    opts = METHODS[method].validate_options(options, f"rehearsal.{label}")
    data = {"fingerprint": f"rehearsal-{dataset}", **(VOC if dataset == "voc2007" else {})}
    spec = RunSpec(label, method, cfg["arch"], dataset, seed, cfg,
                   {**TRAIN, "epochs": EPOCHS.get(method, TRAIN["epochs"]), **train}, opts, data)
    if method == "distill":
        teacher = spec_of(f"teacher_{dataset}", seed)
        spec = dataclasses.replace(spec, options={**opts, "teacher_run": {"hash": teacher.hash,
                                                                          "model_cfg": teacher.model_cfg}})
    return spec


def context(spec: RunSpec, runs: Path, **kw) -> RunContext:
    ctx = RunContext(spec, device_data(spec.dataset), 20 if spec.dataset == "voc2007" else 10, torch.device("cpu"),
                     runs=runs, cuda_branches=True, **kw)
    assert ctx.amp and ctx.channels_last and ctx.fused  # the CUDA branches, on a CPU
    return ctx


def train(spec: RunSpec, runs: Path, name: str, **kw) -> dict:
    ctx_kw = {k: kw.pop(k) for k in ("cuda_graphs", "graph_backend") if k in kw}
    if spec.method == "distill":  # its teacher run first, as the train stage's waves do
        teacher = spec_of(f"teacher_{spec.dataset}", spec.seed)
        if not (runs / teacher.hash / "result.json").exists():
            train_run(teacher, METHODS["conventional"], context(teacher, runs), runs / teacher.hash)
    return train_run(spec, METHODS[spec.method], context(spec, runs, **ctx_kw), runs / name, **kw)


def same_run(a: Path, b: Path) -> None:
    """Bit-identical weights and history (timings aside)."""
    wa, wb = load_checkpoint(a / "final.pt"), load_checkpoint(b / "final.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), \
        [k for k in wa if not torch.equal(wa[k], wb[k])][:5]
    timing = ["epoch_seconds", "images_per_s"]
    pd.testing.assert_frame_equal(pd.read_csv(a / "history.csv").drop(columns=timing),
                                  pd.read_csv(b / "history.csv").drop(columns=timing))


def above_chance(spec: RunSpec, runs: Path, name: str, result: dict, permutations: int = 199) -> float:
    """p-value of the run's validation metric against images shuffled relative to their labels (the exact
    null of a predictor that ignores the image); checks the metric is the one result.json recorded."""
    ctx = context(spec, runs)
    model = ctx.prepare(METHODS[spec.method].predictor(spec, ctx.num_classes))
    model.load_state_dict(load_checkpoint(runs / name / "final.pt"))
    logits, y = ctx.split_logits(model, "val"), ctx.data.y["val"]
    score = ctx.task.score(logits, y)
    assert score == pytest.approx(result["final"]["val_acc"], abs=1e-9)
    g = torch.Generator().manual_seed(0)
    null = [ctx.task.score(logits, y[torch.randperm(len(y), generator=g)]) for _ in range(permutations)]
    return (1 + sum(n >= score for n in null)) / (permutations + 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("label", list(VARIANTS))
def test_every_variant_trains_above_chance_through_the_cuda_branches_and_resumes_exactly(label, runs):
    spec = spec_of(label)
    whole = train(spec, runs, f"{label}-whole")
    assert whole["cuda_branches"] and whole["tf32"] is False
    p = above_chance(spec, runs, f"{label}-whole", whole)
    assert p <= 0.01, f"{label}: val {whole['final']['val_acc']:.1f} is not above chance (permutation p = {p:.3f})"
    print(f"{label}: val {whole['final']['val_acc']:.1f} ({whole['epochs']} epochs, {whole['run_seconds']:.1f} s)")
    cut = VARIANTS[label][-1]
    assert train(spec, runs, f"{label}-cut", stop_after_epochs=cut) == {"interrupted": True}
    resumed = train(spec, runs, f"{label}-cut")
    assert resumed["final"] == whole["final"] and resumed["phase_metrics"].keys() == whole["phase_metrics"].keys()
    same_run(runs / f"{label}-whole", runs / f"{label}-cut")


@pytest.mark.parametrize("label", ["conventional", "layerwise_pruning", "l2l_incremental_mutual_keep",
                                   "generations_cached_teacher", "voc_distill"])
def test_the_same_seed_twice_gives_the_same_numbers_through_the_cuda_branches(label, runs):
    spec = spec_of(label)
    for name in (f"{label}-whole", f"{label}-seed"):  # (the first as the variant's test left it, or trained here)
        train(spec, runs, name)
    same_run(runs / f"{label}-whole", runs / f"{label}-seed")


# --- what the rehearsal found -----------------------------------------------------------------

def test_fused_sgd_fails_on_a_momentum_mix_that_l2l_incremental_mutual_keep_reaches(runs, monkeypatch):
    """Without the zero buffers, the first split move (a new student head, no momentum yet, beside the
    blocks' momentum) is the crash of CUDA's fused kernel, reproduced by the CPU's."""
    monkeypatch.setattr(optim, "fill_momentum", lambda opt, args=(), kwargs=None: None)
    with pytest.raises(TypeError, match="expected Tensor"):
        train(spec_of("l2l_incremental_mutual_keep"), runs, "mix-unrepaired")


def test_a_zero_momentum_buffer_is_exactly_sgds_first_step():
    """The fused kernel's own first step (every buffer new) against a zero buffer among existing ones."""
    torch.manual_seed(0)
    a0, b0, ga, gb = (torch.randn(50) for _ in range(4))

    def step(parts: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
        opt = optim.sgd([a, b], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False, fused=True)
        if parts == "b then both":  # b moves first (fused first step), then both: a's first step beside b's momentum
            b.grad = gb.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        return a.detach(), opt.state[a]["momentum_buffer"]

    first_alone = step("both new")  # a's first step through the kernel's is_first_step
    beside = step("b then both")  # a's first step from a zero buffer
    assert torch.equal(first_alone[0], beside[0]) and torch.equal(first_alone[1], beside[1])


def test_zero_buffers_refuse_dampening():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p, q], lr=0.1, momentum=0.9, dampening=0.5)
    opt.state[p]["momentum_buffer"] = torch.zeros(2)
    p.grad = q.grad = torch.ones(2)
    with pytest.raises(ValueError, match="dampening"):
        optim.fill_momentum(opt)


def test_a_checkpoint_keeps_this_devices_optimizer_implementation(runs, monkeypatch):
    """A state saved by a fused (CUDA) run, resumed where the engine does not fuse (a CPU), steps unfused, and
    the reverse; momentum and learning rate come from the checkpoint."""
    spec = spec_of("conventional")
    assert train(spec, runs, "cross-device", stop_after_epochs=1) == {"interrupted": True}
    fused_seen = []
    step = torch.optim.SGD.step

    def spy(self, *a, **k):
        fused_seen.append(self.param_groups[0]["fused"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    data = DeviceData(arrays("cifar10"), "cifar10", torch.device("cpu"), crop_padding=4, flip=True)
    ctx = RunContext(spec, data, 10, torch.device("cpu"), runs=runs)  # the CPU's own path: not fused
    train_run(spec, METHODS["conventional"], ctx, runs / "cross-device")
    assert fused_seen and not any(fused_seen)

    saved = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.3, momentum=0.9)
    saved.param_groups[0]["params"][0].grad = torch.ones(3)
    saved.step()
    target = optim.sgd([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False,
                       fused=True)
    optim.load_state(target, saved.state_dict())
    group = target.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None and group["lr"] == 0.3
    assert torch.equal(target.state[group["params"][0]]["momentum_buffer"], torch.ones(3))


def test_only_the_runs_own_cuda_random_state_is_saved_and_restored(monkeypatch):
    """A state per visible GPU failed to restore where fewer are visible; the run's device's alone restores
    anywhere, and a CPU run neither saves nor restores one."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", str(device))) or
                        torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", str(device))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every device's state read"))
    gpu = torch.device("cuda", 0)
    state = engine._rng_state(gpu)
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8)) and calls == [("get", "cuda:0")]
    engine._set_rng_state(state, gpu)
    assert calls[-1] == ("set", "cuda:0")
    cpu = engine._rng_state(torch.device("cpu"))
    assert set(cpu) == {"torch"}
    engine._set_rng_state({**cpu, "cuda": [torch.zeros(1)] * 4}, gpu)  # an older per-GPU list: not restored
    engine._set_rng_state(state, torch.device("cpu"))  # a CUDA state resumed on a CPU: nothing to restore
    assert len(calls) == 2


# --- CUDA graphs: the replay bookkeeping, on a CPU -----------------------------------------------

@pytest.mark.parametrize("label", ["conventional", "l2l_incremental_mutual_keep", "generations_cached_teacher",
                                   "voc_conventional"])
def test_graph_replays_give_the_eager_numbers(label, runs):
    """l2l.graphs.Rehearsal replays a captured step by running it again on the static buffers and writes
    its outputs over the first replay's (as a graph does): the whole run equals the eager one bit for bit,
    so the buffers, the outputs read before the next step and the eager odd batches are right. A cached
    teacher's phase (its step reads by a host-side position) runs eagerly and is named."""
    spec = spec_of(label)
    eager = train(spec, runs, f"{label}-whole")
    graphed = train(spec, runs, f"{label}-graphed", cuda_graphs=True, graph_backend=Rehearsal())
    same_run(runs / f"{label}-whole", runs / f"{label}-graphed")
    g = graphed["cuda_graphs"]
    assert g["used"] and g["fallback"] is None and graphed["tags"]["executor.cuda_graphs"] == "on"
    assert eager["cuda_graphs"] is None and eager["tags"]["executor.cuda_graphs"] == "off"
    phases = pd.read_csv(runs / f"{label}-whole/history.csv")["phase"].unique()
    graphed_epochs = (len(phases) - len(g["eager_phases"])) * spec.train["epochs"]
    full_batches = len(arrays(spec.dataset)["train"][1]) // spec.train["batch_size"]
    assert g["captures"] == graphed_epochs and g["replayed_steps"] == graphed_epochs * (full_batches - WARMUP)
    assert g["eager_phases"] == (["gen1"] if label == "generations_cached_teacher" else [])


def test_cuda_graphs_fall_back_to_eager_on_a_cpu(runs):
    spec = spec_of("conventional")
    r = train(spec, runs, "graphs-fallback", cuda_graphs=True)
    assert r["cuda_graphs"]["used"] is False and "CUDA graphs need CUDA" in r["cuda_graphs"]["fallback"]
    assert r["tags"]["executor.cuda_graphs"] == "eager fallback"
    train(spec, runs, "conventional-whole")
    same_run(runs / "conventional-whole", runs / "graphs-fallback")


# --- TF32 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_sets_torchs_flags_and_is_recorded(tf32, runs):
    spec = spec_of("conventional", tf32=tf32)
    r = train(spec, runs, f"tf32-{tf32}")
    expected = "tf32" if tf32 else "ieee"
    assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")  # readable: Inductor reads it
    assert r["tf32"] is tf32 and r["fp32_precision"] == {"matmul": expected, "conv": expected}
    assert r["tags"]["train.tf32"] == str(tf32).lower() and r["spec"]["train"]["tf32"] is tf32
    RunContext(spec_of("conventional"), device_data("cifar10"), 10, torch.device("cpu"))  # the next run's own choice
    assert torch.backends.cudnn.allow_tf32 is False


def test_the_reports_stamp_says_what_fp32_ran_in():
    cpu = pd.DataFrame({"device": ["cpu"], "tf32": [False]})
    assert tf32_note(cpu).startswith("not used")
    cuda = pd.DataFrame({"device": ["cuda", "cuda", "cpu"], "tf32": [True, False, False]})
    assert tf32_note(cuda).startswith("on in 1 of 2 CUDA runs")
    assert tf32_note(cuda.assign(tf32=False)).startswith("off in all 2 CUDA runs")
    assert tf32_note(cuda.drop(columns="tf32")).startswith("unknown")


class FailingCapture(Rehearsal):
    """A capture that fails as CUDA's does on an operation it cannot record (nothing executed)."""

    def capture(self, fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def test_a_failed_capture_is_logged_and_its_phase_runs_eagerly(runs, caplog):
    spec = spec_of("l2l_incremental_mutual_keep")
    train(spec, runs, "l2l_incremental_mutual_keep-whole")
    with caplog.at_level("ERROR", logger="l2l.graphs"):
        r = train(spec, runs, "graphs-failed", cuda_graphs=True, graph_backend=FailingCapture())
    same_run(runs / "l2l_incremental_mutual_keep-whole", runs / "graphs-failed")
    g = r["cuda_graphs"]
    assert not g["used"] and g["captures"] == 0 and list(g["failed_phases"]) == ["incremental"]
    assert "stream is capturing" in g["failed_phases"]["incremental"]
    assert [m for m in caplog.messages if "could not be captured" in m and spec.label in m]
    assert r["tags"]["executor.cuda_graphs"] == "eager fallback"


def test_no_epoch_copies_validation_predictions_to_the_host(runs, monkeypatch):
    """Each epoch's validation gives loss and metric; per-example predictions (a device-to-host copy) only
    where something reads them (the evaluate stage)."""
    calls = []
    task = type(context(spec_of("conventional"), runs).task)
    predictions = task.predictions
    monkeypatch.setattr(task, "predictions",
                        lambda self, logits: calls.append(len(logits)) or predictions(self, logits))
    train(spec_of("conventional"), runs, "no-host-copies")
    assert calls == []
    ctx = context(spec_of("conventional"), runs)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    assert "pred" not in ctx.evaluate(linear, "val", predictions=False) and "pred" in ctx.evaluate(linear, "val")

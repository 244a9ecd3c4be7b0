"""Teacher-student training (P4 generations, P5 distillation): the losses against their
definitions and hand-computed values, FLOP/parameter counts against hand counts, and what the
methods promise (the teacher is exactly the previous generation's checkpoint, frozen; a
resumed run equals an uninterrupted one; a distilled student is taught by exactly its teacher
run's verified final.pt, frozen)."""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from l2l.spec import resolve_train
from l2l.checks import ConfigError
from l2l.spec import RunSpec
from l2l.device_data import DeviceData
from l2l.engine import RunContext, load_checkpoint, train_run
from l2l.losses import (confidence_penalty_ce, entropy, kd_loss, kd_objective, label_smoothing_ce,
                        multilabel_kd_loss, tsd)
from l2l.methods import conventional, distill, generations, teaching
from l2l.methods.teaching import profile
from l2l.models import cifar_resnet
from l2l.profiling import _graph_autocast, _graph_pass, flops, latencies, latency, latency_mode
from l2l.pruning import count_parameters

TINY = {"arch": "cifar_resnet", "depth": 8, "width": 4}
TRAIN = resolve_train({"epochs": 1, "batch_size": 32, "eval_batch_size": 100,
         "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
         "schedule": {"name": "cosine"}, "augment": {"crop_padding": 2, "flip": True}}, "test.train")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on shared cores: one intra-op thread is several times faster than oversubscribing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def logits_of(*probs) -> torch.Tensor:
    """Logits whose softmax is exactly the given probability rows."""
    return torch.tensor(probs, dtype=torch.float64).log()


# ---------------------------------------------------------------- losses

def test_tsd_hand_computed():
    a = logits_of([0.5, 0.2, 0.15, 0.1, 0.05])
    b = logits_of([0.1, 0.6, 0.3, 0.0 + 1e-300, 1e-300])  # unsorted: the top score is class 1
    assert tsd(a, 3, "K-1").item() == pytest.approx(0.5 - (0.2 + 0.15) / 2)
    assert tsd(a, 3, "K").item() == pytest.approx(0.5 - (0.2 + 0.15) / 3)
    assert tsd(a, 5, "K-1").item() == pytest.approx(0.5 - 0.5 / 4)
    assert tsd(b, 2, "K-1").item() == pytest.approx(0.6 - 0.3)
    assert tsd(torch.cat([a, b]), 2, "K-1").item() == pytest.approx(((0.5 - 0.2) + (0.6 - 0.3)) / 2)
    with pytest.raises(ValueError, match="norm"):
        tsd(a, 3, "k-1")


def test_tsd_primary_class_and_input_readings():
    """argmax vs label as the primary class differ exactly where the label is not ranked first; the
    logits reading compares raw scores."""
    z = logits_of([0.5, 0.2, 0.15, 0.1, 0.05]).float()
    right, wrong = torch.tensor([0]), torch.tensor([2])
    assert tsd(z, 3, primary="label", y=right).item() == pytest.approx(tsd(z, 3).item())  # label ranked first
    assert tsd(z, 3).item() == pytest.approx(0.5 - (0.2 + 0.15) / 2)
    # the label (class 2) is primary; the secondary classes are the 2 highest others (0.5, 0.2)
    assert tsd(z, 3, primary="label", y=wrong).item() == pytest.approx(0.15 - (0.5 + 0.2) / 2)
    raw = torch.tensor([[4.0, 1.0, 3.0, -2.0]])
    assert tsd(raw, 3, scores="logits").item() == pytest.approx(4.0 - (3.0 + 1.0) / 2)
    assert tsd(raw, 2, "K", primary="label", y=torch.tensor([1]), scores="logits").item() == pytest.approx(1.0 - 4.0 / 2)
    with pytest.raises(ValueError, match="labels"):
        tsd(z, 3, primary="label")
    with pytest.raises(ValueError, match="primary"):
        tsd(z, 3, primary="truth")
    # on a misranked example the readings pull the wrong top class in opposite directions: argmax TSD's
    # descent lowers it (it is the primary), label TSD's raises it (it is a secondary class)
    grads = {}
    for name, kw in (("argmax", {}), ("label", {"primary": "label", "y": wrong})):
        w = z.clone().requires_grad_(True)
        tsd(w, 3, **kw).backward()
        grads[name] = w.grad[0]
    assert grads["argmax"][0] > 0 > grads["label"][0]


def test_minimising_tsd_lowers_the_top_probability():
    z = torch.tensor([[3.0, 1.0, 0.5, 0.0, -1.0, -2.0]], requires_grad=True)
    p0 = z.softmax(1).detach()
    tsd(z, 3).backward()
    p1 = (z - 0.5 * z.grad).softmax(1).detach()  # one gradient-descent step
    assert p1[0, 0] < p0[0, 0]  # the top score falls
    assert p1[0, 1:3].sum() > p0[0, 1:3].sum()  # the K-1 runners-up rise


def test_tolerant_teacher_equilibrium():
    """CE + eta * TSD holds the label's probability at (K-1) / (eta K) (the docstring's claim)."""
    z = torch.tensor([[2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3]], requires_grad=True)
    opt = torch.optim.SGD([z], lr=2.0)
    for _ in range(1000):
        loss = F.cross_entropy(z, torch.tensor([0])) + 1.5 * tsd(z, 5, "K-1")
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = z.softmax(1)[0].detach()
    assert p[0].item() == pytest.approx(4 / (1.5 * 5), abs=0.01)
    assert p[0] == p.max()  # still ranks the label first


def test_label_smoothing_definition():
    z = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 6])
    logp = z.log_softmax(1)
    eps = 0.2
    target = torch.full((6, 7), eps / 7).scatter(1, y[:, None], 1 - eps + eps / 7)
    assert label_smoothing_ce(z, y, eps).item() == pytest.approx(-(target * logp).sum(1).mean().item(), rel=1e-6)
    assert label_smoothing_ce(z, y, 0.0).item() == pytest.approx(F.cross_entropy(z, y).item())


def test_confidence_penalty_definition():
    z = logits_of([0.5, 0.25, 0.25], [0.8, 0.1, 0.1]).float()
    y = torch.tensor([0, 1])
    ce = (-math.log(0.5) - math.log(0.1)) / 2
    h = (-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) - (0.8 * math.log(0.8) + 2 * 0.1 * math.log(0.1))) / 2
    assert entropy(z).mean().item() == pytest.approx(h, rel=1e-6)
    assert confidence_penalty_ce(z, y, 0.3).item() == pytest.approx(ce - 0.3 * h, rel=1e-6)


def test_kd_loss_is_the_kl_formula():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for temp in (1.0, 4.0):
        q, p = (t / temp).softmax(1).numpy(), (s / temp).softmax(1).numpy()
        expected = temp ** 2 * (q * np.log(q / p)).sum(1).mean()
        assert kd_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    ce = F.cross_entropy(s, torch.tensor([0, 1, 2, 3, 0]))
    assert kd_objective(s, t, ce, 4.0, 0.9).item() == pytest.approx(0.1 * ce.item() + 0.9 * kd_loss(s, t, 4.0).item())


def test_multilabel_kd_is_the_binary_kl():
    g = torch.Generator().manual_seed(2)
    s, t = 5 * torch.randn(3, 20, generator=g), 5 * torch.randn(3, 20, generator=g)
    temp = 2.0
    q, p = torch.sigmoid(t / temp).double(), torch.sigmoid(s / temp).double()
    kl = q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()
    assert multilabel_kd_loss(s, t, temp).item() == pytest.approx(temp ** 2 * kl.sum(1).mean().item(), rel=1e-4)
    assert multilabel_kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-5)
    assert multilabel_kd_loss(s, t, temp) > 0


# ---------------------------------------------------------------- counting and timing

def test_flops_and_params_of_a_known_small_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    # conv: 4 out x 3 in x 3 x 3 taps x 8 x 8 positions multiply-adds; linear: 4 x 10; 2 FLOPs each
    assert flops(model, (3, 8, 8)) == 2 * (4 * 3 * 9 * 64 + 4 * 10)
    assert count_parameters(model) == 4 * 3 * 9 + 2 * 4 + 4 * 10 + 10


def test_flops_of_a_cifar_resnet_hand_count():
    w, n, k = 4, 1, 10  # depth 8: one BasicBlock per stage, 16x16 input
    model = cifar_resnet(k, depth=8, width=w)
    macs = 3 * w * 9 * 16 * 16  # stem
    macs += 2 * (w * w * 9 * 16 * 16)  # stage 1 block (no projection)
    macs += (w * 2 * w * 9 + 2 * w * 2 * w * 9 + w * 2 * w) * 8 * 8  # stage 2: two convs + 1x1 projection, 8x8
    macs += (2 * w * 4 * w * 9 + 4 * w * 4 * w * 9 + 2 * w * 4 * w) * 4 * 4  # stage 3 at 4x4
    macs += 4 * w * k
    assert flops(model, (3, 16, 16)) == 2 * macs
    convs = 3 * w * 9 + 2 * w * w * 9 + (w * 2 * w * 9 + 4 * w * w * 9 + 2 * w * w) \
        + (8 * w * w * 9 + 16 * w * w * 9 + 8 * w * w)
    bns = 2 * (w + 2 * w + 3 * 2 * w + 3 * 4 * w)  # stem, 2 per block, 1 per projection
    assert count_parameters(model) == convs + bns + 4 * w * k + k


class Sleeper(nn.Module):
    """A model whose forward pass takes at least `ms` milliseconds and logs its calls."""

    def __init__(self, ms: float, log: list):
        super().__init__()
        self.ms, self.log, self.p = ms, log, nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.log.append((self.ms, self.training, torch.is_inference_mode_enabled()))
        time.sleep(self.ms / 1e3)
        return x


def test_latencies_time_each_model_in_turn():
    calls = []
    models = {"slow": Sleeper(6.0, calls).eval(), "fast": Sleeper(1.0, calls).train()}
    t = latencies(models, 2, (3, 4, 4), warmup=2, repeats=5)
    assert [c[0] for c in calls] == [6.0, 1.0] * 7  # interleaved: warm-up and timed passes alike
    assert all(not training and inference for _, training, inference in calls)
    assert t["slow"]["median_ms"] >= 6.0 and t["fast"]["median_ms"] >= 1.0
    assert t["slow"]["median_ms"] > t["fast"]["median_ms"] and t["slow"]["iqr_ms"] >= 0
    assert models["fast"].training and not models["slow"].training  # modes restored
    one = latency(cifar_resnet(10, depth=8, width=4), 4, (3, 16, 16), warmup=1, repeats=3)
    assert one["median_ms"] > 0
    with pytest.raises(ValueError, match="repeats"):
        latency(models["fast"], 1, (3, 4, 4), repeats=0)


# ---------------------------------------------------------------- methods

def small_data(n: int = 96, k: int = 10, size: int = 16) -> DeviceData:
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (m, 3, size, size), dtype=np.uint8), np.arange(m) % k)
              for s, m in (("train", n), ("val", 40), ("test", 50))}
    return DeviceData(arrays, "cifar10", torch.device("cpu"), crop_padding=2, flip=True)


def make(method, options: dict, model_cfg: dict = TINY, seed: int = 0, data: DeviceData | None = None,
         train: dict = TRAIN) -> tuple[RunSpec, RunContext]:
    opts = method.validate_options(options, "test")
    spec = RunSpec("e", method.__name__.rsplit(".", 1)[-1], "m", "cifar10", seed, model_cfg, train, opts, {})
    return spec, RunContext(spec, data or small_data(), 10, torch.device("cpu"))


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Spy:
    """Wraps a method: records each phase and each finished phase's module states, and checks
    the modes of the modules at every step."""

    def __init__(self, method, frozen_keys=lambda phase: []):
        self.method, self.frozen_keys = method.METHOD, frozen_keys
        self.OPTIONS, self.validate_options, self.predictor = (self.method.OPTIONS, self.method.validate_options,
                                                              self.method.predictor)
        self.phases_seen, self.finished, self.step_modes = [], [], []

    def phases(self, spec, ctx):
        for phase in self.method.phases(spec, ctx):
            self.phases_seen.append(phase)
            inner, keys = phase.step, self.frozen_keys(phase)

            def step(x, y, phase=phase, inner=inner, keys=keys):
                self.step_modes.append([phase.modules[k].training for k in keys])
                return inner(x, y)
            phase.step = step
            yield phase
            self.finished.append({k: state(m) for k, m in phase.modules.items()})


def test_generation_teacher_is_the_previous_checkpoint_frozen(tmp_path):
    spec, ctx = make(generations, {"generations": 2, "teacher_loss": "tolerant"})
    spy = Spy(generations, lambda phase: [k for k in phase.modules if k != "model"])
    result = train_run(spec, spy, ctx, tmp_path / "run")
    p = spy.phases_seen
    assert [ph.name for ph in p] == ["gen0", "gen1", "gen2"]
    assert list(p[2].modules) == ["gen0", "gen1", "model"]
    for g in (1, 2):
        teacher = p[g].modules[f"gen{g - 1}"]
        assert teacher is p[g - 1].modules["model"]  # generation g-1's network, not a copy
        assert not teacher.training and not any(q.requires_grad for q in teacher.parameters())
        # its weights AND BatchNorm statistics are those generation g-1 ended with, before and after teaching
        assert_same_state(spy.finished[g - 1]["model"], spy.finished[g][f"gen{g - 1}"])
    assert spy.step_modes and all(m == [False] * len(m) for m in spy.step_modes)  # frozen ones in eval at every step
    assert_same_state(spy.finished[0]["model"], spy.finished[2]["gen0"])
    metrics = result["phase_metrics"]
    assert list(metrics) == ["gen0", "gen1", "gen2"]
    # what the method declares a claim may name (l2l.claims checks claims against it at plan time)
    declared = generations.phase_metrics(spec.options, spec.model_cfg)
    assert {g: set(m) for g, m in metrics.items()} == {g: set(v) for g, v in declared.items()}
    for g, m in enumerate(metrics.values()):
        assert {"final_val_acc", "final_test_acc", "confidence", "entropy", "ensemble_final_test_acc", "params",
                "flops"} <= set(m)
        assert 0 < m["confidence"] <= 1 and 0 <= m["entropy"] <= math.log(10)
    assert metrics["gen0"]["ensemble_final_test_acc"] == metrics["gen0"]["final_test_acc"]
    # the ensemble of generations 0..2: mean softmax of the three finished networks, recomputed here
    nets = [cifar_resnet(10, depth=8, width=4) for _ in range(3)]
    for net, st in zip(nets, (spy.finished[2]["gen0"], spy.finished[2]["gen1"], spy.finished[2]["model"])):
        net.load_state_dict(st)
        net.eval()
    x = ctx.data.normalise(ctx.data.x["test"])
    with torch.no_grad():
        probs = sum(net(x).softmax(1) for net in nets)
    expected = 100.0 * (probs.argmax(1) == ctx.data.y["test"]).float().mean().item()
    assert metrics["gen2"]["ensemble_final_test_acc"] == pytest.approx(expected)
    # the run's final model is the last generation
    final = load_checkpoint(tmp_path / "run" / "final.pt")
    assert_same_state(final, spy.finished[2]["model"])


def test_generation_teacher_loss_is_the_chosen_one():
    o = generations.validate_options({"teacher_loss": "tolerant", "eta": 0.7, "tsd_k": 3}, "x")
    z, y = torch.randn(4, 10, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 3])
    # the AAAI text's form: eta * CE + (1 - eta) * TSD of the softmax output, top-scored class first
    assert generations.teacher_loss(o)(z, y).item() == pytest.approx(
        (0.7 * F.cross_entropy(z, y) + 0.3 * tsd(z, 3)).item())
    o = generations.validate_options({"teacher_loss": "tolerant", "tsd_primary": "label", "tsd_input": "logits"}, "x")
    assert generations.teacher_loss(o)(z, y).item() == pytest.approx(
        (0.5 * F.cross_entropy(z, y) + 0.5 * tsd(z, 5, primary="label", y=y, scores="logits")).item())
    o = generations.validate_options({"teacher_loss": "confidence_penalty", "beta": 0.2}, "x")
    assert generations.teacher_loss(o)(z, y).item() == pytest.approx(confidence_penalty_ce(z, y, 0.2).item())
    o = generations.validate_options({"teacher_loss": "label_smoothing", "epsilon": 0.3}, "x")
    assert generations.teacher_loss(o)(z, y).item() == pytest.approx(label_smoothing_ce(z, y, 0.3).item())
    o = generations.validate_options({"teacher_loss": "strict"}, "x")
    assert generations.teacher_loss(o)(z, y).item() == pytest.approx(F.cross_entropy(z, y).item())


def test_generations_resume_equals_uninterrupted(tmp_path):
    spec, ctx = make(generations, {"generations": 2}, train={**TRAIN, "epochs": 2})
    full = train_run(spec, generations, ctx, tmp_path / "full")
    spec, ctx = make(generations, {"generations": 2}, train={**TRAIN, "epochs": 2})
    assert train_run(spec, generations, ctx, tmp_path / "cut", stop_after_epochs=3) == {"interrupted": True}
    resumed = train_run(spec, generations, ctx, tmp_path / "cut")  # resumes inside gen1: its teacher from last.pt
    assert_same_state(load_checkpoint(tmp_path / "full" / "final.pt"), load_checkpoint(tmp_path / "cut" / "final.pt"))
    assert resumed["phase_metrics"] == full["phase_metrics"]


def test_cached_teacher_serves_the_images_of_each_batch():
    data = small_data()
    spec, ctx = make(generations, {"generations": 1, "teacher_on_the_fly": False}, data=data)
    phases = generations.phases(spec, ctx)
    next(phases)
    gen1 = next(phases)
    teacher_fn = gen1.on_epoch_start.__self__  # the CachedTeacher the step reads from
    assert isinstance(teacher_fn, generations.CachedTeacher)
    gen1.on_epoch_start(0)
    teacher = gen1.modules["gen0"]
    order = data.epoch_plan(spec.seed, 1, 0)[0]
    seen = 0
    for x, y in data.train_batches(spec.seed, 1, 0, 32):
        idx = order[seen:seen + len(y)]
        with torch.no_grad():
            expected = teacher(data.normalise(data.x["train"][idx]))  # un-augmented images, in the batch's order
        torch.testing.assert_close(teacher_fn(x, y), expected)
        seen += len(y)
    gen1.on_epoch_start(1)
    with pytest.raises(RuntimeError, match="epoch_plan"):
        teacher_fn(torch.zeros(32, 3, 16, 16), torch.full((32,), -1))  # a stream that is not the plan's


TEACHER = {"arch": "cifar_resnet", "depth": 14, "width": 4}
LATENCY = {"latency_batches": [1, 8], "latency_warmup": 1, "latency_repeats": 3}


def teacher_run(runs, seed: int = 0, model_cfg: dict = TEACHER) -> tuple[RunSpec, dict]:
    """A finished conventional run of the teacher's model in runs/<hash>/ (what the train stage leaves)."""
    spec, ctx = make(conventional, {}, model_cfg=model_cfg, seed=seed)
    spec = RunSpec("p5_teacher", "conventional", "p5_teacher", "cifar10", seed, model_cfg, TRAIN, spec.options, {})
    return spec, train_run(spec, conventional, RunContext(spec, ctx.data, 10, ctx.device), runs / spec.hash)


def student(runs, teacher: RunSpec, model_cfg: dict = TINY, train: dict = TRAIN) -> tuple[RunSpec, RunContext]:
    """A distill run taught by `teacher`, its options as l2l.config.plan resolves them."""
    opts = {**distill.validate_options(LATENCY, "test"),
            "teacher_run": {"hash": teacher.hash, "model_cfg": teacher.model_cfg}}
    spec = RunSpec("p5_distill", "distill", "m", "cifar10", teacher.seed, model_cfg, train, opts, {})
    return spec, RunContext(spec, small_data(), 10, torch.device("cpu"), runs=runs)


def test_students_are_taught_by_the_teacher_runs_checkpoint_frozen(tmp_path):
    runs = tmp_path / "runs"
    teacher, taught = teacher_run(runs)
    final = load_checkpoint(runs / teacher.hash / "final.pt")
    results = {}
    for name, cfg in (("narrow_deep", {"arch": "cifar_resnet", "depth": 14, "width": 2}), ("plain", TINY)):
        spec, ctx = student(runs, teacher, cfg)
        spy = Spy(distill, lambda phase: ["teacher"])
        results[name] = train_run(spec, spy, ctx, runs / spec.hash)
        assert [p.name for p in spy.phases_seen] == ["student"]  # no teacher training in the run
        # the teacher run's final.pt, bit for bit (weights and BatchNorm statistics), unchanged by teaching
        assert_same_state(final, spy.finished[0]["teacher"])
        assert spy.step_modes and all(m == [False] for m in spy.step_modes)  # eval mode at every step
        assert not any(q.requires_grad for q in spy.phases_seen[0].modules["teacher"].parameters())
    m = results["narrow_deep"]["phase_metrics"]["student"]
    # the teacher's accuracy measured in the student run: the teacher run's own last validation
    assert m["teacher_final_val_acc"] == pytest.approx(taught["final"]["val_acc"])
    assert m["teacher_final_test_acc"] == results["plain"]["phase_metrics"]["student"]["teacher_final_test_acc"]
    for key in ("final_test_acc", "params", "flops", "latency_fp32_b1_ms", "latency_fp32_b8_ms",
                "teacher_flops", "teacher_latency_fp32_b8_ms", "flops_ratio", "latency_ratio_b1", "latency_ratio_b8"):
        assert key in m, key
    assert m["flops_ratio"] == pytest.approx(m["flops"] / m["teacher_flops"]) and m["flops_ratio"] < 1
    assert m["params"] == count_parameters(cifar_resnet(10, depth=14, width=2))
    assert m["teacher_params"] == count_parameters(cifar_resnet(10, **{k: v for k, v in TEACHER.items() if k != "arch"}))
    res = results["narrow_deep"]
    assert res["tags"]["latency_dtype"] == "fp32" and res["tags"]["latency_device"]


def test_student_initialisation_is_the_conventional_runs(tmp_path):
    """The baseline pairing: building the teacher's shell does not move the seeded stream, so a
    student starts where a conventional run of its model and seed starts."""
    runs = tmp_path / "runs"
    teacher, _ = teacher_run(runs)
    spec, ctx = student(runs, teacher)
    torch.manual_seed(spec.seed)
    (phase,) = distill.phases(spec, ctx)  # replayed without the checkpoint (l2l.cost does this)
    conv, cctx = make(conventional, {})
    torch.manual_seed(conv.seed)
    (cphase,) = conventional.phases(conv, cctx)
    assert_same_state(state(phase.modules["student"]), state(cphase.modules["model"]))


def test_tampered_or_missing_teacher_checkpoint_is_refused(tmp_path):
    runs = tmp_path / "runs"
    teacher, _ = teacher_run(runs)
    path = runs / teacher.hash / "final.pt"
    st = load_checkpoint(path)
    key = next(k for k in st if k.endswith("weight"))
    st[key] = st[key] + 1e-3
    torch.save(st, path)
    spec, ctx = student(runs, teacher)
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        train_run(spec, distill, ctx, runs / spec.hash)
    (runs / teacher.hash / "result.json").unlink()
    spec, ctx = student(runs, teacher)
    with pytest.raises(RuntimeError, match=rf"teacher run {teacher.hash} has not finished") as e:
        train_run(spec, distill, ctx, tmp_path / "other")
    assert "\n" not in str(e.value)


def test_distill_resume_equals_uninterrupted(tmp_path):
    runs = tmp_path / "runs"
    teacher, _ = teacher_run(runs)
    train = {**TRAIN, "epochs": 2}
    spec, ctx = student(runs, teacher, train=train)
    full = train_run(spec, distill, ctx, tmp_path / "full")
    spec, ctx = student(runs, teacher, train=train)
    assert train_run(spec, distill, ctx, tmp_path / "cut", stop_after_epochs=1) == {"interrupted": True}
    spec, ctx = student(runs, teacher, train=train)  # a new process: the teacher comes back from last.pt
    resumed = train_run(spec, distill, ctx, tmp_path / "cut")
    assert_same_state(load_checkpoint(tmp_path / "full" / "final.pt"), load_checkpoint(tmp_path / "cut" / "final.pt"))
    accs = ("final_val_acc", "final_test_acc", "teacher_final_val_acc", "teacher_final_test_acc")
    assert [resumed["phase_metrics"]["student"][k] for k in accs] == [full["phase_metrics"]["student"][k] for k in accs]


def test_planned_epochs_needs_no_teacher_checkpoint(tmp_path):
    from l2l.cost import planned_epochs

    spec, _ = student(tmp_path / "nowhere", RunSpec("t", "conventional", "t", "cifar10", 0, TEACHER, TRAIN, {}, {}),
                      train={**TRAIN, "epochs": 3})
    assert planned_epochs(spec) == 3


def test_graph_pass_rehearsed_with_recording_fakes(monkeypatch):
    """The CUDA-graph branch of the latency measure on a CPU, torch.cuda's graph API replaced by fakes
    that record what is called: three warm-up passes on a side stream, one captured pass, then each
    timed call replays the graph (no Python forward) between two events."""
    calls = []

    class Counted(nn.Module):
        def forward(self, x):
            calls.append("forward")
            return x * 2

    class Stream:
        def wait_stream(self, other):
            calls.append("wait")

    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            calls.append("event")

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 2.5

    @contextlib.contextmanager
    def capture(graph):
        calls.append("capture")
        yield

    for name, fake in (("Stream", lambda device=None: Stream()), ("current_stream", lambda device=None: Stream()),
                       ("stream", lambda s: contextlib.nullcontext()), ("CUDAGraph", Graph), ("graph", capture),
                       ("Event", Event)):
        monkeypatch.setattr(torch.cuda, name, fake)
    timed = _graph_pass(Counted(), torch.ones(2, 3), contextlib.nullcontext)
    assert calls == ["wait", "forward", "forward", "forward", "wait", "capture", "forward"]
    assert [timed(), timed()] == [2.5, 2.5] and Graph.replays == 2 and calls.count("forward") == 4


def test_distill_on_cuda_times_graph_and_eager_and_names_their_ratios(monkeypatch):
    """Where the graph mode runs (CUDA, forced here), profile times the eager pass too, and distill names
    the two ratios apart: latency_ratio_b<N> (graph, what P5-C1 decides on), latency_eager_ratio_b<N>."""
    modes = []

    def fake_latencies(models, b, shape, warmup, repeats, autocast, memory_format, mode):
        modes.append(mode)
        return {n: {"median_ms": (1.0 if n == "teacher" else 0.3) * (5 if mode == "eager" else 1), "iqr_ms": 0.0,
                    "mode": mode} for n in models}

    monkeypatch.setattr(teaching, "latency_mode", lambda requested, device: requested)
    monkeypatch.setattr(teaching, "latencies", fake_latencies)
    spec, ctx = make(distill, {"latency_batches": [1, 4]})
    out = distill._student_measures(ctx, cifar_resnet(10, depth=8, width=2), cifar_resnet(10, depth=8, width=4))
    assert modes == ["cuda_graph", "cuda_graph", "eager", "eager"]
    assert out["latency_ratio_b1"] == pytest.approx(0.3) and out["latency_eager_ratio_b4"] == pytest.approx(0.3)
    assert out["latency_fp32_b1_ms"] == 0.3 and out["latency_eager_fp32_b1_ms"] == 1.5
    assert {k for k in out if "ratio_b" in k} == {"latency_ratio_b1", "latency_ratio_b4", "latency_eager_ratio_b1",
                                                  "latency_eager_ratio_b4"}


def test_profile_keys_carry_the_dtype():
    spec, ctx = make(distill, {})
    for mode in ("eager", "cuda_graph"):  # a CPU has no CUDA graphs: both time the eager pass, once
        p, used = profile(ctx, {"a": cifar_resnet(10, depth=8, width=2), "b": cifar_resnet(10, depth=8, width=4)},
                          batches=[1, 2], warmup=0, repeats=2, mode=mode)
        assert used == "eager"
        assert p["a"]["flops"] < p["b"]["flops"]
        assert set(p) == {"a", "b"} and set(p["a"]) == {"params", "flops", "latency_fp32_b1_ms", "latency_fp32_b1_iqr_ms",
                                                        "latency_fp32_b2_ms", "latency_fp32_b2_iqr_ms"}


def test_latency_modes_and_the_graph_capture_precision():
    assert latency_mode("cuda_graph", torch.device("cpu")) == "eager"
    assert latency_mode("cuda_graph", torch.device("cuda")) == "cuda_graph"  # the device decides, no CUDA needed
    assert latency_mode("eager", torch.device("cuda")) == "eager"
    with pytest.raises(ValueError, match="mode"):
        latency_mode("compiled", torch.device("cpu"))
    # the run's bf16 autocast, with its weight-cast cache off for a CUDA graph's capture (torch's CUDA graphs
    # notes: a cast cached outside the capture would be freed while the graph reads it)
    ac = _graph_autocast(lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16))()
    assert isinstance(ac, torch.autocast) and ac.fast_dtype == torch.bfloat16 and not ac._cache_enabled
    assert _graph_autocast(contextlib.nullcontext)() is not None
    t = latencies({"m": cifar_resnet(10, depth=8, width=2)}, 1, (3, 8, 8), warmup=0, repeats=2, mode="cuda_graph")
    assert t["m"]["mode"] == "eager" and t["m"]["median_ms"] > 0


@pytest.mark.parametrize("method,options,key", [
    (generations, {"teacher_loss": "lenient"}, "teacher_loss"),
    (generations, {"tsd_norm": "k"}, "tsd_norm"),
    (generations, {"tsd_k": 1}, "tsd_k"),
    (generations, {"kd_weight": 1.5}, "kd_weight"),
    (generations, {"temperature": 0}, "temperature"),
    (generations, {"epsilon": 1.0}, "epsilon"),
    (generations, {"generations": -1}, "generations"),
    (generations, {"eta": "high"}, "eta"),
    (generations, {"teacher": {}}, "teacher"),
    (distill, {"teacher": {"arch": "cifar_resnet", "depth": 110}}, "teacher"),  # a run reference now
    (distill, {"teacher": {"experiment": "p5_teacher"}}, "teacher"),
    (distill, {"teacher": {"experiment": "p5_teacher", "model": 110}}, "teacher"),
    (distill, {"latency_batches": [1, 0]}, "latency_batches"),
    (distill, {"latency_repeats": 0}, "latency_repeats"),
    (distill, {"latency_mode": "compiled"}, "latency_mode"),
    (generations, {"tsd_primary": "truth"}, "tsd_primary"),
    (generations, {"tsd_input": "scores"}, "tsd_input"),
    (generations, {"eta": 0}, "eta"),
    (generations, {"eta": 1.5}, "eta"),
])
def test_bad_options_name_the_key(method, options, key):
    with pytest.raises(ConfigError, match=rf"exp\.options\.{key}\b") as e:
        method.validate_options(options, "exp.options")
    assert "\n" not in str(e.value)


def test_tsd_k_larger_than_the_classes():
    spec, ctx = make(generations, {"tsd_k": 11})
    with pytest.raises(ConfigError, match="tsd_k: expected at most the 10 classes"):
        next(generations.phases(spec, ctx))


# ---------------------------------------------------------------- the generation schedule (P4)

def test_kd_weight_schedules():
    o = generations.validate_options({"generations": 4}, "x")  # the default: linear from 0.9, step 0.1
    assert generations.kd_weights(o) == [0.9, 0.8, 0.7, 0.6]
    o = generations.validate_options({"generations": 3, "kd_schedule": "constant"}, "x")
    assert generations.kd_weights(o) == [0.9, 0.9, 0.9]
    o = generations.validate_options({"generations": 2, "kd_schedule": "explicit", "kd_weights": [0.5, 0.25]}, "x")
    assert generations.kd_weights(o) == [0.5, 0.25]
    assert generations.kd_weights(generations.validate_options({"generations": 0}, "x")) == []


@pytest.mark.parametrize("options, key", [
    ({"kd_schedule": "cosine"}, "kd_schedule"),
    ({"generations": 3, "kd_schedule": "explicit", "kd_weights": [0.9, 0.8]}, "kd_weights"),  # one per generation
    ({"generations": 2, "kd_schedule": "explicit", "kd_weights": [0.9, 1.5]}, "kd_weights"),
    ({"kd_weights": [0.9, 0.8]}, "kd_weights"),  # given but not read (kd_schedule linear)
    ({"generations": 11}, "kd_weight_step"),  # 0.9 - 10 * 0.1 < 0
    ({"kd_weight_step": -0.1}, "kd_weight_step"),
])
def test_bad_schedules_name_the_key(options, key):
    with pytest.raises(ConfigError, match=rf"x\.{key}"):
        generations.validate_options(options, "x")


def test_each_generation_learns_with_its_scheduled_weight(tmp_path, monkeypatch):
    """Generation m's step gets w_m; the schedules agree on generation 1, so only later ones differ."""
    seen = []
    real = generations.kd_step

    def spy(ctx, model, opt, teacher, label_loss, temperature, kd_weight):
        seen.append(kd_weight)
        return real(ctx, model, opt, teacher, label_loss, temperature, kd_weight)
    monkeypatch.setattr(generations, "kd_step", spy)
    finals = {}
    for schedule in ("linear", "constant"):
        spec, ctx = make(generations, {"generations": 2, "kd_schedule": schedule, "kd_weight_step": 0.4})
        spy_method = Spy(generations)
        result = train_run(spec, spy_method, ctx, tmp_path / schedule)
        finals[schedule] = spy_method.finished
        assert [m.get("kd_weight") for m in result["phase_metrics"].values()] == \
            ([None, 0.9, 0.5] if schedule == "linear" else [None, 0.9, 0.9])
    assert seen == [0.9, 0.5, 0.9, 0.9]
    assert_same_state(finals["linear"][1]["model"], finals["constant"][1]["model"])  # generation 1: same weight
    g2 = [finals[s][2]["model"] for s in ("linear", "constant")]
    assert any(not torch.equal(g2[0][k], g2[1][k]) for k in g2[0])  # generation 2: another weight, another net

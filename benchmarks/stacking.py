"""Stacked seeds on the CPU: what can be measured without a GPU, to choose how K runs become one step.

    PYTHONPATH=. python benchmarks/stacking.py [--models resnet20 resnet110] [--json OUT]

Per model (the paper profile's launch-bound ResNets first) and per way of stacking K runs:

- kernels: GPU kernel launches of one training step (forward, backward, fused SGD), counted on the meta
  device (l2l.profiling.StepCounter): what bounds a launch-bound step on a GPU;
- host ms: one step's wall time of the same network one channel wide, at batch 2 on one CPU thread,
  where the arithmetic is negligible: the host's (Python, dispatcher) time per step, the other floor of
  a launch-bound step (median of --repeats);
- fp64 difference: the largest parameter difference from K separately trained models after `--steps`
  SGD steps in float64 (each member on its own batches).

Ways: ``separate`` (K runs one after another), ``grouped`` (the issue's prototype: the network rebuilt
with K-times grouped convolutions, K-times BatchNorm channels and a batched classifier; ResNets only:
a concatenation or reshape across channels breaks its member-major layout), ``vmap`` (torch.func.vmap
over the step with torch's own batching rules) and ``stacked`` (l2l/stacking.py: vmap with BatchNorm
and the in-place ops on the grouped layout). The GPU's figures are benchmarks/gpu_check.py's section
stacking; these decide nothing about GPU speed, only the counts and the host's share.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from l2l.device_data import DeviceData  # noqa: E402
from l2l.methods import METHODS  # noqa: E402
from l2l.profiling import StepCounter  # noqa: E402
from l2l.spec import RunSpec  # noqa: E402
from l2l.stacking import MemberContext, Recorder, StackedPhase  # noqa: E402
import throughput as tp  # noqa: E402

MODELS = {"resnet20": {"arch": "cifar_resnet", "depth": 20}, "resnet110": {"arch": "cifar_resnet", "depth": 110},
          "vgg16": {"arch": "vgg16", "width": 1.0}, "cnn": {"arch": "cnn", "width": 64}}
# the same networks one channel wide: the host-time measurement's (the same ops, next to no arithmetic)
NARROW = {"cifar_resnet": {"width": 1}, "vgg16": {"width": 1 / 64}, "cnn": {"width": 1}}
KS = (1, 2, 8)


def _grouped(models: list[nn.Module]) -> nn.Module:
    """The K models as one network of K-times grouped convolutions (member-major channels), K-times
    BatchNorm channels and a batched linear classifier: the issue's prototype."""
    k, net = len(models), copy.deepcopy(models[0])
    named = [dict(m.named_modules()) for m in models]

    class Linear(nn.Module):
        def __init__(self, mods):
            super().__init__()
            self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in mods]))
            self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in mods]))

        def forward(self, x):
            x = x.view(x.shape[0], k, -1).transpose(0, 1)
            return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2)).transpose(0, 1)

    with torch.device(next(models[0].parameters()).device):
        _replace(net, named, k, Linear)
    return net


def _replace(net: nn.Module, named: list[dict], k: int, Linear) -> None:
    for name, mod in list(net.named_modules()):
        mods, new = [n[name] for n in named], None
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(mod.in_channels * k, mod.out_channels * k, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups * k, mod.bias is not None)
            new.weight.data = torch.cat([m.weight.detach() for m in mods])
            if mod.bias is not None:
                new.bias.data = torch.cat([m.bias.detach() for m in mods])
        elif isinstance(mod, nn.BatchNorm2d):
            new = nn.BatchNorm2d(mod.num_features * k, mod.eps, mod.momentum)
            for a in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, a).data = torch.cat([getattr(m, a).detach() for m in mods])
        elif isinstance(mod, nn.Linear):
            new = Linear(mods)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr, new)


def _spec(cfg: dict, seed: int, batch: int) -> RunSpec:
    return RunSpec("benchmark", "conventional", cfg["arch"], "cifar10", seed, cfg,
                   {**tp.TRAIN, "batch_size": batch}, {}, {"fingerprint": "benchmark"})


def _phases(cfg: dict, k: int, batch: int, device: str):
    data = DeviceData({"train": (torch.zeros(4, 3, 32, 32, dtype=torch.uint8).numpy(), torch.zeros(4).long().numpy())},
                      "cifar10", torch.device("cpu"), crop_padding=0, flip=False)
    specs = [_spec(cfg, s, batch) for s in range(k)]
    rec = Recorder(specs)
    phases = []
    for s in specs:
        torch.manual_seed(s.seed)
        ctx = MemberContext(s, data, 10, torch.device(device), runs=Path("."), stack=rec, member=s.seed)
        with torch.device(device):
            phases.append(next(METHODS["conventional"].phases(s, ctx)))
    return phases, rec


def _steps(way: str, cfg: dict, k: int, batch: int, device: str):
    """A step function of `way` over k members on (k, batch) inputs, and the members' parameters."""
    phases, rec = _phases(cfg, k, batch, device)
    if way == "separate":
        def step(x, y):
            for j, p in enumerate(phases):
                p.step(x[j], y[j])
        return step, lambda: [[t.detach() for t in p.modules["model"].parameters()] for p in phases]
    if way == "grouped":
        net = _grouped([p.modules["model"] for p in phases])
        opt = torch.optim.SGD(net.parameters(), **{a: phases[0].optimizers["sgd"].defaults[a]
                                                    for a in ("lr", "momentum", "weight_decay")})

        def step(x, y):
            logits = net(x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:]))
            loss = sum(F.cross_entropy(logits[:, j].float(), y[j]) for j in range(k))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step, None
    stacked = StackedPhase(phases, rec)
    if way == "vmap":  # torch's own batching rules: the layout of l2l.stacking switched off
        stacked.layout = contextlib.nullcontext()
        return (lambda x, y: stacked.step(x, y)), None
    return (lambda x, y: stacked.step(x, y)), lambda: [[t.detach()[j] for t, members in stacked.pairs
                                                        if t.requires_grad] for j in range(k)]


def kernels(way: str, cfg: dict, k: int) -> int:
    step, _ = _steps(way, cfg, k, 128, "meta")
    x, y = torch.empty(k, 128, 3, 32, 32, device="meta"), torch.zeros(k, 128, dtype=torch.long, device="meta")
    step(x, y)
    with StepCounter() as c:
        step(x, y)
    return c.launches


def host_ms(way: str, cfg: dict, k: int, repeats: int) -> float:
    step, _ = _steps(way, {**cfg, **NARROW[cfg["arch"]]}, k, 2, "cpu")
    x, y = torch.randn(k, 2, 3, 32, 32), torch.zeros(k, 2, dtype=torch.long)
    for _ in range(3):
        step(x, y)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def fp64_difference(cfg: dict, k: int, steps: int) -> float:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        xs, ys = torch.randn(steps, k, 8, 3, 32, 32, generator=g), torch.randint(0, 10, (steps, k, 8), generator=g)
        sep, sep_params = _steps("separate", cfg, k, 8, "cpu")
        stk, stk_params = _steps("stacked", cfg, k, 8, "cpu")
        for i in range(steps):
            sep(xs[i], ys[i])
            stk(xs[i], ys[i])
        return max(float((a - b).abs().max()) for ma, mb in zip(sep_params(), stk_params()) for a, b in zip(ma, mb))
    finally:
        torch.set_default_dtype(before)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet110"], choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=15, help="timed host-bound steps (the median is reported)")
    p.add_argument("--steps", type=int, default=5, help="SGD steps of the fp64 comparison")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {"stamp": tp.stamp(torch.device("cpu"), __import__("os").getloadavg()[0]), "models": {}}
    print("| model | way | K | kernels per step | host ms per step (1 channel wide, batch 2) | host ms per run |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        cfg, rows = MODELS[name], []
        for way in ("separate", "grouped", "vmap", "stacked"):
            if way == "grouped" and cfg["arch"] != "cifar_resnet":
                continue
            for k in KS:
                r = {"way": way, "k": k, "kernels": kernels(way, cfg, k), "host_ms": host_ms(way, cfg, k, args.repeats)}
                rows.append(r)
                print(f"| {name} | {way} | {k} | {r['kernels']} | {r['host_ms']:.1f} | {r['host_ms'] / k:.1f} |",
                      flush=True)
        out["models"][name] = {"rows": rows, "fp64_max_param_difference_k4": fp64_difference(cfg, 4, args.steps)}
        print(f"{name}: stacked K=4 vs separate after {args.steps} fp64 SGD steps: largest parameter difference "
              f"{out['models'][name]['fp64_max_param_difference_k4']:.3g}")
    out["stamp"]["load_average_1min"] = round(__import__("os").getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()

"""Stacked seeds: K runs that differ only by seed, trained as one computation (issue #21).

Why: the paper profile's small CIFAR ResNets are launch-bound on a GPU (a ResNet-20 step at batch 128
launches ~180 kernels for ~0.4 ms of device work), so one run at a time leaves most of a GPU idle.
A stack of K members takes ONE step for all of them: ``torch.func.vmap`` over the method's own step
function, with every member's parameters, buffers and optimizer state stacked along a leading member
dimension. Under vmap a convolution over stacked weights is one grouped convolution; BatchNorm keeps
per-member statistics (:func:`stacked_layout` keeps it, and the in-place activations, on that grouped
layout: vmap's default rules take ~2.5x the kernels). A K-member step launches about as
many kernels as one run's (ResNet-20: 201 for any K against 178 per run, ResNet-110: 926 against 903;
``benchmarks/stacking.py``), at about twice a separate step's host time (vmap's batching layer).

Exactness by construction. Each member runs the engine's own loop (:func:`l2l.engine.train_run`:
resume, checkpoints, validation, history, ``result.json`` and its hashes) in a thread of its own;
the threads take turns (:class:`Lockstep`: one runs at a time, in member order) and meet at every
training step, where the last to arrive runs the stacked step for all and hands each member its own
loss and logits. So a member's run folder, record and MLflow run are those of a separately trained
run, and its identity (``RunSpec.hash``) does not change: stacking is how runs execute, like
``executor.runs_per_gpu``. Every stacked operation is per member (grouped convolutions, per-channel
BatchNorm, the sum of the members' losses, elementwise SGD), so in fp64 a member equals its separate
run up to rounding (``tests/test_stacking.py``: 4 members, ResNet, 1e-12), and in fp32 it differs as
much as a separate run does from itself under another thread count.

- Data: each member's batches are exactly those its seed gives alone (``DeviceData.epoch_plan`` per
  seed: order, crops, flips), augmented in one call for all members (``DeviceData.stacked_batch``).
- Random state: the torch generator is swapped per member at every turn, so a member's
  initialisation, and whatever its phases draw, are its seed's alone. The stacked step draws nothing
  (vmap's ``randomness="error"`` refuses a step that would). CUDA's generator is shared: nothing in a
  stackable method draws from it (models initialise on the CPU, augmentation draws on the CPU).
- Failure: a member whose own code raises (its teacher checkpoint, its resume state, its MLflow run,
  its phase-end measures) leaves the stack and fails alone; the others go on. A member whose loss
  turns non-finite stays isolated (nothing crosses members) and ends as its separate run would (a
  diverged run's NaN metrics, which the statistics drop and name); it is logged once. An error of the
  stacked computation itself (out of memory) fails every member in it.
- What may stack (``Method.stackable``): a method whose step makes exactly ONE update of one
  optimizer, as its last effect, over the phase's modules only (conventional, distill, generations
  with the teacher on the fly, layerwise); the stack checks the one update at every step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import types
from typing import Any, Callable, Iterator

import torch
import torch._C._functorch as _functorch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

from l2l.device_data import DeviceData
from l2l.engine import Phase, PhaseSource, RunContext
from l2l.spec import RunSpec

log = logging.getLogger(__name__)


def seed_group(spec: RunSpec) -> str:
    """What runs of one stack share: the run's identity without its seed. A required run (a distilled
    student's teacher) is a different run per seed; it enters by its model only."""
    options = {k: v["model_cfg"] if k.endswith("_run") and isinstance(v, dict) else v for k, v in spec.options.items()}
    d = {**spec.to_dict(), "seed": None, "options": options}
    return RunSpec(**d).hash


# --- the stacked step on the grouped layout ---------------------------------------------------------
# Under vmap a convolution of stacked weights is one grouped convolution, but torch's default rules for
# BatchNorm (its statistics and affine parameters member-stacked) and for an in-place op on a member's
# slice (an in-place ReLU, torchvision's `out += identity`: writes through a view, undone in backward with
# copies) take ~2.5x the kernels of the network itself. During a stacked step the first member's modules
# (the ones the step runs, their tensors swapped for the stacked ones) therefore run: BatchNorm on the
# members' channels side by side (one native batch norm, its per-channel statistics each member's own,
# running statistics updated in place in their stacked buffers), ReLUs out of place, and torchvision's
# residual blocks with an out-of-place residual add: the same values, ~1.1x the kernels of one run
# (tests/test_stacking.py; benchmarks/RESULTS.md). torch's functorch entry points for a batching rule
# written in Python (torch._C._functorch: a batched tensor's level, its physical tensor, re-wrapping) are
# used directly: autograd.Function's vmap staticmethod costs ~1 ms of host time per call.

def _physical(t, level: int) -> tuple[Any, int | None]:
    if isinstance(t, torch.Tensor) and _functorch.maybe_get_level(t) == level:
        return _functorch._unwrap_batched(t, level)
    return t, None


def _batch_norm_forward(self: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """torch's _BatchNorm.forward, its F.batch_norm on the members side by side (B, K*C, ...)."""
    momentum = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            raise RuntimeError("stacked BatchNorm: momentum None (a cumulative average) is not stacked")
    bn_training = self.training or (self.running_mean is None and self.running_var is None)
    stats = self.running_mean, self.running_var
    if self.training and not self.track_running_stats:
        stats = None, None
    args = [input, *stats, self.weight, self.bias]
    level = max(_functorch.maybe_get_level(t) if isinstance(t, torch.Tensor) else -1 for t in args)
    (x, xd), (rm, rmd), (rv, rvd), (w, wd), (b, bd) = (_physical(t, level) for t in args)
    k = next(t.shape[d] for t, d in ((x, xd), (rm, rmd), (w, wd)) if d is not None)
    x = x.movedim(xd, 1) if xd is not None else x.unsqueeze(1).expand(x.shape[0], k, *x.shape[1:])
    n, c = x.shape[0], x.shape[2]

    def side_by_side(t, d):
        return None if t is None else (t.movedim(d, 0) if d is not None else t.expand(k, *t.shape)).reshape(k * c)

    rm_, rv_ = side_by_side(rm, rmd), side_by_side(rv, rvd)
    if bn_training and rm is not None and rm_.untyped_storage().data_ptr() != rm.untyped_storage().data_ptr():
        raise RuntimeError("stacked BatchNorm: its running statistics are not member-stacked buffers")
    out = F.batch_norm(x.reshape(n, k * c, *x.shape[3:]), rm_, rv_, side_by_side(w, wd), side_by_side(b, bd),
                       bn_training, momentum, self.eps)
    # not a view for autograd: the next in-place op on it needs no CopySlices
    return _functorch._add_batch_dim(torch.ops.aten._unsafe_view(out, (n, k, c, *x.shape[3:])), 1, level)


def _basic_block_forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock.forward with `out + identity` for `out += identity` (the same values)."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


def _bottleneck_forward(self: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """torchvision's Bottleneck.forward with `out + identity` for `out += identity` (the same values)."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


_FORWARDS = ((nn.modules.batchnorm._BatchNorm, _batch_norm_forward), (BasicBlock, _basic_block_forward),
             (Bottleneck, _bottleneck_forward))


class stacked_layout:  # noqa: N801 (used as a context manager, like contextlib's)
    """Within `with`, `modules` (and every submodule) run their stacked forwards (the module comment
    above). What to patch is found once, here: entering and leaving only set and remove attributes, so a
    stacked step pays no walk of the module tree."""

    def __init__(self, modules: list[nn.Module]):
        every = {id(m): m for root in modules for m in root.modules()}.values()  # a shared module once
        self.patches = [(m, types.MethodType(forward, m)) for m in every for kind, forward in _FORWARDS
                        if isinstance(m, kind) and "forward" not in m.__dict__]
        self.relus = [m for m in every if isinstance(m, nn.ReLU) and m.inplace]

    def __enter__(self) -> None:
        for m, forward in self.patches:
            m.__dict__["forward"] = forward
        for m in self.relus:
            m.inplace = False

    def __exit__(self, *exc) -> None:
        for m, _ in self.patches:
            del m.__dict__["forward"]
        for m in self.relus:
            m.inplace = True


# --- member views of the engine's context -------------------------------------------------------

class _MemberMeter:
    """The engine's per-epoch meter of one member: the stack meters all members at once."""

    def __init__(self, stack: "Lockstep", k: int):
        self.stack, self.k = stack, k

    def add(self, logits, y) -> None:
        pass  # metered in the stacked step

    def value(self) -> float:
        return self.stack.meter_value(self.k)


class _MemberTask:
    """The run's task (loss, KD loss, metric) with the stack's meter."""

    def __init__(self, task, stack: "Lockstep", k: int):
        self._task, self._stack, self._k = task, stack, k

    def __getattr__(self, name):
        return getattr(self._task, name)

    def meter(self, device: torch.device) -> _MemberMeter:
        return _MemberMeter(self._stack, self._k)


class MemberData:
    """A member's view of the shared DeviceData: its training batches are placeholders (no images: the
    stack augments every member's batch in one call) with the member's own labels, in its seed's order."""

    def __init__(self, data: DeviceData, stack: "Lockstep", k: int):
        self._data, self._stack, self._k = data, stack, k

    def __getattr__(self, name):
        return getattr(self._data, name)

    def __len__(self) -> int:
        return len(self._data)

    def train_batches(self, seed: int, phase: int, epoch: int, batch_size: int
                      ) -> Iterator[tuple[None, torch.Tensor]]:
        y = self._stack.begin_epoch(self._k, self._data, seed, phase, epoch, batch_size)
        for i in range(0, len(y), batch_size):
            yield None, y[i:i + batch_size]


class MemberContext(RunContext):
    """A stacked member's RunContext: its step's update is recorded (the stack makes it for all
    members), its data and meter are the stack's, nothing is compiled; otherwise the run's own."""

    def __init__(self, *args, stack: "Lockstep", member: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stack, self.member = stack, member
        stack.task = self.task
        self.data = MemberData(self.data, stack, member)
        self.task = _MemberTask(self.task, stack, member)

    def update(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        if self.stack.recording:
            self.stack.updates.append(opt)
            return
        RunContext.update(opt, loss)  # outside the stacked step (a phase's own training, e.g. probes)

    def compiled(self, module: nn.Module) -> nn.Module:
        return module

    def speed_record(self) -> dict:
        return {**super().speed_record(), "stacked": {"members": self.stack.size, "seeds": self.stack.seeds,
                                                     "member": self.member}}


class _MemberMethod:
    """The method as one member runs it: its phases, registered with the stack, each stepping through it."""

    def __init__(self, method: PhaseSource, stack: "Lockstep", k: int):
        self.method, self.stack, self.k = method, stack, k

    def phases(self, spec: RunSpec, ctx: RunContext) -> Iterator[Phase]:
        for pi, phase in enumerate(self.method.phases(spec, ctx)):
            self.stack.phases[self.k] = phase
            yield dataclasses.replace(phase, step=lambda x, y, k=self.k: self.stack.step(k, x, y))


def _tensors(modules: dict[str, nn.Module]) -> list[tuple[str, dict, str, torch.Tensor]]:
    """Every parameter and buffer of a phase's modules: (name, the dict that holds it, its key, the tensor),
    a tensor shared by two modules once per holder."""
    out = []
    for key, root in modules.items():
        for mname, m in root.named_modules(remove_duplicate=False):
            for holder in (m._parameters, m._buffers):
                for attr, t in holder.items():
                    if t is not None:
                        out.append((f"{key}.{mname}.{attr}", holder, attr, t))
    return out


def _stacked_like(ts: list[torch.Tensor]) -> torch.Tensor:
    """The members' tensors stacked on a new leading dimension. A channels_last convolution weight
    keeps each member channels_last, so the grouped weight vmap forms from it is a view (no copy)."""
    t0 = ts[0]
    if t0.dim() == 4 and not t0.is_contiguous() and t0.is_contiguous(memory_format=torch.channels_last):
        out = torch.empty((len(ts) * t0.shape[0], *t0.shape[1:]), dtype=t0.dtype, device=t0.device,
                          memory_format=torch.channels_last).view(len(ts), *t0.shape)
        for i, t in enumerate(ts):
            out[i].copy_(t)
        return out
    return torch.stack(ts)


class Recorder:
    """Where the update of a member's step goes while the stacked step runs (MemberContext.update)."""

    def __init__(self, specs: list[RunSpec]):
        self.specs, self.size, self.seeds = specs, len(specs), [s.seed for s in specs]
        self.recording, self.updates = False, []
        self.task = None


class StackedPhase:
    """The members' current phase as one stacked computation: every tensor of the phase's modules and
    every optimizer's state stacked along a leading member dimension (:meth:`step` trains them all
    with one vmapped call of the first member's step), and :meth:`scatter` writes them back into each
    member's own modules and optimizers. The members' phases must come from MemberContexts bound to
    `recorder` (their step's update is recorded, then made once for all)."""

    def __init__(self, phases: list[Phase], recorder: Recorder):
        self.phases, self.recorder = phases, recorder
        self.layout = stacked_layout(list(phases[0].modules.values()))  # patched per step, found once here
        lead = phases[0]
        mine = _tensors(lead.modules)
        theirs = [{name: t for name, _, _, t in _tensors(p.modules)} for p in phases]
        stacked_of: dict[int, torch.Tensor] = {}  # the lead's tensor -> its stacked tensor
        self.slots, self.stacked, self.pairs = [], [], []
        with torch.no_grad():
            for name, holder, attr, t in mine:
                if id(t) not in stacked_of:
                    members = [m[name] for m in theirs]
                    stacked_of[id(t)] = _stacked_like(members).requires_grad_(t.requires_grad)
                    self.pairs.append((stacked_of[id(t)], members))
                self.slots.append((holder, attr))
                self.stacked.append(stacked_of[id(t)])
        self.optimizers, self.member_optimizers = {}, {}
        for name, o0 in lead.optimizers.items():
            opts = [p.optimizers[name] for p in phases]
            groups = []
            for gi, g in enumerate(o0.param_groups):
                hyper = {k: v for k, v in g.items() if k != "params"}
                if any({k: v for k, v in o.param_groups[gi].items() if k != "params"} != hyper for o in opts):
                    raise RuntimeError(f"the stacked runs' optimizer {name} settings differ (learning rates?)")
                if any(id(p) not in stacked_of for p in g["params"]):
                    raise RuntimeError(f"optimizer {name} updates a tensor outside its phase's modules: not stackable")
                groups.append({**hyper, "params": [stacked_of[id(p)] for p in g["params"]]})
            stacked = type(o0)(groups, **o0.defaults)
            with torch.no_grad():
                for gi, g in enumerate(o0.param_groups):
                    for pos, p in enumerate(g["params"]):
                        states = [o.state.get(o.param_groups[gi]["params"][pos]) or {} for o in opts]
                        if states[0]:
                            stacked.state[stacked_of[id(p)]] = {
                                key: _stacked_like([s[key] for s in states]) if isinstance(v, torch.Tensor) else v
                                for key, v in states[0].items()}
            self.optimizers[name], self.member_optimizers[name] = stacked, opts

    def _member_step(self, tensors: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor):
        """The lead's step with its tensors swapped for one member's slice of the stacked ones (vmap's view)."""
        old = [holder[attr] for holder, attr in self.slots]
        for (holder, attr), t in zip(self.slots, tensors):
            holder[attr] = t
        try:
            return self.phases[0].step(x, y)
        finally:
            for (holder, attr), t in zip(self.slots, old):
                holder[attr] = t

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of every member on its own batch (x: (K, B, ...), y: (K, B, ...)): each
        member's step as the method wrote it, its update made once for all. Returns the members'
        (losses (K,), logits (K, B, ...)), detached."""
        rec = self.recorder
        rec.updates = []
        rec.recording = True
        try:
            with self.layout:
                losses, logits = torch.vmap(self._member_step, randomness="error")(tuple(self.stacked), x, y)
        finally:
            rec.recording = False
        if len(rec.updates) != 1:
            raise RuntimeError(f"a stacked step must update one optimizer once, this one updated {len(rec.updates)} "
                               "times: its method is not stackable")
        name = next(n for n, o in self.phases[0].optimizers.items() if o is rec.updates[0])
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # each member's loss has gradient 1: member k's parameters see its own loss only
        opt.step()
        return losses.detach(), logits.detach()

    def scatter(self, keep: list[bool]) -> None:
        """The stacked state back into the members' own modules and optimizers (those `keep` marks)."""
        with torch.no_grad():
            for stacked, members in self.pairs:
                for j, t in enumerate(members):
                    if keep[j]:
                        t.copy_(stacked[j])
            for name, stacked in self.optimizers.items():
                for gi, g in enumerate(stacked.param_groups):
                    for pos, P in enumerate(g["params"]):
                        if not stacked.state.get(P):
                            continue
                        for j, o in enumerate(self.member_optimizers[name]):
                            if keep[j]:
                                p = o.param_groups[gi]["params"][pos]
                                o.state[p] = {key: (torch.empty_like(p) if v.shape[1:] == p.shape else
                                                    torch.empty_like(v[j])).copy_(v[j])
                                              if isinstance(v, torch.Tensor) else v
                                              for key, v in stacked.state[P].items()}
        for opts in self.member_optimizers.values():
            for o in opts:
                o._opt_called = True  # stepped, as far as its scheduler can tell (torch warns otherwise)


class _Aborted(KeyboardInterrupt):
    """A member stopped because its stack was (SIGTERM, Ctrl-C): its run is marked KILLED, as an interrupted run."""


# --- the lockstep ----------------------------------------------------------------------------------

class Lockstep(Recorder):
    """K member threads, one running at a time, meeting at every training step.

    ``run(train)`` starts a thread per member running ``train(k)`` (the executor's train_one with a
    :class:`MemberContext` and :meth:`method`) and returns each member's result or exception. The turn
    passes in member order: a member runs until its next step (or its end), then hands the turn to
    the next live member; the last to reach a step runs the stacked step for all and hands the turn to
    the first. Members trained together must start at the same point (the executor groups them by
    resume state); one found out of step fails alone."""

    def __init__(self, specs: list[RunSpec]):
        if len({seed_group(s) for s in specs}) != 1:
            raise ValueError("a stack's runs must differ by seed only")
        super().__init__(specs)
        self.live: list[int] = list(range(self.size))
        self.go = [threading.Semaphore(0) for _ in specs]
        self.lock, self.unwind = threading.Lock(), threading.Lock()
        self.rng: dict[int, torch.Tensor] = {}
        self.aborted: BaseException | None = None
        self._unwinding: int | None = None
        self.phases: dict[int, Phase] = {}
        self.arrived: dict[int, tuple] = {}  # member -> (phase, epoch, batch) of the step it waits at
        self.results: dict[int, Any] = {}
        self.position: dict[int, list] = {}  # member -> [phase, epoch, next batch, batches, batch size]
        self.plans: dict[int, tuple] = {}  # member -> its epoch (order, crops, flips, labels), by position
        self.rows: list[int] = []  # the members of the stacked state, in order
        self.diverged: set[int] = set()
        self.data: DeviceData | None = None

    # -- threads and turns --
    def method(self, method: PhaseSource, k: int) -> PhaseSource:
        return _MemberMethod(method, self, k)

    def run(self, train: Callable[[int], Any], join_every: float = 0.5) -> list[Any]:
        outcomes: list[Any] = [None] * self.size

        def body(k: int) -> None:
            try:
                self._wait_turn(k)
                outcomes[k] = train(k)
            except BaseException as e:  # noqa: BLE001 (the member's outcome; the caller reports it)
                outcomes[k] = e
            finally:
                self._leave(k)

        threads = [threading.Thread(target=body, args=(k,), name=f"l2l-stack-{self.specs[k].hash}", daemon=True)
                   for k in range(self.size)]
        for t in threads:
            t.start()
        self.go[0].release()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(join_every)  # short joins: a signal (SIGTERM, Ctrl-C) reaches this thread
        except BaseException as e:
            self.abort(e)
            for t in threads:
                t.join()
            raise
        return outcomes

    def abort(self, error: BaseException) -> None:
        """Every member raises at its next turn and unwinds (its MLflow run marked KILLED), one at a time."""
        with self.lock:
            self.aborted = error
            for k in self.live:
                self.go[k].release()

    def _wait_turn(self, k: int) -> None:
        self.go[k].acquire()
        if self.aborted is not None:
            self.unwind.acquire()  # released when this member has left: members unwind one after another
            self._unwinding = k
            raise _Aborted(f"stack stopped ({self.aborted!r})")
        if k in self.rng:
            torch.set_rng_state(self.rng[k])

    def _pass_turn(self, k: int, to: int) -> None:
        self.rng[k] = torch.get_rng_state()
        if to != k:
            self.go[to].release()
            self._wait_turn(k)

    def _next(self, k: int) -> int:
        later = [j for j in self.live if j > k]
        return later[0] if later else self.live[0]

    def _leave(self, k: int) -> None:
        to = None
        with self.lock:
            if k in self.live:
                self.live.remove(k)
                self.arrived.pop(k, None)
                if self.live and self.aborted is None:
                    everyone = bool(self.arrived) and set(self.arrived) >= set(self.live)
                    if everyone:
                        self._meet()
                    to = self.live[0] if everyone else self._next(k)
        if self._unwinding == k:
            self._unwinding = None
            self.unwind.release()
        if to is not None:
            self.go[to].release()

    # -- a member's side --
    def begin_epoch(self, k: int, data: DeviceData, seed: int, phase: int, epoch: int, batch_size: int
                    ) -> torch.Tensor:
        """Member k starts an epoch: its plan, its seed's alone; returns its labels in batch order."""
        self.data = data
        self.plans[k] = data.epoch_by_position(seed, phase, epoch)
        self.position[k] = [phase, epoch, 0, math.ceil(len(self.plans[k][0]) / batch_size), batch_size]
        return self.plans[k][3]

    def step(self, k: int, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.position[k]
        with self.lock:
            self.arrived[k] = (pos[0], pos[1], pos[2])
            pos[2] += 1
            everyone = set(self.arrived) >= set(self.live)
            if everyone:
                self._meet()
            to = self.live[0] if everyone else self._next(k)
        self._pass_turn(k, to)
        out = self.results.pop(k)
        if isinstance(out, BaseException):
            raise out
        return out

    def meter_value(self, k: int) -> float:
        j = self.rows.index(k)
        if self._scores is not None:
            return self._scores[j].value()
        return 100.0 * self._top1[j].item() / max(self._seen, 1)

    # -- the stacked step --
    def _meet(self) -> None:
        """Every live member waits at a step: run it for those at the first one's (phase, epoch, batch)."""
        members = sorted(self.arrived)
        key = self.arrived[members[0]]
        lead = [k for k in members if self.arrived[k] == key]
        for k in members:
            if k not in lead:
                self.results[k] = RuntimeError(
                    f"stacked run {self.specs[k].hash} ({self.specs[k].label}) is out of step with its stack (at "
                    f"phase, epoch, batch {self.arrived[k]}; the stack at {key}): it resumed from another state; "
                    "the next train stage resumes it")
        try:
            losses, logits = self._stacked_step(lead, key)
            for k in lead:
                j = self.rows.index(k)
                self.results[k] = (losses[j], logits[j])
        except Exception as e:  # noqa: BLE001 (the stacked computation failed: every member in it fails)
            for k in lead:
                err = RuntimeError(f"the stacked step of {len(lead)} runs failed: {type(e).__name__}: {e}")
                err.__cause__ = e
                self.results[k] = err
        self.arrived.clear()

    def _stacked_step(self, members: list[int], key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        i = key[2]
        if i == 0:  # an epoch starts: the members' state (their own modules now) stacked, their plans side by side
            self.rows = list(members)
            self.stacked = StackedPhase([self.phases[k] for k in members], self)
            self.epoch = tuple(torch.stack(t) for t in zip(*(self.plans[k] for k in members)))
            device = self.epoch[3].device
            self._top1 = torch.zeros(len(members), dtype=torch.long, device=device)
            self._finite = torch.ones(len(members), dtype=torch.bool, device=device)
            self._seen = 0
            self._scores = None if self.epoch[3].dim() == 2 else [self.task.meter(device) for _ in members]
        elif not set(members) <= set(self.rows):
            raise RuntimeError(f"members {sorted(set(members) - set(self.rows))} joined the stack mid-epoch")
        bs = self.position[self.rows[0]][4]
        x, y = self.data.stacked_batch(self.epoch, i * bs, (i + 1) * bs)
        losses, logits = self.stacked.step(x, y)
        if self._scores is None:  # single-label: correct top-1 per member, on the device
            self._top1 += (logits.argmax(-1) == y).sum(-1)
            self._seen += y.shape[1]
        else:  # multi-label (mAP of the epoch): the task's own meter per member
            for j, m in enumerate(self._scores):
                m.add(logits[j], y[j])
        self._finite &= torch.isfinite(losses)
        if i == self.position[self.rows[0]][3] - 1:  # the epoch's last step: each member's own modules take over
            self.stacked.scatter([k in self.live for k in self.rows])
            self._note_divergence()
        return losses, logits

    def _note_divergence(self) -> None:
        for j, finite in enumerate(self._finite.tolist()):  # one host sync per epoch
            k = self.rows[j]
            if not finite and k not in self.diverged and k in self.live:
                self.diverged.add(k)
                log.warning("stacked run %s (%s) diverged (non-finite training loss): isolated, it ends as it would "
                            "alone; the other %d runs of its stack go on", self.specs[k].hash, self.specs[k].label,
                            len(self.rows) - 1)

"""The engine's optimizer: torch.optim.SGD, fused on CUDA, with the two repairs the fused kernel
and a cross-device resume need.

**A step where some parameters have a momentum buffer and others not.** torch's fused SGD kernel
(``torch._fused_sgd_``) takes one flag for the whole step: either every buffer is new
(``is_first_step``) or every buffer exists; a mix fails (``expected Tensor ... but got NoneType``).
The mix is a normal state of one SGD over several parts that start moving at different times:
l2l's incremental reading with mutual steps and ``optimizer_state: keep`` gives a new split's
student head its first update while the student blocks carry momentum. Before each step the
missing buffers of the parameters about to move are created as zeros (:func:`fill_momentum`).
That is exact: SGD's first momentum step sets ``buf = d_p`` (the gradient with weight decay
added), and from a zero buffer the regular rule gives ``buf = momentum * 0 + (1 - dampening) *
d_p = d_p`` with dampening 0, the only value the engine uses (checked). foreach, the other
multi-tensor path, handles the mix itself but launches several kernels per step where fused
launches one; on the launch-bound ResNets that is the cost to avoid.

**A checkpoint loaded on another device.** ``Optimizer.load_state_dict`` restores each parameter
group wholesale, implementation flags included, so a state saved on a GPU (``fused: True``) would
make a CPU resume fused, and a CPU state would make a GPU resume unfused. :func:`load_state`
keeps the flags the optimizer was built with on this device and loads everything else.
"""
from __future__ import annotations

from typing import Iterable

import torch

# parameter-group keys that say how a step is computed, not what it computes: never taken from a checkpoint
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def sgd(params: Iterable, lr: float, momentum: float, weight_decay: float, nesterov: bool,
        fused: bool) -> torch.optim.SGD:
    """SGD as the engine steps it; fused: torch's one-launch kernel (CUDA; on a CPU too, for the
    rehearsal of a CUDA run), else torch's default implementation for the device."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                          fused=True if fused else None)
    if fused:
        opt.register_step_pre_hook(fill_momentum)
    return opt


def fill_momentum(opt: torch.optim.Optimizer, args=(), kwargs=None) -> None:
    """Zero momentum buffers for the parameters about to step without one, when another parameter of
    their group has one (the fused kernel's mix; exact with dampening 0, see the module's docstring).
    A step where no parameter has a buffer is left to the kernel's own first step."""
    if len(opt.state) == sum(len(g["params"]) for g in opt.param_groups):
        return  # every parameter has stepped (has its buffer): the common case, O(1) per step
    for group in opt.param_groups:
        if not group.get("momentum"):
            continue
        moving = [p for p in group["params"] if p.grad is not None]
        missing = [p for p in moving if opt.state.get(p, {}).get("momentum_buffer") is None]  # no empty entries
        if not missing or len(missing) == len(moving):
            continue
        if group.get("dampening", 0) != 0:
            raise ValueError("fill_momentum: a zero momentum buffer equals SGD's first step only without dampening "
                             f"(dampening={group['dampening']})")
        for p in missing:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """opt.load_state_dict(state), keeping this optimizer's implementation flags (IMPLEMENTATION_KEYS)."""
    built = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, flags in zip(opt.param_groups, built):
        group.update(flags)

"""Optimizers over layer groups: an lr and weight decay per group, none on norms and biases.
The schedule (trainer/train/callbacks.py, ScheduleLR) owns the peak lrs and sets every step's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from trainer.models.layers import is_norm
from trainer.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")


def _no_decay_ids(module: nn.Module) -> set[int]:
    """Biases and every parameter of a norm layer: decaying them only hurts (fastai, timm)."""
    ids = set()
    for m in module.modules():
        if is_norm(m) or isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            ids |= {id(p) for p in m.parameters(recurse=False)}
    for name, p in module.named_parameters():
        if p.ndim <= 1 or name.endswith("bias"):
            ids.add(id(p))
    return ids


def param_groups(groups: Sequence[nn.Module], lrs: Sequence[float], wds: Sequence[float]) -> list[dict]:
    """Two torch param groups per layer group (decay / no decay), each marked with its
    `layer_group`; frozen params are left out. A parameter shared by two groups goes to the first."""
    seen: set[int] = set()
    out = []
    for i, (group, lr, wd) in enumerate(zip(groups, lrs, wds, strict=True)):
        skip = _no_decay_ids(group)
        decay, plain = [], []
        for p in group.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (plain if id(p) in skip else decay).append(p)
        for params, w in ((decay, wd), (plain, 0.0)):
            if params:
                out.append({"params": params, "lr": lr, "weight_decay": w, "layer_group": i})
    return out


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], momentum: float, betas, eps: float, nesterov: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=tuple(betas), eps=eps, foreach=True)


class SGDW(torch.optim.SGD):
    """SGD with momentum and decoupled weight decay (p -= lr * wd * p, apart from the gradient),
    so the decay does not grow with momentum and stays right under 1cycle's changing lr."""

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            if g["decoupled_wd"]:
                for p in g["params"]:
                    if p.grad is not None:
                        p.mul_(1 - g["lr"] * g["decoupled_wd"])
        return super().step(closure)


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], momentum: float, betas, eps: float, nesterov: bool = False) -> torch.optim.Optimizer:
    for g in groups:
        g["decoupled_wd"], g["weight_decay"] = g["weight_decay"], 0.0
    return SGDW(groups, momentum=momentum, nesterov=nesterov, foreach=True)


# foreach=True everywhere: torch picks it by itself only on GPUs, and on the CPU its fused
# multi-tensor ops beat the per-parameter loop with bitwise the same result (fused=True would
# be faster still, but rounds differently).


def create_optimizer(
    name: str, groups: list[dict], momentum: float = 0.9, betas=(0.9, 0.99), eps: float = 1e-5, nesterov: bool = False
) -> torch.optim.Optimizer:
    """nesterov: SGD's look-ahead momentum (the DAWNBench ResNet-9 recipe's); the config refuses
    it with adamw."""
    return OPTIMIZERS.get(name)(groups, momentum, betas, eps, nesterov=nesterov)


def set_momentum(opt: torch.optim.Optimizer, value: float) -> None:
    """Momentum for SGD, beta1 for Adam: the knob 1cycle turns opposite to the lr."""
    for g in opt.param_groups:
        if "betas" in g:
            g["betas"] = (value, g["betas"][1])
        elif "momentum" in g:
            g["momentum"] = value


def current_lr(opt: torch.optim.Optimizer) -> float:
    """The last layer group's lr: the one people quote (the head's)."""
    return opt.param_groups[-1]["lr"]

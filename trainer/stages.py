"""Stages of the playbook: freeze state, per-group lrs and weight decay, and the schedule."""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from trainer.config.schema import LrSpread, Stage
from trainer.models.layers import is_norm
from trainer.schedule import Schedule, constant_schedule, one_cycle, sgdr, sgdr_cycle_lengths, warmup_cosine


class StageError(ValueError):
    """A stage that cannot apply to this model (e.g. 4 lrs for 3 layer groups)."""


def expand_stages(stages: Sequence[Stage]) -> list[Stage]:
    """fine_tune becomes two stages: frozen 1cycle at lr, then unfrozen at [lr/ratio .. lr]/2."""
    out = []
    for st in stages:
        if st.fine_tune is None:
            out.append(st)
            continue
        ft = st.fine_tune
        base = st.model_copy(update={"fine_tune": None})
        lr = st.lr if isinstance(st.lr, float) else None
        if lr is None:
            raise StageError(f"stage '{st.name}': fine_tune needs a single number for lr")
        out.append(base.model_copy(update={"name": f"{st.name}-frozen", "epochs": ft.freeze_epochs,
                                           "freeze": "body", "pct_start": 0.99}))
        out.append(base.model_copy(update={"name": st.name, "unfreeze": True, "freeze": None,
                                           "lr": LrSpread(max=lr / 2, ratio=ft.ratio ** 0.5)}))
    return out


def freeze_points(stages: Sequence[Stage], n_groups: int) -> list[int]:
    """For each stage, the first trainable group (0: all train). Unset means as before."""
    points, current = [], 0
    for st in stages:
        if st.unfreeze or st.freeze == "none":
            current = 0
        if st.freeze == "body":
            current = n_groups - 1
        if st.freeze_to is not None:
            if st.freeze_to >= n_groups:
                raise StageError(f"stage '{st.name}': freeze_to {st.freeze_to} but the model has "
                                 f"{n_groups} layer groups (0..{n_groups - 1})")
            current = st.freeze_to
        points.append(current)
    return points


def apply_freeze(groups: Sequence[nn.Module], freeze_to: int, train_bn: bool = False) -> list[nn.Module]:
    """requires_grad off for groups before freeze_to; returns the frozen groups. With train_bn
    (as fastai's train_bn), the batch-norm layers of frozen groups keep training: their
    scale and shift here, their running statistics in FreezeNorms."""
    for i, g in enumerate(groups):
        for p in g.parameters():
            p.requires_grad_(i >= freeze_to)
        if train_bn and i < freeze_to:
            for m in g.modules():
                if is_norm(m):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(True)
    return list(groups[:freeze_to])


def is_auto(lr) -> bool:
    """lr: auto or {max: auto, ratio}: lr_find picks the rate at the start of the stage."""
    return lr == "auto" or (isinstance(lr, LrSpread) and lr.max == "auto")


def per_group(value, n_groups: int, what: str, stage: str) -> list[float]:
    """One number for every group, a list with one per group, or a spread {max, ratio}.
    An automatic lr gives the shape only (the last group at 1.0); lr_find scales it."""
    if value == "auto":
        return [1.0] * n_groups
    if isinstance(value, LrSpread):
        top = 1.0 if value.max == "auto" else value.max
        return [top / value.ratio ** (n_groups - 1 - i) for i in range(n_groups)]
    if isinstance(value, (list, tuple)):
        if len(value) != n_groups:
            raise StageError(f"stage '{stage}': {what} lists {len(value)} values but the model has "
                             f"{n_groups} layer groups")
        return [float(v) for v in value]
    return [float(value)] * n_groups


def stage_schedule(st: Stage) -> Schedule:
    if st.schedule == "one_cycle":
        return one_cycle(st.pct_start, st.div, st.div_final, st.moms)
    if st.schedule == "sgdr":
        return sgdr(cycle_lengths(st))
    if st.schedule == "warmup_cosine":
        return warmup_cosine(st.warmup_pct)
    return constant_schedule()


def cycle_lengths(st: Stage) -> list[int]:
    if st.n_cycles is not None:
        return sgdr_cycle_lengths(st.n_cycles, st.cycle_len, st.cycle_mult)
    n, lengths = st.epochs, []
    while sum(lengths) < n:  # epochs given instead of cycles: fill with cycles, cut the last
        lengths.append(min(st.cycle_len * st.cycle_mult ** len(lengths), n - sum(lengths)))
    return lengths


def cycle_ends(st: Stage) -> list[int]:
    """Epoch numbers (1-based, within the stage) at which SGDR cycles end."""
    ends, total = [], 0
    for c in cycle_lengths(st):
        total += c
        ends.append(total)
    return ends

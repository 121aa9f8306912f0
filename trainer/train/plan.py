"""The stage plan: the config's stages resolved once into plain objects (epochs, size, batch size,
per-group lrs and weight decays, freeze point, schedule, precompute, cycles to save, lr to be
found). This module is the only code that reads a stage's settings or falls back from a stage to
the config (`stage.bs or data.bs`); everything downstream reads the plan.

Two steps, because the model's layer groups are known only once the model exists, and the model
needs the data: `outline(cfg)` is what the data and the model need first (sizes, batch sizes,
epochs); `make_plan(cfg, n_groups)` adds what depends on the layer groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch.nn as nn

from trainer.config.schema import Config, LrSpread, Stage
from trainer.models import check_model, one_size_only
from trainer.models.layers import is_norm
from trainer.train.mixing import check_mixing
from trainer.train.schedule import Schedule, constant_schedule, one_cycle, sgdr, sgdr_cycle_lengths, warmup_cosine


class StageError(ValueError):
    """A stage that cannot apply to this model (e.g. 4 lrs for 3 layer groups)."""


@dataclass(frozen=True)
class Outline:
    """The stages as the data and the model need them, before the model exists."""

    names: tuple[str, ...]
    epochs: tuple[int, ...]
    sizes: tuple[int | None, ...]  # per stage; None: the size the images are decoded at
    batch_sizes: tuple[int, ...]

    @property
    def image_sizes(self) -> tuple[int, ...]:
        """The sizes stages ask for, in order (the images are decoded once, at the largest)."""
        return tuple(s for s in self.sizes if s)

    @property
    def first_size(self) -> int | None:
        return self.image_sizes[0] if self.image_sizes else None

    @property
    def last_size(self) -> int | None:
        """The size the run ends at (what predict, TTA and export use), when a stage sets one."""
        return self.image_sizes[-1] if self.image_sizes else None


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    epochs: int
    first_epoch: int  # epochs of the stages before it (metrics.csv counts over the run)
    size: int | None  # image size; None: the size the images are decoded at
    bs: int
    lrs: tuple[float, ...]  # peak lr per layer group; with find_lr, the shape (last group 1.0)
    wds: tuple[float, ...]  # weight decay per layer group
    freeze_to: int  # the first trainable layer group (0: all train)
    train_bn: bool
    bn_freeze: bool
    schedule_name: str
    schedule: Schedule
    precompute: bool
    cycle_ends: tuple[int, ...]  # SGDR cycles ending at these epochs (1-based) are saved; () for none
    first_cycle: int  # the number of this stage's first saved cycle (cycle-<k>.pt)
    new_size: bool  # its image size differs from the stage before: best.pt starts again
    find_lr: bool  # lr: auto: lr_find picks the peak lr at the start of the stage
    found_lr: float | None = None

    def with_found_lr(self, lr: float) -> StagePlan:
        """The stage with lr_find's recommendation as the peak lr (the groups keep their ratios)."""
        return replace(self, lrs=tuple(x * lr for x in self.lrs), found_lr=lr)

    def describe(self, n_stages: int) -> str:
        return (
            f"stage {self.index + 1}/{n_stages} '{self.name}': {self.epochs} epoch(s), {self.schedule_name}, "
            f"first trainable group {self.freeze_to}"
        )


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]

    @property
    def names(self) -> list[str]:
        return [st.name for st in self.stages]

    def find(self, name: str | None) -> StagePlan:
        """A stage by name (the first when None)."""
        if name is None:
            return self.stages[0]
        if name not in self.names:
            raise StageError(f"no stage named '{name}' (stages: {', '.join(self.names)})")
        return self.stages[self.names.index(name)]


def outline(cfg: Config) -> Outline:
    stages = expand_stages(cfg.train.stages)
    return Outline(
        tuple(st.name for st in stages),
        tuple(st.total_epochs for st in stages),
        tuple(st.size for st in stages),
        tuple(st.bs or cfg.data.bs for st in stages),
    )


def make_plan(cfg: Config, n_groups: int) -> Plan:
    stages, out = expand_stages(cfg.train.stages), []
    freeze = freeze_points(stages, n_groups)
    sizes = [st.size or getattr(cfg.data, "size", None) for st in stages]  # what "a new size" compares
    first_epoch, first_cycle = 0, 1
    for k, st in enumerate(stages):
        wd = st.wd if st.wd is not None else cfg.train.wd
        saved = tuple(cycle_ends(st)) if st.save_cycles else ()
        out.append(
            StagePlan(
                index=k,
                name=st.name,
                epochs=st.total_epochs,
                first_epoch=first_epoch,
                size=st.size,
                bs=st.bs or cfg.data.bs,
                lrs=tuple(per_group(st.lr, n_groups, "lr", st.name)),
                wds=tuple(per_group(wd, n_groups, "wd", st.name)),
                freeze_to=freeze[k],
                train_bn=st.train_bn,
                bn_freeze=st.bn_freeze,
                schedule_name=st.schedule,
                schedule=stage_schedule(st),
                precompute=st.precompute,
                cycle_ends=saved,
                first_cycle=first_cycle,
                new_size=k > 0 and sizes[k] != sizes[k - 1],
                find_lr=is_auto(st.lr),
            )
        )
        first_epoch += st.total_epochs
        first_cycle += len(saved)
    return Plan(tuple(out))


def check_stages(cfg: Config) -> list[tuple[str, str]]:
    """Config check: an architecture built for one input size gets one size in every stage."""
    sizes = sorted(
        {st.size or getattr(cfg.data, "size", None) for st in cfg.train.stages}, key=lambda s: (s is not None, s or 0)
    )  # None: the images' own size
    if one_size_only(cfg.model.arch) and len(sizes) > 1:
        return [
            (
                "train.stages",
                f"'{cfg.model.arch}' is built for one input size, but the stages use sizes "
                f"{', '.join(str(s or 'native') for s in sizes)}; give every stage the same size",
            )
        ]
    return []


# The domain rules a config is checked against before any work (trainer check, fit, ...).
CONFIG_CHECKS = (check_model, check_stages, check_mixing)


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
        out.append(
            base.model_copy(
                update={"name": f"{st.name}-frozen", "epochs": ft.freeze_epochs, "freeze": "body", "pct_start": 0.99}
            )
        )
        out.append(
            base.model_copy(
                update={
                    "name": st.name,
                    "unfreeze": True,
                    "freeze": None,
                    "lr": LrSpread(max=lr / 2, ratio=ft.ratio**0.5),
                }
            )
        )
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
                raise StageError(
                    f"stage '{st.name}': freeze_to {st.freeze_to} but the model has "
                    f"{n_groups} layer groups (0..{n_groups - 1})"
                )
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
        try:
            spread = [top / value.ratio ** (n_groups - 1 - i) for i in range(n_groups)]
        except (OverflowError, ZeroDivisionError):
            spread = [math.inf]
        if not all(0 < v < math.inf for v in spread):
            raise StageError(
                f"stage '{stage}': {what} {{max: {top:g}, ratio: {value.ratio:g}}} over {n_groups} layer "
                "groups gives rates that are not finite positive numbers; choose a smaller ratio"
            )
        return spread
    if isinstance(value, (list, tuple)):
        if len(value) != n_groups:
            raise StageError(
                f"stage '{stage}': {what} lists {len(value)} values but the model has {n_groups} layer groups"
            )
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

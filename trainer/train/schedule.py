"""Schedules as pure functions of training progress (pos in [0, 1]).

An annealer maps (start, end, pos) to a value; `combine` glues annealers over fractions of
training. 1cycle, SGDR and warmup+cosine are built from them, as in fastai's schedule.py.
Learning-rate schedules return a factor of the peak rate so one schedule serves every
layer group (differential learning rates scale the peak, not the shape).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Annealer = Callable[[float, float, float], float]
Sched = Callable[[float], float]


def anneal_cos(start: float, end: float, pos: float) -> float:
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def anneal_linear(start: float, end: float, pos: float) -> float:
    return start + pos * (end - start)


def anneal_exp(start: float, end: float, pos: float) -> float:
    return start * (end / start) ** pos


def constant(value: float = 1.0) -> Sched:
    return lambda pos: value


def annealed(fn: Annealer, start: float, end: float) -> Sched:
    return lambda pos: fn(start, end, pos)


def combine(pcts: Sequence[float], scheds: Sequence[Sched]) -> Sched:
    """Runs scheds[i] over the fraction pcts[i] of training; each sees its own 0..1 progress."""
    if abs(sum(pcts) - 1) > 1e-9:
        raise ValueError(f"fractions must add up to 1, got {sum(pcts)}")
    edges = [0.0]
    for p in pcts:
        edges.append(edges[-1] + p)

    def sched(pos: float) -> float:
        pos = min(max(pos, 0.0), 1.0)
        for i, s in enumerate(scheds):
            lo, hi = edges[i], edges[i + 1]
            if pos < hi or i == len(scheds) - 1:
                return s((pos - lo) / (hi - lo) if hi > lo else 1.0)
        raise AssertionError("unreachable")

    return sched


@dataclass(frozen=True)
class Schedule:
    """lr: factor of each group's peak rate; mom: momentum / beta1, or None to leave it."""

    lr: Sched
    mom: Sched | None = None


def one_cycle(
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e4,
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95),
) -> Schedule:
    """Cosine warm-up from 1/div to 1, then cosine down to 1/(div*div_final); momentum mirrors it."""
    pcts = [pct_start, 1 - pct_start]
    lr = combine(pcts, [annealed(anneal_cos, 1 / div, 1.0), annealed(anneal_cos, 1.0, 1 / (div * div_final))])
    mom = combine(pcts, [annealed(anneal_cos, moms[0], moms[1]), annealed(anneal_cos, moms[1], moms[2])])
    return Schedule(lr, mom)


def sgdr_cycle_lengths(n_cycles: int, cycle_len: int, cycle_mult: int) -> list[int]:
    """Epochs per cycle: 3 cycles of length 1 with mult 2 gives [1, 2, 4] (7 epochs)."""
    return [cycle_len * cycle_mult**k for k in range(n_cycles)]


def sgdr(cycle_lengths: Sequence[int]) -> Schedule:
    """Cosine from the peak to zero within each cycle, restarting at the peak (warm restarts)."""
    total = sum(cycle_lengths)
    return Schedule(
        combine([c / total for c in cycle_lengths], [annealed(anneal_cos, 1.0, 0.0) for _ in cycle_lengths])
    )


def warmup_cosine(warmup_pct: float = 0.1) -> Schedule:
    if warmup_pct == 0:
        return Schedule(annealed(anneal_cos, 1.0, 0.0))
    return Schedule(
        combine([warmup_pct, 1 - warmup_pct], [annealed(anneal_linear, 0.0, 1.0), annealed(anneal_cos, 1.0, 0.0)])
    )


def constant_schedule() -> Schedule:
    return Schedule(constant(1.0))


def exponential_ramp(start: float, end: float) -> Sched:
    """lr_find's ramp: absolute rates growing geometrically from start to end."""
    return annealed(anneal_exp, start, end)

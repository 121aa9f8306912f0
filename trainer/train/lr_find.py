"""lr_find: Leslie Smith's learning-rate range test, as in fastai, without fastai's weak spots.

Train for up to num_it batches while the lr grows exponentially from start_lr to end_lr; watch
a bias-corrected moving average of the loss (beta 0.98); stop once it exceeds 4x its best or the
loss is not finite. Then put everything back exactly: weights, BatchNorm buffers, optimizer
state and hyper-parameters, train/eval modes, the loader's epoch and the random generators.

Differences from fastai, on purpose:
- the data order and the dropout masks come from a fixed seed, so the same model and data give
  the same curve and the same suggestion every time (fastai's varies from run to run);
- the optimizer state is restored too (fastai once let lr_find's momentum buffers leak into the
  training that followed), and each stage builds a fresh optimizer anyway.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from trainer.train.loop import Callback, CancelFit, Learner
from trainer.train.optim import current_lr
from trainer.train.randomness import rng_state, set_rng_state
from trainer.train.schedule import exponential_ramp

SUGGESTIONS = ("valley", "steep", "minimum")
RECOMMENDED = "valley"  # fastai's default since 2021: the most robust of the three


class LrFindError(RuntimeError):
    """No usable curve (e.g. the loss is not finite from the very first step)."""


@dataclass
class LrFindResult:
    lrs: list[float]  # the last layer group's lr at each step (the one people quote)
    losses: list[float]  # raw training loss at each step
    smoothed: list[float]  # bias-corrected moving average of the loss
    stopped: str  # "num_it", "diverged" (4x the best) or "not finite"
    suggestions: dict[str, float] = field(default_factory=dict)
    recommended: str = RECOMMENDED

    @property
    def lr(self) -> float:
        """The recommended learning rate."""
        return self.suggestions[self.recommended]

    def rows(self) -> list[dict]:
        return [
            {"step": i, "lr": lr, "loss": loss, "smoothed_loss": sm}
            for i, (lr, loss, sm) in enumerate(zip(self.lrs, self.losses, self.smoothed, strict=True))
        ]

    def summary(self) -> str:
        parts = [
            f"{k} {v:.3g}" + (" (recommended)" if k == self.recommended else "") for k, v in self.suggestions.items()
        ]
        return f"lr_find over {len(self.lrs)} steps (stopped: {self.stopped}): " + ", ".join(parts)


class LrFinder(Callback):
    """Sets the lr of every group each batch (keeping the groups' ratios, so differential lrs
    stay differential), records the loss, and stops the fit when the test is over."""

    def __init__(self, start_lr: float, end_lr: float, num_it: int, beta: float = 0.98, stop_div: float = 4.0):
        self.ramp = exponential_ramp(start_lr, end_lr)
        self.num_it, self.beta, self.stop_div = num_it, beta, stop_div
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.avg, self.best, self.stopped = 0.0, math.inf, "num_it"

    def before_fit(self, learn: Learner) -> None:
        lrs = [g["lr"] for g in learn.opt.param_groups]  # the stage's lrs: their ratios are kept
        self.ratios = [lr / lrs[-1] for lr in lrs]

    def before_batch(self, learn: Learner) -> None:
        i = len(self.losses)
        lr = self.ramp(i / max(1, self.num_it - 1))
        for g, r in zip(learn.opt.param_groups, self.ratios, strict=True):
            g["lr"] = lr * r

    def after_loss(self, learn: Learner) -> None:
        if not math.isfinite(learn.state.loss):
            self.stopped = "not finite"
            raise CancelFit()  # before backward: a NaN never reaches the weights

    def after_batch(self, learn: Learner) -> None:
        loss = learn.state.loss
        self.lrs.append(current_lr(learn.opt))
        self.losses.append(loss)
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        smooth = self.avg / (1 - self.beta ** len(self.losses))
        self.smoothed.append(smooth)
        self.best = min(self.best, smooth)
        if smooth > self.stop_div * self.best:
            self.stopped = "diverged"
            raise CancelFit()
        if len(self.losses) >= self.num_it:
            raise CancelFit()


@contextmanager
def restored(learn: Learner):
    """Everything lr_find may touch, put back exactly afterwards (tensors are copied, not
    referenced: load_state_dict copies into the same parameter objects the optimizer holds)."""
    model, opt = learn.model, learn.opt
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    scaler = copy.deepcopy(learn.scaler.state_dict())
    rng, epoch = rng_state(), learn.train_dl.epoch
    try:
        yield
    finally:
        model.load_state_dict(weights)
        opt.load_state_dict(opt_state)
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
        if scaler:
            learn.scaler.load_state_dict(scaler)
        set_rng_state(rng)
        learn.train_dl.set_epoch(epoch)
        opt.zero_grad(set_to_none=True)


def check_range(start_lr: float, end_lr: float, num_it: int) -> None:
    if not 0 < start_lr < end_lr < math.inf:
        raise ValueError(f"lr_find: need 0 < start lr < end lr, both finite, got {start_lr:g} and {end_lr:g}")
    if num_it < 2:
        raise ValueError(f"lr_find: the number of iterations must be at least 2, got {num_it}")


def lr_find(
    learn: Learner,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    seed: int = 0,
    beta: float = 0.98,
    stop_div: float = 4.0,
) -> LrFindResult:
    """Runs the range test on a learner's model, optimizer and training data, with the callbacks
    that are part of its training step (freezing, clipping, accumulation), and leaves all of them
    as they were."""
    check_range(start_lr, end_lr, num_it)
    finder = LrFinder(start_lr, end_lr, num_it, beta, stop_div)
    keep = [c for c in learn.callbacks if c.in_step]
    probe = Learner(
        learn.model, learn.opt, learn.task, learn.train_dl, None, [*keep, finder], learn.precision, learn.device
    )
    with restored(learn):
        torch.manual_seed(seed)  # same dropout masks every time; the data order is seeded already
        probe.fit(math.ceil(num_it / max(1, len(learn.train_dl))))
    if not finder.losses:
        raise LrFindError(
            f"lr_find: the loss is not finite from the first step (lr {start_lr:.3g}); "
            "try a lower --start-lr, or check the data and the model"
        )
    result = LrFindResult(finder.lrs, finder.losses, finder.smoothed, finder.stopped)
    result.suggestions = suggest(result.lrs, result.smoothed, num_it)
    return result


def _trim(lrs: list[float], losses: list[float], num_it: int) -> tuple[list[float], list[float]]:
    """As fastai: drop the first tenth (the average is still settling) and the last 5 points
    (the blow-up), unless that leaves too little of a short curve."""
    lo, hi = num_it // 10, len(lrs) - 5
    if hi - lo >= 3:
        return lrs[lo:hi], losses[lo:hi]
    return lrs, losses


def suggest(lrs: list[float], losses: list[float], num_it: int | None = None) -> dict[str, float]:
    """valley (fastai's longest-valley rule), steep (the steepest descent against log lr) and
    minimum (the lr of the lowest loss, divided by 10)."""
    xs, ys = _trim(lrs, losses, num_it if num_it is not None else len(lrs))
    out = {"valley": valley(xs, ys)}
    if len(xs) > 1:
        slopes = [(ys[i + 1] - ys[i]) / (math.log(xs[i + 1]) - math.log(xs[i])) for i in range(len(xs) - 1)]
        out["steep"] = xs[min(range(len(slopes)), key=slopes.__getitem__)]
    else:
        out["steep"] = xs[0]
    out["minimum"] = xs[min(range(len(ys)), key=ys.__getitem__)] / 10
    return out


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's rule: find the longest stretch over which the loss keeps falling (a longest
    decreasing subsequence), then take the point about half-way along it (start + len/3 + len/6)."""
    n = len(losses)
    lds = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[end] < lds[i]:
                end = i
                start = end - lds[end]
    sections = (end - start) / 3
    return lrs[min(n - 1, start + int(sections) + int(sections / 2))]

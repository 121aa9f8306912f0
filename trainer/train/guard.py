"""The non-finite guard: a NaN or infinite loss or gradient stops the run with a message that
names the step (train.on_nan: stop), or the step is skipped and counted (skip)."""

from __future__ import annotations

import math

import torch

from trainer.train.loop import Callback, Learner, SkipStep
from trainer.train.optim import current_lr


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN or infinite; the message says where."""


def grad_norm_sum(opt: torch.optim.Optimizer) -> torch.Tensor | None:
    """The sum of the gradients' norms (finite exactly when every gradient is), in one fused call."""
    grads = [p.grad.detach() for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).sum() if grads else None


class NonFiniteGuard(Callback):
    """Stops at a NaN/inf loss or gradient (naming the step, lr and last good loss), or skips it.

    check_every 1 looks at every step before the optimizer steps (a GPU sync per step). On a GPU
    with on_nan: stop the run uses a larger check_every: the flags stay on the device and
    are read every N steps and at the end of each epoch, and the error names the first bad step.
    The steps in between have run on bad numbers, but the run stops and the Checkpointer never
    writes non-finite weights, so nothing bad is kept. on_nan: skip must decide before each
    step, so it always checks every step."""

    def __init__(self, mode: str = "stop", check_every: int = 1):
        self.mode = mode
        self.check_every = 1 if mode == "skip" else max(1, check_every)
        self._last_t: torch.Tensor | None = None  # the last finite loss, where the model is
        self._last_base = math.nan
        self._first_bad: torch.Tensor | None = None  # deferred: (step, what) of the first bad step, -1 if none

    @property
    def last_finite(self) -> float:
        return self._last_base if self._last_t is None else float(self._last_t)

    @last_finite.setter
    def last_finite(self, value: float) -> None:
        self._last_base, self._last_t = float(value), None

    def _bad(self, learn: Learner, what: str) -> None:
        s = learn.state
        if self.mode == "skip":
            raise SkipStep()
        raise TrainingDiverged(
            f"{what} is not finite at epoch {s.epoch + 1}, batch {s.batch + 1} "
            f"(step {s.step + 1} of {s.total_steps}), lr {current_lr(learn.opt):.3g}; "
            f"last finite loss {self.last_finite:.4g}. Try a lower lr, train.clip, "
            "or train.on_nan: skip"
        )

    def after_loss(self, learn: Learner) -> None:
        if self.check_every == 1 and not math.isfinite(learn.state.loss):
            self._bad(learn, "the loss")

    def after_backward(self, learn: Learner) -> None:
        norm = grad_norm_sum(learn.opt)
        if self.check_every > 1:
            self._defer(learn, learn.state.loss_t, norm)
            return
        if norm is not None and not bool(torch.isfinite(norm)):
            if learn.scaler.is_enabled():
                return  # fp16: the scaler skips this step and lowers its scale itself
            self._bad(learn, "the gradient norm")
        self._last_t = learn.state.loss_t  # a tensor: read only when a message or checkpoint needs it

    def _defer(self, learn: Learner, loss_t: torch.Tensor, norm: torch.Tensor | None) -> None:
        """Device-side bookkeeping, no sync: remember the first bad step and the last good loss."""
        loss_bad = ~torch.isfinite(loss_t)
        grad_bad = torch.zeros_like(loss_bad) if norm is None or learn.scaler.is_enabled() else ~torch.isfinite(norm)
        bad = loss_bad | grad_bad
        if self._first_bad is None:
            self._first_bad = torch.full((2,), -1, dtype=torch.long, device=loss_t.device)
        kind = (grad_bad & ~loss_bad).long()  # 1: the gradient, 0: the loss
        here = torch.stack([torch.full_like(kind, learn.state.step), kind])
        self._first_bad = torch.where(bad & (self._first_bad[0] < 0), here, self._first_bad)
        last = self._last_t if self._last_t is not None else torch.tensor(self._last_base, device=loss_t.device)
        self._last_t = torch.where(bad, last.to(loss_t.dtype), loss_t)

    def after_batch(self, learn: Learner) -> None:
        if self.check_every > 1 and learn.state.step % self.check_every == 0:
            self.check(learn)

    def before_validate(self, learn: Learner) -> None:
        self.check(learn)

    def check(self, learn: Learner) -> None:
        """Reads the deferred flags (one sync) and stops if a step went bad."""
        if self._first_bad is None:
            return
        step, grad = self._first_bad.tolist()
        if step < 0:
            return
        self._first_bad = None
        s = learn.state
        what = "the gradient norm" if grad else "the loss"
        epoch, batch = divmod(step, max(1, s.n_batches))
        raise TrainingDiverged(
            f"{what} is not finite at epoch {epoch + 1}, batch {batch + 1} "
            f"(step {step + 1} of {s.total_steps}; seen at step {s.step}), lr at detection "
            f"{current_lr(learn.opt):.3g}; last finite loss {self.last_finite:.4g}. "
            "Try a lower lr, train.clip, or train.on_nan: skip"
        )

    def state_dict(self) -> dict:
        return {"last_finite": self.last_finite}

    def load_state_dict(self, state: dict) -> None:
        self.last_finite = state["last_finite"]


def guard_every(device: torch.device) -> int:
    """Steps between reads of the non-finite guard's flags: every step on the CPU (reading is
    free there), every 50 on a GPU (each read waits for the GPU)."""
    return 1 if device.type == "cpu" else 50


class LossCheck(Callback):
    """A smoke run's check that the pipeline trains: it stops where the loss is not finite (whatever
    train.on_nan says) or has grown past `factor` times the stage's first loss."""

    def __init__(self, stage: str, factor: float = 10.0):
        self.stage, self.factor, self.first = stage, factor, None

    def after_batch(self, learn: Learner) -> None:
        s, loss = learn.state, learn.state.loss
        where = f"stage '{self.stage}', epoch {s.epoch + 1}, batch {s.batch + 1}, lr {current_lr(learn.opt):.3g}"
        if not math.isfinite(loss):
            raise TrainingDiverged(f"smoke run: the loss is not finite at {where}; try a lower lr or train.clip")
        if self.first is None:
            self.first = loss
        elif loss > self.factor * self.first:
            raise TrainingDiverged(
                f"smoke run: the loss grew from {self.first:.4g} to {loss:.4g} ({self.factor:g}x "
                f"the first) at {where}; the pipeline runs but does not train: try a lower lr"
            )

"""Callbacks: the schedule, the recorder, freezing, clipping, the non-finite guard, checkpoints."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from trainer import checkpoint
from trainer.distributed import unwrap
from trainer.loop import Callback, CancelFit, Learner, SkipStep
from trainer.models.layers import is_norm
from trainer.optim import set_momentum
from trainer.rundir import RunDir
from trainer.schedule import Schedule


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN or infinite; the message says where."""


class ScheduleLR(Callback):
    """Sets every group's lr to its peak times the schedule's factor at this point of training."""

    order = -10

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def before_batch(self, learn: Learner) -> None:
        pos = learn.state.progress
        factor = self.schedule.lr(pos)
        for g in learn.opt.param_groups:
            g["lr"] = g["peak_lr"] * factor
        if self.schedule.mom is not None:
            set_momentum(learn.opt, self.schedule.mom(pos))


def current_lr(opt: torch.optim.Optimizer) -> float:
    """The last layer group's lr: the one people quote (the head's)."""
    return opt.param_groups[-1]["lr"]


def current_mom(opt: torch.optim.Optimizer) -> float:
    g = opt.param_groups[-1]
    return g["betas"][0] if "betas" in g else g.get("momentum", 0.0)


class Recorder(Callback):
    """Per-step lr, momentum and loss; per-epoch rows of metrics.csv."""

    order = 10

    def __init__(self, run: RunDir | None, stage: str, epoch_offset: int = 0, step_offset: int = 0,
                 steps: list[dict] | None = None):
        self.run, self.stage = run, stage
        self.epoch_offset, self.step_offset = epoch_offset, step_offset
        self.steps: list[dict] = steps if steps is not None else []  # shared: one list for a whole run
        self.extra: dict = {}  # more columns for this stage's rows (e.g. the lr lr_find chose)
        self._pending: list[int] = []  # rows whose loss is still a tensor

    def before_batch(self, learn: Learner) -> None:
        self._lr, self._mom = current_lr(learn.opt), current_mom(learn.opt)

    def after_batch(self, learn: Learner) -> None:
        s = learn.state
        # the loss stays a device tensor until flush(): one GPU sync per epoch, not per step
        self.steps.append({"stage": self.stage, "step": len(self.steps),  # steps of the whole run so far
                           "lr": self._lr, "mom": self._mom, "loss": s.loss_t})
        self._pending.append(len(self.steps) - 1)

    def flush(self) -> None:
        """Turns the recorded loss tensors into floats (in one transfer)."""
        if not self._pending:
            return
        values = torch.stack([self.steps[i]["loss"].float().cpu() for i in self._pending]).tolist()
        for i, v in zip(self._pending, values):
            self.steps[i]["loss"] = v
        self._pending = []

    def after_fit(self, learn: Learner) -> None:
        self.flush()

    def after_epoch(self, learn: Learner) -> None:
        self.flush()
        s = learn.state
        row = {"stage": self.stage, "epoch": self.epoch_offset + s.epoch + 1, "train_loss": s.train_loss,
               **{k: v for k, v in s.valid.items()}, "lr": self._last_lr(),
               "seconds": round(time.perf_counter() - s.epoch_start, 2), **self.extra}
        if s.skipped_steps:
            row["skipped_steps"] = s.skipped_steps  # train.on_nan: skip (steps skipped in this stage)
        learn.last_row = row
        if self.run is not None:
            self.run.add_metrics(row)

    def _last_lr(self) -> float:
        """The lr of the epoch's last step. From the shared record, not from this object: a run
        resumed from a checkpoint taken after the epoch's last batch runs no batch here."""
        if self.steps and self.steps[-1]["stage"] == self.stage:
            return self.steps[-1]["lr"]
        return getattr(self, "_lr", math.nan)

    # A resumed run continues the per-step record where the checkpoint left it.
    def state_dict(self) -> dict:
        self.flush()
        return {"steps": checkpoint.pack_rows(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self._pending = []
        self.steps[:] = checkpoint.unpack_rows(state["steps"])  # in place: the run's plots share this list


class FreezeNorms(Callback):
    """Keeps batch-norm layers of frozen groups (or all, with bn_freeze) in eval mode, so their
    running statistics stay exactly as they were (train_bn: true lets them update)."""

    order = -5

    def __init__(self, frozen: list[torch.nn.Module], train_bn: bool = False, bn_freeze: bool = False,
                 model: torch.nn.Module | None = None):
        self.modules = []
        if bn_freeze and model is not None:
            self.modules = [m for m in model.modules() if is_norm(m)]
        elif not train_bn:
            self.modules = [m for g in frozen for m in g.modules() if is_norm(m)]

    def before_epoch(self, learn: Learner) -> None:
        for m in self.modules:
            m.eval()


class ResetState(Callback):
    """Stateful models (the char RNNs) start every epoch, validation and prediction from a zero
    hidden state; models without `reset()` are left alone. A mid-epoch checkpoint holds the
    training streams' hidden state, so a resumed language-model run continues exactly."""

    order = -20
    per_rank = True  # several processes: each has its own streams, so its own hidden state in checkpoints

    def __init__(self):
        self._model, self._mid_epoch, self._carry = None, False, None

    @staticmethod
    def _stateful(learn: Learner):
        model = getattr(learn.model, "module", learn.model)  # DDP wraps the model
        return model if callable(getattr(model, "reset", None)) else None

    def before_epoch(self, learn: Learner) -> None:
        model = self._stateful(learn)
        if model is None:
            return
        model.reset()
        if self._carry is not None:  # resuming in the middle of this epoch
            device = next(model.parameters()).device
            h = [t.to(device) for t in self._carry]
            model.h = tuple(h) if len(h) > 1 else h[0]
            self._carry = None

    def after_batch(self, learn: Learner) -> None:
        self._model, self._mid_epoch = self._stateful(learn), True

    def before_validate(self, learn: Learner) -> None:
        self._mid_epoch = False  # an epoch-end checkpoint starts the next epoch from zero

    def before_outputs(self, learn: Learner) -> None:
        self._mid_epoch = False
        model = self._stateful(learn)
        if model is not None:
            model.reset()

    def state_dict(self) -> dict:
        h = getattr(self._model, "h", None) if self._mid_epoch else None
        if h is None:
            return {"hidden": []}
        return {"hidden": [t.detach().cpu().clone() for t in (h if isinstance(h, tuple) else (h,))]}

    def load_state_dict(self, state: dict) -> None:
        self._carry = list(state.get("hidden", [])) or None


class GradClip(Callback):
    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def after_backward(self, learn: Learner) -> None:
        params = [p for g in learn.opt.param_groups for p in g["params"]]
        learn.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)  # a tensor: read it to sync


def grad_norm_sum(opt: torch.optim.Optimizer) -> torch.Tensor | None:
    """The sum of the gradients' norms (finite exactly when every gradient is), in one fused call."""
    grads = [p.grad.detach() for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).sum() if grads else None


class NonFiniteGuard(Callback):
    """Stops at a NaN/inf loss or gradient (naming the step, lr and last good loss), or skips it.

    check_every 1 looks at every step before the optimizer steps (a GPU sync per step). On a GPU
    with on_nan: stop the pipeline uses a larger check_every: the flags stay on the device and
    are read every N steps and at the end of each epoch, and the error names the first bad step.
    The steps in between have run on bad numbers, but the run stops and the Checkpointer never
    writes non-finite weights, so nothing bad is kept. on_nan: skip must decide before each
    step, so it always checks every step."""

    order = 5

    def __init__(self, mode: str = "stop", check_every: int = 1):
        self.mode = mode
        self.check_every = 1 if mode == "skip" else max(1, check_every)
        self._last_t: torch.Tensor | None = None   # the last finite loss, where the model is
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
        raise TrainingDiverged(f"{what} is not finite at epoch {s.epoch + 1}, batch {s.batch + 1} "
                               f"(step {s.step + 1} of {s.total_steps}), lr {current_lr(learn.opt):.3g}; "
                               f"last finite loss {self.last_finite:.4g}. Try a lower lr, train.clip, "
                               "or train.on_nan: skip")

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
        raise TrainingDiverged(f"{what} is not finite at epoch {epoch + 1}, batch {batch + 1} "
                               f"(step {step + 1} of {s.total_steps}; seen at step {s.step}), lr at detection "
                               f"{current_lr(learn.opt):.3g}; last finite loss {self.last_finite:.4g}. "
                               "Try a lower lr, train.clip, or train.on_nan: skip")

    def state_dict(self) -> dict:
        return {"last_finite": self.last_finite}

    def load_state_dict(self, state: dict) -> None:
        self.last_finite = state["last_finite"]


class Checkpointer(Callback):
    """last.pt at every epoch end (and every N batches); best.pt only for a better, finite loss.
    Weights holding a NaN or an infinity are never written: the run stops instead, and the last
    good last.pt and best.pt stay as they were."""

    order = 20

    def __init__(self, run: RunDir, snapshot: Callable[[Learner, bool], dict], every: int | None = None,
                 best_so_far: float = math.inf):
        self.run, self.snapshot, self.every, self.best = run, snapshot, every, best_so_far

    def after_batch(self, learn: Learner) -> None:
        s = learn.state
        if self.every and (s.batch + 1) % self.every == 0 and s.batch + 1 < s.n_batches:
            self.save_last(learn)

    def after_epoch(self, learn: Learner) -> None:
        loss = learn.state.valid.get("valid_loss", math.nan)
        better = math.isfinite(loss) and loss < self.best
        if better:
            self.best = loss  # first, so that last.pt records the best loss it has seen
        state = self._checked(learn, True)
        if better:
            # best.pt before last.pt: a crash between them redoes this epoch and rewrites the same best
            self._save({**state, "best_valid_loss": loss}, "best.pt")
        self._save(state, "last.pt")

    def save_last(self, learn: Learner, epoch_end: bool = False) -> dict:
        """last.pt now (a signal asks for it at a step boundary)."""
        state = self._checked(learn, epoch_end)
        self._save(state, "last.pt")
        return state

    def _save(self, state: dict, name: str) -> None:
        if self.run.writes:  # every rank builds the state (a collective gathers the random states); rank 0 writes
            checkpoint.save(state, self.run.checkpoints / name)

    def _checked(self, learn: Learner, epoch_end: bool) -> dict:
        state = self.snapshot(learn, epoch_end)
        bad = checkpoint.non_finite(state["model"])
        if bad:
            s = learn.state
            raise TrainingDiverged(f"the weights are not finite ({', '.join(bad[:3])}) after epoch "
                                   f"{s.epoch + 1}, batch {s.batch + 1} (step {s.step} of {s.total_steps}), "
                                   f"lr {current_lr(learn.opt):.3g}; not saved: checkpoints/ keep the last good "
                                   "state. Try a lower lr or train.clip")
        return state

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = min(self.best, state["best"])


class StopAfter(Callback):
    """Ends the fit after n batches (smoke runs and tests)."""

    def __init__(self, n: int):
        self.n = n

    def after_batch(self, learn: Learner) -> None:
        if learn.state.step >= self.n:
            raise CancelFit()


class CycleSaver(Callback):
    """SGDR snapshots: the weights at the end of every cycle, checkpoints/cycle-<k>.pt, for a
    snapshot ensemble (`trainer predict RUN --ensemble cycles`). fastai's fit_sgdr kept none."""

    order = 20

    def __init__(self, run: RunDir, cycle_ends: list[int], first: int = 1, stage_index: int = 0):
        self.run, self.ends, self.first, self.stage_index = run, list(cycle_ends), first, stage_index
        self.saved: list[int] = []

    def after_epoch(self, learn: Learner) -> None:
        epoch = learn.state.epoch + 1
        if epoch in self.ends:
            k = self.first + self.ends.index(epoch)
            checkpoint.save({"model": unwrap(learn.model).state_dict(), "stage": self.stage_index, "epoch": epoch,
                             "cycle": k, "valid": dict(learn.state.valid)},
                            self.run.checkpoints / f"cycle-{k}.pt")
            self.saved.append(k)


class SaveThreshold(Callback):
    """Multi-label: writes threshold.json (the threshold chosen on the validation set) whenever
    the Checkpointer has just saved a new best.pt, so predict uses the threshold of that model."""

    order = 21  # after the Checkpointer

    def __init__(self, run: RunDir, checkpointer: Checkpointer):
        self.run, self.checkpointer = run, checkpointer

    def after_epoch(self, learn: Learner) -> None:
        v = learn.state.valid
        if "threshold" in v and v.get("valid_loss") == self.checkpointer.best:
            self.run.write_json("threshold.json", {"threshold": v["threshold"], "fbeta": v.get("fbeta"),
                                                   "epoch": getattr(learn, "last_row", {}).get("epoch")})

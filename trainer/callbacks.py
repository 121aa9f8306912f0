"""Callbacks: the schedule, the recorder, freezing, hidden state, clipping, checkpoints (the
non-finite guard is in trainer/guard.py)."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from trainer import checkpoint
from trainer.distributed import unwrap
from trainer.guard import TrainingDiverged
from trainer.loop import Callback, CancelFit, Learner
from trainer.models.layers import is_norm
from trainer.optim import current_lr, set_momentum
from trainer.rundir import RunDir
from trainer.schedule import Schedule


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

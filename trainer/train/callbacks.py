"""Callbacks of the training step: the schedule, the recorder, freezing, hidden state, clipping.
(The non-finite guard is in guard.py, the weight average in ema.py; the callbacks that write a
run's files are in trainer/run/.)"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from trainer.models.layers import is_norm
from trainer.storage import pack_rows, unpack_rows
from trainer.train.loop import Callback, CancelFit, Learner
from trainer.train.optim import current_lr, set_momentum
from trainer.train.schedule import Schedule


class ScheduleLR(Callback):
    """Sets every group's lr to its peak times the schedule's factor at this point of training.
    The peaks (one per layer group) are the stage plan's: this callback is their one holder."""

    def __init__(self, schedule: Schedule, peaks: Sequence[float]):
        self.schedule, self.peaks = schedule, tuple(peaks)

    def before_batch(self, learn: Learner) -> None:
        pos = learn.state.progress
        factor = self.schedule.lr(pos)
        for g in learn.opt.param_groups:
            g["lr"] = self.peaks[g["layer_group"]] * factor
        if self.schedule.mom is not None:
            set_momentum(learn.opt, self.schedule.mom(pos))


def current_mom(opt: torch.optim.Optimizer) -> float:
    g = opt.param_groups[-1]
    return g["betas"][0] if "betas" in g else g.get("momentum", 0.0)


class Recorder(Callback):
    """Per-step lr, momentum and loss; per-epoch rows of metrics.csv (handed to `on_row`) and the
    validation loss at each epoch's last step (`points`, for the plots)."""

    def __init__(
        self,
        stage: str,
        first_epoch: int = 0,
        steps: list[dict] | None = None,
        on_row: Callable[[dict], None] | None = None,
        extra: dict | None = None,
        points: list[tuple[int, float]] | None = None,
    ):
        self.stage, self.first_epoch, self.on_row = stage, first_epoch, on_row
        self.steps: list[dict] = steps if steps is not None else []  # shared: one list for a whole run
        self.points = points if points is not None else []  # shared too: (step, valid_loss) of every epoch
        self.extra = dict(extra or {})  # more columns for this stage's rows (e.g. the lr lr_find chose)
        self.last_row: dict = {}
        self._pending: list[int] = []  # rows whose loss is still a tensor

    def before_batch(self, learn: Learner) -> None:
        self._lr, self._mom = current_lr(learn.opt), current_mom(learn.opt)

    def after_batch(self, learn: Learner) -> None:
        s = learn.state
        # the loss stays a device tensor until flush(): one GPU sync per epoch, not per step
        self.steps.append(
            {
                "stage": self.stage,
                "step": len(self.steps),  # steps of the whole run so far
                "lr": self._lr,
                "mom": self._mom,
                "loss": s.loss_t,
            }
        )
        self._pending.append(len(self.steps) - 1)

    def flush(self) -> None:
        """Turns the recorded loss tensors into floats (in one transfer)."""
        if not self._pending:
            return
        values = torch.stack([self.steps[i]["loss"].float().cpu() for i in self._pending]).tolist()
        for i, v in zip(self._pending, values, strict=True):
            self.steps[i]["loss"] = v
        self._pending = []

    def after_fit(self, learn: Learner) -> None:
        self.flush()

    def after_epoch(self, learn: Learner) -> None:
        self.flush()
        s = learn.state
        row = {
            "stage": self.stage,
            "epoch": self.first_epoch + s.epoch + 1,
            "train_loss": s.train_loss,
            **{k: v for k, v in s.valid.items() if isinstance(v, (int, float))},  # a per-tag list is not a column
            "lr": self._last_lr(),
            "seconds": round(time.perf_counter() - s.epoch_start, 2),
            **self.extra,
        }
        if s.skipped_steps:
            row["skipped_steps"] = s.skipped_steps  # train.on_nan: skip (steps skipped in this stage)
        if "valid_loss" in s.valid and self.steps:
            self.points.append((self.steps[-1]["step"] + 1, s.valid["valid_loss"]))
        self.last_row = row
        if self.on_row is not None:
            self.on_row(row)

    def _last_lr(self) -> float:
        """The lr of the epoch's last step. From the shared record, not from this object: a run
        resumed from a checkpoint taken after the epoch's last batch runs no batch here."""
        if self.steps and self.steps[-1]["stage"] == self.stage:
            return self.steps[-1]["lr"]
        return getattr(self, "_lr", math.nan)

    # A resumed run continues the per-step record where the checkpoint left it.
    def state_dict(self) -> dict:
        self.flush()
        return {"steps": pack_rows(self.steps), "points": [list(p) for p in self.points]}

    def load_state_dict(self, state: dict) -> None:
        self._pending = []
        self.steps[:] = unpack_rows(state["steps"])  # in place: the run's plots share these lists
        self.points[:] = [tuple(p) for p in state.get("points", [])]


class FreezeNorms(Callback):
    """Keeps batch-norm layers of frozen groups (or all, with bn_freeze) in eval mode, so their
    running statistics stay exactly as they were (train_bn: true lets them update)."""

    in_step = True

    def __init__(
        self,
        frozen: list[torch.nn.Module],
        train_bn: bool = False,
        bn_freeze: bool = False,
        model: torch.nn.Module | None = None,
    ):
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
    training streams' hidden state, so a resumed language-model run continues exactly. With
    several processes each has its own streams, so its own hidden state in checkpoints."""

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
    in_step = True

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def after_backward(self, learn: Learner) -> None:
        params = [p for g in learn.opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


class StopAfter(Callback):
    """Ends the fit after n batches (tests and tools that need a few steps only)."""

    def __init__(self, n: int):
        self.n = n

    def after_batch(self, learn: Learner) -> None:
        if learn.state.step >= self.n:
            raise CancelFit()

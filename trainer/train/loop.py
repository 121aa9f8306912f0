"""One plain training loop with a handful of events; every feature is a callback.

Events, in order: before_fit, before_epoch, before_batch, after_loss, after_backward,
after_batch, before_validate, after_epoch, after_fit (and before_outputs before an evaluation
pass). A callback may raise CancelFit to stop cleanly (lr_find, a signal, a NaN guard). The
loop never sees YAML, paths or the CLI. `outputs` is the one evaluation loop: validation,
predict, TTA and precomputed activations all run through it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from trainer.train.precision import Precision
from trainer.train.tasks import Task


class CancelFit(Exception):
    """Stop training after the current step; after_fit still runs."""


class SkipStep(Exception):
    """Skip the optimizer step of this batch (a callback decided the gradient is bad)."""


class Callback:
    # Callbacks see each event in `order` (then in the order they were added). The run's own
    # callbacks take theirs from one table (trainer/run/learner.py); 0 is the middle of it.
    order = 0
    in_step = False  # part of the training step itself (freezing, clipping, accumulation): lr_find keeps it

    def __call__(self, event: str, learner: Learner) -> None:
        fn = getattr(self, event, None)
        if fn is not None:
            fn(learner)


@dataclass
class FitState:
    epoch: int = 0
    n_epochs: int = 0
    batch: int = 0  # index within the epoch
    n_batches: int = 0
    step: int = 0  # optimizer steps in this fit
    total_steps: int = 0
    loss_t: torch.Tensor | None = None  # this batch's loss, detached, where the model is
    epoch_loss_count: int = 0
    skipped_steps: int = 0
    epoch_start: float = 0.0
    valid: dict = field(default_factory=dict)

    # The epoch's loss sum stays on the device (float64, added in the same order as Python
    # floats would be, so the sum is bitwise the same) and is read only when asked for: no GPU
    # sync per batch. Reading `loss` or `epoch_loss_sum` is what syncs.
    _sum_base: float = 0.0
    _sum_t: torch.Tensor | None = None

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)

    @property
    def loss(self) -> float:
        return math.nan if self.loss_t is None else float(self.loss_t)

    @loss.setter
    def loss(self, value: float) -> None:
        # stays where the model is: the NaN guard and the epoch's sum combine it with device tensors
        device = self.loss_t.device if self.loss_t is not None else None
        self.loss_t = torch.tensor(float(value), device=device)

    @property
    def epoch_loss_sum(self) -> float:
        return self._sum_base if self._sum_t is None else float(self._sum_t)

    @epoch_loss_sum.setter
    def epoch_loss_sum(self, value: float) -> None:
        self._sum_base, self._sum_t = float(value), None

    def add_loss(self, loss: torch.Tensor) -> None:
        if self._sum_t is None:  # starts from the restored sum, so a resumed epoch adds in the same order
            dtype = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
            self._sum_t = torch.tensor(self._sum_base, dtype=dtype, device=loss.device)
        self._sum_t += loss.to(self._sum_t.dtype)
        self.epoch_loss_count += 1

    @property
    def train_loss(self) -> float:
        """The epoch's mean loss; NaN when no step counted (every one skipped as non-finite)."""
        if self.epoch_loss_count == 0:
            return math.nan
        return self.epoch_loss_sum / self.epoch_loss_count


class Learner:
    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        task: Task,
        train_dl,
        valid_dl,
        callbacks: Iterable[Callback] = (),
        precision: Precision | None = None,
        device: torch.device = torch.device("cpu"),
    ):
        self.model, self.opt, self.task = model, opt, task
        self.train_dl, self.valid_dl = train_dl, valid_dl
        self.callbacks = sorted(callbacks, key=lambda c: c.order)
        self.precision = precision or Precision(device.type, None)
        self.scaler = self.precision.scaler()
        self.device = device
        self.state = FitState()
        self.xb = self.yb = self.out = self.loss_t = None

    def event(self, name: str) -> None:
        for cb in self.callbacks:
            cb(name, self)

    def add(self, cb: Callback) -> None:
        self.callbacks = sorted([*self.callbacks, cb], key=lambda c: c.order)

    def fit(self, n_epochs: int, start_epoch: int = 0, start_batch: int = 0) -> FitState:
        s = self.state
        s.n_epochs, s.n_batches = n_epochs, len(self.train_dl)
        s.total_steps = n_epochs * s.n_batches
        s.step = start_epoch * s.n_batches + start_batch
        try:
            self.event("before_fit")
            for epoch in range(start_epoch, n_epochs):
                self._one_epoch(epoch, start_batch if epoch == start_epoch else 0)
        except CancelFit:
            pass
        finally:
            self.event("after_fit")
        return s

    def _one_epoch(self, epoch: int, start_batch: int) -> None:
        s = self.state
        s.epoch, s.epoch_start = epoch, time.perf_counter()
        if start_batch == 0:
            s.epoch_loss_sum, s.epoch_loss_count = 0.0, 0
        self.train_dl.set_epoch(epoch)
        self.model.train()
        self.event("before_epoch")
        for i, xb, yb in self.train_dl.iterate(start_batch):
            s.batch = i
            self._one_batch(xb, yb)
        self.event("before_validate")
        s.valid = self.validate() if self.valid_dl is not None else {}
        self.event("after_epoch")

    def _one_batch(self, xb, yb) -> None:
        s = self.state
        self.xb, self.yb = xb, yb
        self.event("before_batch")
        with self.precision.autocast():
            self.out = self.model(self.xb)
            self.loss_t = self.task.loss_fn(self.out, self.yb)
        s.loss_t = self.loss_t.detach()  # no .item(): a GPU sync per batch costs more than the step
        try:
            self.event("after_loss")
            self.scaler.scale(self.loss_t).backward()
            self.scaler.unscale_(self.opt)
            self.event("after_backward")
            self.scaler.step(self.opt)
            self.scaler.update()
            s.add_loss(s.loss_t)
        except SkipStep:
            s.skipped_steps += 1
            self.scaler.update()
        finally:
            self.opt.zero_grad(set_to_none=True)
        s.step += 1
        self.event("after_batch")

    def outputs(self, dl) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw model outputs and targets over a loader, in its order (on the CPU)."""
        self.event("before_outputs")
        return outputs(self.model, dl, self.precision)

    def validate(self, dl=None) -> dict:
        out, y = self.outputs(dl if dl is not None else self.valid_dl)
        loss = self.task.loss_fn(out, y).item()
        return {"valid_loss": loss, **self.task.metrics(out, y)}


@torch.no_grad()
def outputs(
    model: nn.Module,
    batches: Iterable,
    precision: Precision | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model (in eval mode, then back) over batches of (x, y), in their order: the outputs
    (through `activation` when given) and the targets, on the CPU."""
    was = model.training
    model.eval()
    outs, ys = [], []
    try:
        for x, y in batches:
            with precision.autocast() if precision is not None else contextlib.nullcontext():
                out = model(x)
                outs.append((activation(out) if activation is not None else out).float().cpu())
            ys.append(y.cpu())
    finally:
        model.train(was)
    return torch.cat(outs), torch.cat(ys)

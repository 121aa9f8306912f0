"""A batch split across processes and micro-batches: the callbacks and the learner for it.

Every rank computes its slice of each batch (trainer/data/shard.py); DDP averages the gradients
in backward, SyncLoss averages the loss the run records, and validation gathers every rank's
outputs before the metrics, so each rank sees the numbers a single process would. Accumulate
splits each batch into micro-batches; with DDP the gradients travel once, on the last one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from trainer import distributed
from trainer.loop import Callback, Learner


def no_sync(model: nn.Module):
    """DDP's no_sync (gradients stay local until a backward outside it), a no-op without DDP."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def check_batch(bs: int, world_size: int, accumulate: int, layout: str) -> None:
    """The config's batch size is the batch of one optimizer step, over all processes and
    micro-batches together; each process computes bs / (processes x accumulate) items at a time."""
    if accumulate > 1 and layout == "text":
        raise ValueError("train.accumulate is for image models: a character model keeps a hidden state per "
                         "stream, which micro-batches would cut")
    if bs % (world_size * accumulate):
        raise ValueError(f"batch size {bs} does not divide by {world_size} process(es) x train.accumulate "
                         f"{accumulate}: choose a batch size that is a multiple of {world_size * accumulate}")


class Accumulate(Callback):
    """train.accumulate: k. Before the loop's own forward and backward, runs the first k-1 slices
    of the batch (under no_sync) and leaves the last slice to the loop, whose backward adds its
    gradient and, under DDP, all-reduces the sum once. Each slice's loss is weighted by its share
    of the batch, so the gradient is the whole batch's and the optimizer steps once per batch."""

    order = -40  # before anything reads the loss at after_loss (SyncLoss, the NaN guard, lr_find)
    in_lr_find = True

    def __init__(self, k: int):
        self.k, self.earlier, self.last_share = k, 0.0, 1.0

    def before_batch(self, learn: Learner) -> None:
        n = len(learn.xb)
        xs, ys = learn.xb.tensor_split(self.k), learn.yb.tensor_split(self.k)
        self.earlier = 0.0
        for x, y in zip(xs[:-1], ys[:-1]):
            if not len(x):
                continue
            share = len(x) / n
            with no_sync(learn.model):
                with learn.precision.autocast():
                    loss = learn.task.loss_fn(learn.model(x), y)
                learn.scaler.scale(loss * share).backward()
            self.earlier += loss.item() * share
        learn.xb, learn.yb = xs[-1], ys[-1]
        self.last_share = len(xs[-1]) / n

    def after_loss(self, learn: Learner) -> None:
        learn.state.loss = self.earlier + learn.state.loss * self.last_share  # the whole batch's loss
        learn.loss_t = learn.loss_t * self.last_share


class SyncLoss(Callback):
    """The step's loss averaged over ranks, before anything reads it: the recorded losses are the
    whole batch's, and the NaN guard and lr_find decide the same way on every rank."""

    order = -30
    in_lr_find = True

    def after_loss(self, learn: Learner) -> None:
        learn.state.loss = distributed.mean(learn.state.loss)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics on every rank (DDP sends them at each training forward; the
    last forward of an epoch updates each rank's own copy again), so that every rank validates
    the model rank 0 saves."""
    if not distributed.current().enabled:
        return
    for b in distributed.unwrap(model).buffers():
        torch.distributed.broadcast(b, src=0)


class DistributedLearner(Learner):
    """Validation on this rank's shard, with the plain module (no collective per batch, so ranks
    with different numbers of validation batches never wait on each other), then every rank's
    outputs gathered: the metrics are those of the whole validation set, on every rank."""

    def outputs(self, dl) -> tuple[torch.Tensor, torch.Tensor]:
        sync_buffers(self.model)
        wrapped, self.model = self.model, distributed.unwrap(self.model)
        try:
            out, y = super().outputs(dl)
        finally:
            self.model = wrapped
        return distributed.gather_outputs(out, y)

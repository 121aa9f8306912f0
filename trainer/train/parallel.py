"""A batch split across processes and micro-batches: DDP, the callbacks and the learner for it.

Every rank computes its slice of each batch (trainer/data/shard.py); DDP averages the gradients
in backward, SyncLoss averages the loss the run records, and validation gathers every rank's
outputs before the metrics, so each rank sees the numbers a single process would. Accumulate
splits each batch into micro-batches; with DDP the gradients travel once, on the last one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from trainer.models import Built
from trainer.models.layers import BnLayer
from trainer.train.loop import Callback, Learner
from trainer.train.world import World


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """DDP around the model as this stage trains it: DDP only syncs the parameters that need a
    gradient when it is built, so each stage (a new freeze state) wraps the model again."""
    if not world.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)  # buffers: rank 0's, sent each forward


def no_sync(model: nn.Module):
    """DDP's no_sync (gradients stay local until a backward outside it), a no-op without DDP."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def check_batch(bs: int, world_size: int, accumulate: int, layout: str) -> None:
    """The config's batch size is the batch of one optimizer step, over all processes and
    micro-batches together; each process computes bs / (processes x accumulate) items at a time."""
    if accumulate > 1 and layout == "text":
        raise ValueError(
            "train.accumulate is for image models: a character model keeps a hidden state per "
            "stream, which micro-batches would cut"
        )
    if bs % (world_size * accumulate):
        raise ValueError(
            f"batch size {bs} does not divide by {world_size} process(es) x train.accumulate "
            f"{accumulate}: choose a batch size that is a multiple of {world_size * accumulate}"
        )


class Accumulate(Callback):
    """train.accumulate: k. Before the loop's own forward and backward, runs the first k-1 slices
    of the batch (under no_sync) and leaves the last slice to the loop, whose backward adds its
    gradient and, under DDP, all-reduces the sum once. Each slice's loss is weighted by its share
    of the batch, so the gradient is the whole batch's and the optimizer steps once per batch."""

    in_step = True

    def __init__(self, k: int):
        self.k, self.earlier, self.last_share = k, 0.0, 1.0

    def before_batch(self, learn: Learner) -> None:
        n = len(learn.xb)
        xs, ys = learn.xb.tensor_split(self.k), learn.yb.tensor_split(self.k)
        self.earlier = 0.0
        for x, y in zip(xs[:-1], ys[:-1], strict=True):
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

    in_step = True

    def __init__(self, world: World):
        self.world = world

    def after_loss(self, learn: Learner) -> None:
        learn.state.loss = self.world.mean(learn.state.loss)


class DistributedLearner(Learner):
    """Validation on this rank's shard, with the plain module (no collective per batch, so ranks
    with different numbers of validation batches never wait on each other), then every rank's
    outputs gathered: the metrics are those of the whole validation set, on every rank. Rank 0's
    BatchNorm statistics go to every rank first (the last forward of an epoch updated each rank's
    own copy), so every rank validates the model rank 0 saves."""

    def __init__(self, *args, world: World, **kwargs):
        super().__init__(*args, **kwargs)
        self.world = world

    def outputs(self, dl) -> tuple[torch.Tensor, torch.Tensor]:
        self.world.broadcast_buffers(unwrap(self.model))
        wrapped, self.model = self.model, unwrap(self.model)
        try:
            out, y = super().outputs(dl)
        finally:
            self.model = wrapped
        return self.world.gather_outputs(out, y)


def use_sync_bn(on: bool, built: Built, device: torch.device, world: World) -> int | None:
    """train.sync_bn under DDP (a single process has the whole batch already): how many layers
    now share their statistics, or None when nothing was to be done. torch's SyncBatchNorm needs
    CUDA; the course's BnLayer syncs over any backend, gloo on the CPU included."""
    if not on or not world.enabled:
        return None
    if device.type != "cuda":
        if world.world_size == 1:
            return None
        torch_norms = [m for m in built.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if torch_norms:
            raise ValueError(
                f"train.sync_bn needs CUDA GPUs for this model's {len(torch_norms)} torch BatchNorm "
                "layer(s) (torch's SyncBatchNorm does not run on the CPU); set it to false for CPU "
                "processes, or use a course model (bnresnet, bnconvnet) whose BnLayer syncs over gloo"
            )
    return convert_sync_bn(built)


def convert_sync_bn(built: Built) -> int:
    """Every BatchNorm becomes a SyncBatchNorm (nn.SyncBatchNorm.convert_sync_batchnorm, which
    keeps the same parameters and buffers, so checkpoints keep their keys). Replaced in place
    wherever the model, its layer groups and its split hold it, so freezing still finds them.
    The course's BnLayers are switched to syncing in place."""
    new: dict[int, nn.Module] = {}
    course = [m for m in built.model.modules() if isinstance(m, BnLayer)]
    for layer in course:
        layer.sync = True

    def converted(bn: nn.Module) -> nn.Module:
        if id(bn) not in new:
            new[id(bn)] = nn.SyncBatchNorm.convert_sync_batchnorm(bn)
        return new[id(bn)]

    def walk(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(module, name, converted(child))
            else:
                walk(child)

    holders = [built.model, *built.groups, *built.extra.values()]
    for m in holders:
        walk(m)
    built.groups = [converted(g) if isinstance(g, nn.modules.batchnorm._BatchNorm) else g for g in built.groups]
    return len(new) + len(course)

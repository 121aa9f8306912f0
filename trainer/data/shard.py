"""One rank's part of every batch, for training with several processes.

A loader yields the batches of the whole run (data.bs items each, in the order of (seed, epoch));
rank r of W takes the r-th of W equal slices of each batch. The slices of one batch are disjoint
and together are exactly the batch a single process trains on, and a resumed run still needs no
loader state. Validation items are split into W contiguous parts, gathered again for the metrics.
"""

from __future__ import annotations

import math

import torch

from trainer.data.loaders import ImageBatches, epoch_generator
from trainer.data.text import TextStreams


class BatchSlices:
    """Training batches of an in-memory image loader: rank r reads and augments only its slice
    (each rank draws its own augmentation; rank 0 of one process draws what a single run does)."""

    def __init__(self, inner: ImageBatches, rank: int, world_size: int):
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def __getattr__(self, name):  # epoch, size, seed, limit...: the whole loader's
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def bs(self) -> int:
        return self.inner.bs // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def iterate(self, start: int = 0):
        dl, order = self.inner, self.inner.order()
        for i in range(start, len(dl)):
            rows = order[i * dl.bs : (i + 1) * dl.bs].tensor_split(self.world_size)[self.rank]
            g = epoch_generator(dl.seed, dl.epoch, salt=i + 1, rank=self.rank) if dl.augment else None
            yield (i, *dl.batch(rows, g))

    def __iter__(self):
        for _, x, y in self.iterate():
            yield x, y


class SlicedBatches(BatchSlices):
    """Any other loader (cached activations): the whole batch is made, then sliced (cheap there)."""

    def iterate(self, start: int = 0):
        for i, x, y in self.inner.iterate(start):
            yield i, x.tensor_split(self.world_size)[self.rank], y.tensor_split(self.world_size)[self.rank]


def shard_train(dl, rank: int, world_size: int):
    if world_size == 1:
        return dl
    if isinstance(dl, TextStreams):  # streams are columns: rank r keeps its share of them
        return _text_columns(dl, rank, world_size)
    if isinstance(dl, ImageBatches):
        return BatchSlices(dl, rank, world_size)
    return SlicedBatches(dl, rank, world_size)


def shard_valid(dl, rank: int, world_size: int):
    if world_size == 1:
        return dl
    if isinstance(dl, TextStreams):
        return _text_columns(dl, rank, world_size)
    if isinstance(dl, ImageBatches):
        idx = dl.indices if dl.indices is not None else torch.arange(len(dl.labels))
        return dl.with_(indices=idx.tensor_split(world_size)[rank], bs=math.ceil(dl.bs / world_size))
    return SlicedBatches(dl, rank, world_size)


def _text_columns(dl: TextStreams, rank: int, world_size: int) -> TextStreams:
    cols = torch.arange(dl.bs).tensor_split(world_size)[rank]
    part = TextStreams(dl.data[:, cols], dl.bptt, dl.seed, dl.variable, dl.epoch)
    part.limit = dl.limit
    return part

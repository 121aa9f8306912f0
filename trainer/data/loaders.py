"""Batches from an in-memory uint8 image tensor: index, convert, augment, normalise.

Order and augmentation are functions of (seed, epoch, batch index) alone, so a resumed run sees
exactly the batches the interrupted one would have, with no loader state to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from trainer.data.augment import AugmentSpec, augment_batch, resize


def hashed_generator(*key: int) -> torch.Generator:
    """A generator for a key of several integers. torch's CPU generator keeps only a seed's low 32
    bits, so the key is hashed into them (a sum of scaled parts would lose the high ones)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def epoch_generator(seed: int, epoch: int, salt: int = 0, rank: int = 0) -> torch.Generator:
    """The draws of one batch; another rank's key is hashed, and rank 0 keeps the single-process key
    (its draws are a run's, as they always were)."""
    if rank:
        return hashed_generator(seed, epoch, salt, rank)
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + salt) % 2**63)


@dataclass
class ImageBatches:
    images: torch.Tensor  # (N, C, S, S) uint8, on the CPU or already on the device
    labels: torch.Tensor  # (N,) int64, or (N, n_classes) float for multi-label
    bs: int
    size: int
    mean: torch.Tensor  # (C,) in [0, 1] units
    std: torch.Tensor
    shuffle: bool = False
    augment: AugmentSpec | None = None
    seed: int = 0
    drop_last: bool = False
    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    epoch: int = 0
    limit: int | None = None  # at most this many batches (smoke runs)
    indices: torch.Tensor | None = None  # a subset (a rank's shard, a slice of validation)

    def __post_init__(self):
        self._mean = self.mean.view(1, -1, 1, 1).to(self.device)
        self._std = self.std.view(1, -1, 1, 1).to(self.device)

    @property
    def n_items(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.labels)

    def __len__(self) -> int:
        n = self.n_items // self.bs if self.drop_last else math.ceil(self.n_items / self.bs)
        return min(n, self.limit) if self.limit is not None else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def with_(self, **changes) -> ImageBatches:
        return replace(self, **changes)

    def order(self) -> torch.Tensor:
        idx = self.indices if self.indices is not None else torch.arange(len(self.labels))
        if self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=epoch_generator(self.seed, self.epoch))]
        return idx

    def batch(self, rows: torch.Tensor, g: torch.Generator | None = None, spec: AugmentSpec | None = None, view=None):
        """Turns rows of the uint8 tensor into a normalised float batch on the device. `view`, a
        function of (pixels in [0, 1], size), replaces augmentation (a fixed TTA view)."""
        # sorted wherever the images are (sequential reads suit a memory-mapped cache), so data
        # kept on the GPU gives exactly the batches of data read from the CPU
        rows, _ = rows.sort()
        x, y = self._gather(rows)
        non_blocking = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=non_blocking).float().div_(255)
        spec = spec if spec is not None else self.augment
        if view is not None:
            x = view(x, self.size)
        elif spec is not None and g is not None:
            x = augment_batch(x, spec, self.size, g, fill=self._mean)
        else:
            x = resize(x, self.size)
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=non_blocking)

    def _gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of images and labels; into pinned memory when they go from the CPU to a GPU,
        so the copy runs asynchronously (non_blocking) while the GPU works."""
        if self.device.type == "cuda" and self.images.device.type == "cpu":
            x = torch.empty((len(rows), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
            y = torch.empty((len(rows), *self.labels.shape[1:]), dtype=self.labels.dtype, pin_memory=True)
            torch.index_select(self.images, 0, rows, out=x)
            torch.index_select(self.labels, 0, rows, out=y)
            return x, y
        return self.images[rows.to(self.images.device)], self.labels[rows.to(self.labels.device)]

    def iterate(self, start: int = 0):
        """Yields (batch index, x, y) from batch `start` on (resume skips what was done)."""
        order = self.order()
        for i in range(start, len(self)):
            rows = order[i * self.bs : (i + 1) * self.bs]
            g = epoch_generator(self.seed, self.epoch, salt=i + 1) if self.augment else None
            yield (i, *self.batch(rows, g))

    def __iter__(self):
        for _, x, y in self.iterate():
            yield x, y

"""Precomputed activations (fastai 0.7's precompute=True): while the body is frozen, its output
for an image never changes, so run it once over the training and validation images (without
augmentation), cache the pooled activations on disk, and train only the head on them.

The cache key covers everything the activations depend on: the architecture, the image size,
the pixels, the normalisation, the body's weights (and buffers) and the precision.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from trainer import storage
from trainer.data.decode import cache_root
from trainer.data.loaders import ImageBatches, epoch_generator
from trainer.models import Built
from trainer.train.loop import outputs
from trainer.train.plan import StagePlan


class PrecomputeError(ValueError):
    """precompute: true on a stage that cannot use it (the CLI prints it and exits 2)."""


@dataclass
class TensorBatches:
    """Batches of cached activations with ImageBatches' interface (order from seed and epoch)."""

    x: torch.Tensor
    y: torch.Tensor
    bs: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    device: torch.device = torch.device("cpu")
    epoch: int = 0
    limit: int | None = None

    def __len__(self) -> int:
        n = len(self.y) // self.bs if self.drop_last else math.ceil(len(self.y) / self.bs)
        return min(n, self.limit) if self.limit is not None else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iterate(self, start: int = 0):
        order = torch.arange(len(self.y))
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=epoch_generator(self.seed, self.epoch))]
        for i in range(start, len(self)):
            rows = order[i * self.bs : (i + 1) * self.bs]
            yield i, self.x[rows].to(self.device), self.y[rows].to(self.device)

    def __iter__(self):
        for _, x, y in self.iterate():
            yield x, y


def check_frozen(built: Built, stage_name: str, train_bn: bool) -> tuple[nn.Module, nn.Module]:
    """The (features, head) split, after checking the features are really frozen."""
    if "features" not in built.extra:
        raise PrecomputeError(
            f"stage '{stage_name}': precompute: true is not available for this architecture (it has no body/head split)"
        )
    features, head = built.extra["features"], built.extra["head"]
    if any(p.requires_grad for p in features.parameters()):
        raise PrecomputeError(
            f"stage '{stage_name}': precompute: true needs a frozen body (add freeze: body to the stage)"
        )
    if train_bn:
        raise PrecomputeError(
            f"stage '{stage_name}': precompute: true cannot train the body's "
            "batch-norm layers (train_bn: true); drop one of them"
        )
    return features, head


def _hash_tensor(h, t: torch.Tensor) -> None:
    arr = t.detach().cpu().contiguous()
    if arr.dtype == torch.bfloat16:
        arr = arr.float()
    h.update(str((arr.dtype, tuple(arr.shape))).encode())
    h.update(np.ascontiguousarray(arr.numpy()))  # the buffer itself: no copy of a big image array


def activation_key(arch: str, features: nn.Module, dl: ImageBatches, precision: str) -> str:
    h = hashlib.sha1(f"v1|{arch}|{dl.size}|{precision}".encode())
    for name, t in features.state_dict().items():
        h.update(name.encode())
        _hash_tensor(h, t)
    for t in (dl.mean, dl.std, dl.images, dl.labels, *([] if dl.indices is None else [dl.indices])):
        _hash_tensor(h, t)
    return h.hexdigest()[:24]


def compute_activations(features: nn.Module, dl: ImageBatches, precision) -> torch.Tensor:
    """The body over every image in order, in eval mode, without augmentation (on the CPU)."""
    plain = dl.with_(augment=None, shuffle=False, limit=None, drop_last=False)
    return outputs(features, plain, precision)[0]


def cached_activations(
    features: nn.Module, dl: ImageBatches, arch: str, precision, cache_dir: str | None, log=print
) -> torch.Tensor:
    key = activation_key(arch, features, dl, str(precision.dtype))
    path = Path(cache_root(cache_dir)) / "activations" / f"{key}.pt"
    if path.is_file():
        return storage.load(path)["x"]
    log(f"precompute: running the frozen body once over {dl.n_items} images at {dl.size}px")
    x = compute_activations(features, dl, precision)
    storage.save({"x": x}, path)
    return x


def head_only(
    built: Built,
    stage: StagePlan,
    arch: str,
    train_dl: ImageBatches,
    valid_dl: ImageBatches,
    precision,
    cache_dir: str | None = None,
    log=print,
) -> tuple[nn.Module, TensorBatches, TensorBatches]:
    """The head and loaders of cached activations that replace the model and image loaders."""
    features, head = check_frozen(built, stage.name, stage.train_bn)
    loaders = []
    for dl in (train_dl, valid_dl):
        x = cached_activations(features, dl, arch, precision, cache_dir, log)
        y = dl.labels if dl.indices is None else dl.labels[dl.indices]
        loaders.append(TensorBatches(x, y, dl.bs, dl.shuffle, dl.seed, dl.drop_last, dl.device, limit=dl.limit))
    log("precompute: training the head on cached activations (no augmentation in this stage)")
    return head, loaders[0], loaders[1]

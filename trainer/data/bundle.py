"""What the pipeline needs from a dataset, whatever its layout: the task, the output size, and
loaders per stage (batch size and image size may change from stage to stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.config.schema import Config
from trainer.data.augment import AugmentSpec, preset
from trainer.data.images import ImageSet, list_items, load_images, resolve_stats
from trainer.data.loaders import ImageBatches


@dataclass
class ImageBundle:
    images: ImageSet
    mean: list[float]
    std: list[float]
    transforms: dict
    seed: int
    device: torch.device
    channels_last: bool = False
    valid_bs: int | None = None
    smoke: bool = False
    meta: dict = field(default_factory=dict)
    on_device: bool = False

    @property
    def task_kind(self) -> str:
        return "multi_label" if self.images.multi_label else "single_label"

    @property
    def n_out(self) -> int:
        return len(self.images.classes)

    @property
    def in_channels(self) -> int:
        return self.images.train_x.shape[1]

    def augment_spec(self, size: int) -> AugmentSpec | None:
        spec = preset(size=size, **self.transforms)
        return None if spec.is_identity else spec

    def loaders(self, bs: int, size: int | None = None) -> tuple[ImageBatches, ImageBatches]:
        size = size or self.images.size
        common = dict(size=size, mean=torch.tensor(self.mean), std=torch.tensor(self.std), seed=self.seed,
                      device=self.device, channels_last=self.channels_last)
        tx, ty, vx, vy = self.tensors()
        train = ImageBatches(tx, ty, bs, shuffle=True, augment=self.augment_spec(size),
                             drop_last=len(ty) > bs, **common)
        valid = ImageBatches(vx, vy, self.valid_bs or bs * 2, **common)
        return train, valid

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Train and valid images and labels where the loaders read them: copied to the device
        once (data.on_device), else the CPU's memory-mapped cache. The ImageSet stays on the CPU."""
        im = self.images
        if not self.on_device:
            return im.train_x, im.train_y, im.valid_x, im.valid_y
        if "on_device" not in self.meta:
            self.meta["on_device"] = tuple(t.to(self.device) for t in (im.train_x, im.train_y, im.valid_x, im.valid_y))
        return self.meta["on_device"]

    def files_to_save(self) -> dict:
        return {"classes.json": {"classes": self.images.classes, "multi_label": self.images.multi_label},
                "stats.json": {"mean": self.mean, "std": self.std, "size": self.images.size,
                               "channels": self.in_channels}}


def _subsample(items, n_train: int, n_valid: int, seed: int):
    """A small random slice for smoke runs, so CI never decodes a whole dataset."""
    rng = np.random.default_rng(seed)

    def pick(files, labels, n):
        keep = sorted(rng.permutation(len(files))[:n].tolist())
        return [files[i] for i in keep], [labels[i] for i in keep]

    items.train_files, items.train_labels = pick(items.train_files, items.train_labels, n_train)
    items.valid_files, items.valid_labels = pick(items.valid_files, items.valid_labels, n_valid)
    return items


def build_bundle(cfg: Config, seed: int, device: torch.device, smoke: bool = False, log=print,
                 model_stats=None, pretrained: bool = False):
    data = cfg.data
    if data.layout == "text":
        from trainer.data.corpus import read_corpus

        for key, path in (("data.path", data.path), ("data.valid_path", data.valid_path)):
            if path:
                read_corpus(path, key, min_chars=data.bptt + 1)  # a clear error before any work
        from trainer.data.text import build_text_bundle

        return build_text_bundle(cfg, seed, device, smoke, log)
    items = list_items(data, seed)
    if smoke:
        bs = max(s.bs or data.bs for s in cfg.train.stages)
        items = _subsample(items, 3 * bs, 2 * bs, seed)
    sizes = [s.size for s in cfg.train.stages if s.size]
    images = load_images(data, seed, sizes, log, items=items)
    mean, std = resolve_stats(data.stats, images.train_x, pretrained, model_stats)
    transforms = cfg.transforms.model_dump()
    on_device = keep_on_device(data.on_device, images, device)
    if on_device and device.type != "cpu":
        log(f"keeping the {_nbytes(images) / 2**20:.0f} MiB of decoded images on {device} (data.on_device)")
    return ImageBundle(images, mean, std, {"name": transforms.pop("preset"), **transforms}, seed, device,
                       cfg.channels_last, data.valid_bs, smoke, on_device=on_device)


def _nbytes(images: ImageSet) -> int:
    return sum(t.numel() * t.element_size() for t in (images.train_x, images.train_y, images.valid_x, images.valid_y))


def keep_on_device(setting, images: ImageSet, device: torch.device, free_bytes: int | None = None) -> bool:
    """data.on_device: true/false as set; auto keeps the images on a CUDA GPU when they take under
    a quarter of its free memory (the model, activations and cuDNN workspaces need the rest)."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return _nbytes(images) < free_bytes / 4

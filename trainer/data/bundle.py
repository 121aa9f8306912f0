"""What training needs from a dataset, whatever its layout: the task, the output size, and
loaders per stage (batch size and image size may change from stage to stage)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config.schema import Config
from trainer.data.augment import AugmentSpec, preset
from trainer.data.images import ImageSet, list_items, load_images, resolve_stats
from trainer.data.items import subsample
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
    on_device: bool = False
    _device_copy: tuple[torch.Tensor, ...] | None = None  # the tensors on the device, copied once

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
        common = dict(
            size=size,
            mean=torch.tensor(self.mean),
            std=torch.tensor(self.std),
            seed=self.seed,
            device=self.device,
            channels_last=self.channels_last,
        )
        tx, ty, vx, vy = self.tensors()
        train = ImageBatches(
            tx, ty, bs, shuffle=True, augment=self.augment_spec(size), drop_last=len(ty) > bs, **common
        )
        valid = ImageBatches(vx, vy, self.valid_bs or bs * 2, **common)
        return train, valid

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Train and valid images and labels where the loaders read them: copied to the device
        once (data.on_device), else the CPU's memory-mapped cache. The ImageSet stays on the CPU."""
        im = self.images
        if not self.on_device:
            return im.train_x, im.train_y, im.valid_x, im.valid_y
        if self._device_copy is None:
            self._device_copy = tuple(t.to(self.device) for t in (im.train_x, im.train_y, im.valid_x, im.valid_y))
        return self._device_copy

    def files_to_save(self) -> dict:
        return {
            "classes.json": {"classes": self.images.classes, "multi_label": self.images.multi_label},
            "stats.json": {"mean": self.mean, "std": self.std, "size": self.images.size, "channels": self.in_channels},
        }


def build_bundle(
    cfg: Config,
    seed: int,
    device: torch.device,
    sizes: tuple[int, ...] = (),
    smoke_bs: int | None = None,
    log=print,
    model_stats=None,
):
    """The run's data. sizes: every image size a stage asks for (the images are decoded once, at
    the largest); smoke_bs: a smoke run's largest batch size (a small slice of the items is
    enough); model_stats: the normalisation a pretrained body expects (data.stats unset)."""
    data = cfg.data
    if data.layout == "text":
        from trainer.data.text import build_text_bundle

        return build_text_bundle(cfg, seed, device, smoke_bs is not None, log)
    items = list_items(data, seed)
    if smoke_bs is not None:
        items = subsample(items, 3 * smoke_bs, 2 * smoke_bs, seed)
    images = load_images(data, seed, list(sizes), log, items=items)
    mean, std = resolve_stats(data.stats, images.train_x, model_stats)
    on_device = keep_on_device(data.on_device, images, device)
    if on_device and device.type != "cpu":
        log(f"keeping the {_nbytes(images) / 2**20:.0f} MiB of decoded images on {device} (data.on_device)")
    return ImageBundle(
        images,
        mean,
        std,
        {"name": cfg.transforms.preset, **cfg.transforms.per_image()},
        seed,
        device,
        cfg.channels_last,
        data.valid_bs,
        smoke_bs is not None,
        on_device=on_device,
    )


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

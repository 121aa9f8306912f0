"""The image dataset of a run: items from a layout, decoded once, with normalisation stats."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trainer.config.data_schema import IMAGENET_STATS, CsvData, FolderData
from trainer.data.decode import Fit, decode_all, native_size
from trainer.data.items import DataError, ImageItems, csv_items, folder_items, subsample


@dataclass
class ImageSet:
    items: ImageItems
    train_x: torch.Tensor  # uint8 (N, C, S, S)
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    valid_files: list[Path]
    size: int  # the cached size; stages resize batches from it
    skipped: int = 0

    @property
    def classes(self) -> list[str]:
        return self.items.classes

    @property
    def multi_label(self) -> bool:
        return self.items.multi_label


def list_items(cfg: FolderData | CsvData, seed: int) -> ImageItems:
    if cfg.layout == "folder":
        items = folder_items(Path(cfg.path), cfg.train, cfg.valid, cfg.test)
    else:
        items = csv_items(
            Path(cfg.path),
            cfg.labels,
            cfg.train,
            cfg.suffix,
            cfg.valid_pct,
            cfg.valid_ids,
            seed,
            cfg.label_delim,
            cfg.test,
            (cfg.id_column, cfg.label_column),
        )
    if cfg.subset is not None:
        items = subsample(items, cfg.subset.train, cfg.subset.valid, seed)
    return items


def label_tensor(labels: list, n_classes: int, multi: bool) -> torch.Tensor:
    if not multi:
        return torch.tensor(labels, dtype=torch.long)
    y = torch.zeros(len(labels), n_classes)
    for i, tags in enumerate(labels):
        y[i, tags] = 1.0
    return y


def _keep(values: list, bad: list[int]) -> list:
    drop = set(bad)
    return [v for i, v in enumerate(values) if i not in drop]


def fit_of(cfg: FolderData | CsvData) -> Fit:
    """How the config makes its images square."""
    return Fit(cfg.resize, cfg.pad_mode)


def cache_size_for(cfg: FolderData | CsvData, stage_sizes: list[int], files: list[Path]) -> int:
    """Decode at the largest size any stage asks for (or cache_size), else the images' own size
    (of the first readable file when bad images are skipped)."""
    wanted = [s for s in [cfg.cache_size, cfg.size, *stage_sizes] if s]
    if wanted:
        return max(wanted)
    for f in files:
        try:
            return native_size(f, fit_of(cfg))
        except DataError:
            if cfg.on_bad_image != "skip":
                raise
    raise DataError(f"{cfg.path}: no readable images in the training set")


def load_images(
    cfg: FolderData | CsvData,
    seed: int,
    stage_sizes: list[int] = (),
    log=print,
    items: ImageItems | None = None,
    valid_only: bool = False,
) -> ImageSet:
    """valid_only: the training images are not decoded (evaluate needs the validation set alone)."""
    items = items or list_items(cfg, seed)
    size = cache_size_for(cfg, list(stage_sizes), items.train_files)
    skip = cfg.on_bad_image == "skip"
    fit = fit_of(cfg)
    if valid_only:
        items = replace(items, train_files=[], train_labels=[])
        tx, tbad, tn = np.empty((0, cfg.channels, size, size), np.uint8), [], 0
    else:
        tx, tbad, tn = decode_all(items.train_files, size, cfg.channels, skip, cfg.cache_dir, log, fit)
    vx, vbad, vn = decode_all(items.valid_files, size, cfg.channels, skip, cfg.cache_dir, log, fit)
    if tbad or vbad:
        log(f"skipped {len(tbad) + len(vbad)} unreadable image(s) (data.on_bad_image: skip)")
    if tn or vn:
        n = len(items.train_files) + len(items.valid_files)
        log(f"{tn + vn} of {n} images are not square; data.resize: {fit.mode} {fit.describe()}")
    train_labels, valid_labels = _keep(items.train_labels, tbad), _keep(items.valid_labels, vbad)
    if (len(train_labels) == 0 and not valid_only) or len(valid_labels) == 0:
        raise DataError(f"{cfg.path}: no readable images left in the training or validation set")
    n = len(items.classes)
    return ImageSet(
        items,
        as_tensor(tx),
        label_tensor(train_labels, n, items.multi_label),
        as_tensor(vx),
        label_tensor(valid_labels, n, items.multi_label),
        _keep(items.valid_files, vbad),
        size,
        len(tbad) + len(vbad),
    )


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """Shares the (read-only, memory-mapped) cache without a copy; nothing ever writes to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def channel_stats(x: torch.Tensor, max_items: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units, from an evenly spaced sample."""
    step = max(1, len(x) // max_items)
    sample = x[::step].float().div_(255).transpose(0, 1).reshape(x.shape[1], -1)
    return sample.mean(1).tolist(), sample.std(1).clamp_min(1e-3).tolist()


def resolve_stats(spec, train_x: torch.Tensor, model_stats=None) -> tuple[list[float], list[float]]:
    """data.stats as numbers. Unset: the statistics a pretrained body was trained with
    (`model_stats`, known before the model is built), else the data's own."""
    channels = train_x.shape[1]
    if spec is None:
        spec = model_stats or "auto"
    if spec == "none":
        mean, std = [0.0] * channels, [1.0] * channels
    elif spec == "imagenet":
        mean, std = IMAGENET_STATS
    elif spec == "auto":
        mean, std = channel_stats(train_x)
    else:
        mean, std = list(spec[0]), list(spec[1])
    if len(mean) != channels:  # grayscale data with 3-channel stats: average them
        mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
    return mean, std

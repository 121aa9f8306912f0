"""MixUp and CutMix on training batches, as timm's Mixup in batch mode: with probability mix_prob a
batch is mixed; with both on, CutMix is chosen with switch_prob; lam ~ Beta(alpha, alpha), folded to
max(lam, 1 - lam) as fastai does (the batch's own images dominate, and alpha -> 0 is no mixing);
CutMix pastes one box of the permuted batch (timm's rand_bbox) and lam becomes the share of pixels
kept. The targets become probabilities mixed with the same lam and the same permutation.

Only the training step mixes: MixBatch changes learn.xb/yb in before_batch, which validation, TTA
and predict never fire. lr_find runs without it (it is not `in_step`), unlike fastai's: its curve
and its stopping rule (4x the best smoothed loss) read the plain loss, comparable with a run
without mixing, rather than a mixed loss whose floor depends on alpha.

The draws come from a generator of (seed, epoch, batch, rank), as the data's come from one of
(seed, epoch, batch), so a resumed run mixes exactly as the uninterrupted one did, with nothing to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.config.schema import Config
from trainer.data.loaders import hashed_generator
from trainer.train.loop import Callback, Learner
from trainer.train.tasks import soft_targets

MIX_TAG = 0x6D6978  # keeps mixing's stream apart from every other keyed by (seed, epoch, batch)


@dataclass(frozen=True)
class MixSpec:
    mixup: float = 0.0  # Beta alphas; 0 is off
    cutmix: float = 0.0
    prob: float = 1.0  # the chance a batch is mixed
    switch_prob: float = 0.5  # CutMix's share when both are on

    @property
    def on(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0


@dataclass(frozen=True)
class Draw:
    lam: float  # the weight of the batch's own images and targets
    perm: torch.Tensor | None = None  # the partner of each row; None: not mixed
    box: tuple[int, int, int, int] | None = None  # CutMix's (top, bottom, left, right)


def mix_generator(seed: int, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
    """The batch's generator, tagged apart from the data's."""
    return hashed_generator(seed, epoch, batch, rank, MIX_TAG)


def draw(spec: MixSpec, n: int, h: int, w: int, g: torch.Generator) -> Draw:
    """One batch's mixing. Every draw is made whatever the outcome (a fixed sequence per batch)."""
    mixed, use_cutmix = (torch.rand(2, generator=g) < torch.tensor([spec.prob, spec.switch_prob])).tolist()
    beta_seed = int(torch.randint(0, 2**62, (), generator=g))  # torch has no seeded Beta: numpy's, seeded from g
    perm = torch.randperm(n, generator=g)
    cy, cx = (int(torch.randint(0, size, (), generator=g)) for size in (h, w))
    if not (mixed and spec.on):
        return Draw(1.0)
    use_cutmix = spec.cutmix > 0 and (spec.mixup == 0 or use_cutmix)
    alpha = spec.cutmix if use_cutmix else spec.mixup
    lam = float(np.random.default_rng(beta_seed).beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    if not use_cutmix:
        return Draw(lam, perm)
    cut = (1.0 - lam) ** 0.5  # timm's rand_bbox: a box of about (1 - lam) of the area, centred anywhere
    ch, cw = int(h * cut), int(w * cut)
    top, bottom = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    left, right = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)  # clipped at the edges: the real area
    return Draw(lam, perm, (top, bottom, left, right))


def mix(x: torch.Tensor, y: torch.Tensor, d: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W); y: (N, K) probabilities. Rows mixed with rows d.perm, weights lam and 1 - lam."""
    if d.perm is None or d.lam == 1.0:
        return x, y
    perm = d.perm.to(x.device)
    if d.box is None:
        x = x * d.lam + x[perm] * (1.0 - d.lam)
    else:
        top, bottom, left, right = d.box
        x = x.clone()
        x[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    return x, y * d.lam + y[perm] * (1.0 - d.lam)


class MixBatch(Callback):
    """The batch and its targets mixed before the forward pass (its place in ORDER: before
    train.accumulate splits the batch, so micro-batches are slices of the mixed batch)."""

    in_step = False  # lr_find runs without it: see the module's docstring

    def __init__(self, spec: MixSpec, kind: str, n_classes: int, seed: int, rank: int = 0):
        self.spec, self.kind, self.n_classes, self.seed = spec, kind, n_classes, seed
        self.rank = rank  # each process mixes its slice with draws of its own

    def before_batch(self, learn: Learner) -> None:
        s = learn.state
        x, y = learn.xb, soft_targets(self.kind, learn.yb, self.n_classes)
        g = mix_generator(self.seed, s.epoch, s.batch, self.rank)
        d = draw(self.spec, len(x), x.shape[-2], x.shape[-1], g)
        learn.xb, learn.yb = mix(x, y, d)


def check_mixing(cfg: Config) -> list[tuple[str, str]]:
    """Config check: a language model has no images to mix."""
    t = cfg.transforms
    if cfg.data.layout == "text" and (t.mixup or t.cutmix):
        key = "transforms.mixup" if t.mixup else "transforms.cutmix"
        return [(key, "MixUp and CutMix mix images and their labels; a language model (data.layout: text) has none")]
    return []


def mix_batches(cfg: Config, kind: str, n_classes: int, rank: int = 0) -> MixBatch | None:
    """The run's MixBatch, or None when mixing is off."""
    problems = check_mixing(cfg)
    if problems:
        raise ValueError(": ".join(problems[0]))
    t = cfg.transforms
    spec = MixSpec(t.mixup, t.cutmix, t.mix_prob, t.switch_prob)
    return MixBatch(spec, kind, n_classes, cfg.seed or 0, rank) if spec.on else None

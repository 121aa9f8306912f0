"""The model registry and what every factory returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from trainer.registry import Registry


@dataclass
class Built:
    """A model and its layer groups (earliest first, the head last) for differential learning
    rates and freezing; `stats` are the input normalisation a pretrained body expects."""

    model: nn.Module
    groups: list[nn.Module]
    stats: tuple[list[float], list[float]] | None = None
    pretrained: bool = False
    extra: dict = field(default_factory=dict)


MODELS: Registry = Registry("architecture")

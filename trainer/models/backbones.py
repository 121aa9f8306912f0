"""Any torchvision classification model as a body, with a new head and fastai-style groups."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from trainer.models.layers import head
from trainer.models.registry import Built, split
from trainer.models.weights import load_fitting, read_state_dict


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


def expected_weights_file(arch: str) -> Path:
    """Where torchvision looks for (and downloads) the default ImageNet weights of `arch`."""
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _download_failed(e: Exception) -> bool:
    """No internet shows up as URLError (an OSError), a socket error, or HTTP/SSL errors."""
    return isinstance(e, OSError) or "urlopen" in str(e) or "HTTP Error" in str(e)


def _torchvision_net(arch: str, pretrained: bool | str) -> nn.Module:
    import torchvision

    if pretrained is True:
        try:
            return torchvision.models.get_model(arch, weights="DEFAULT")
        except Exception as e:  # noqa: BLE001 -- re-raised unless it is a failed download
            if not _download_failed(e):
                raise
            raise RuntimeError(
                f"model.pretrained: could not download torchvision's {arch} weights "
                f"({type(e).__name__}: {str(e)[:100]}). Offline, copy the file to "
                f"{expected_weights_file(arch)} or set model.pretrained to a local .pth/.safetensors "
                "path"
            ) from None
    net = torchvision.models.get_model(arch, weights=None)
    if isinstance(pretrained, str):
        load_into(net, read_state_dict(pretrained), pretrained)
    return net


_HEAD_NAMES = ("fc", "classifier", "head", "heads")  # torchvision's classifiers; ours replaces them


def _torchvision_head(key: str) -> bool:
    return key.split(".")[0] in _HEAD_NAMES


def load_into(net: nn.Module, state: dict, source: str, is_head=_torchvision_head) -> None:
    """Loads every body weight of a state dict (its classifier, the keys `is_head` picks, is left
    out: a new head follows). A missing, unexpected or wrongly shaped body key is an error, never
    silently random weights."""
    body = {k.removeprefix("module."): v for k, v in state.items()}
    body = {k: v for k, v in body.items() if not is_head(k)}
    load_fitting(net, body, source, optional=is_head)


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


def torchvision_model(
    arch: str, n_out: int, in_channels: int = 3, pretrained: bool | str = False, ps: float = 0.5, **_
) -> Built:
    if in_channels != 3:
        raise ValueError(f"{arch} expects 3-channel images; set data.channels: 3")
    net = _torchvision_net(arch, pretrained)
    body = _body(net)
    model = BodyHead(body, head(_n_features(body, in_channels), n_out, ps))
    pool, rest = model.head[:2], model.head[2:]  # concat pool + flatten have no parameters
    return Built(model, [*_groups(body), model.head], extra=split(nn.Sequential(body, *pool), rest, body))

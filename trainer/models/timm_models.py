"""timm backbones: `model.arch: timm/<name>`, with this project's head (concat pooling, BatchNorm,
dropout `ps`, linear) or timm's own classifier (`model.head: timm`). Layer groups follow the
model's stages (timm's group_matcher): stem and the first half of the stages | the rest | head.
timm is imported only here, and only when a timm arch is used (pip install -e '.[timm]')."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn

from trainer.models.backbones import BodyHead, load_into
from trainer.models.layers import head as our_head
from trainer.models.registry import Built, split
from trainer.models.weights import read_state_dict
from trainer.registry import did_you_mean

PREFIX = "timm/"
PIP = "pip install -e '.[timm]' (or pip install 'timm>=1.0')"
OPTIONS = ("pretrained", "ps", "head")


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError(f"model.arch: timm models need the timm package, which is not installed: {PIP}") from None
    return timm


def check_name(arch: str) -> list[tuple[str, str]]:
    """Config check (before any work): timm is installed and knows the name (else a close one)."""
    name = arch.removeprefix(PREFIX)
    if importlib.util.find_spec("timm") is None:
        return [("model.arch", f"'{arch}' needs the timm package, which is not installed: {PIP}")]
    timm = _timm()
    if not timm.is_model(name):
        return [("model.arch", _unknown(name, timm.list_models()))]
    if "." in name and name not in timm.list_pretrained(name):
        tags = timm.list_pretrained(name.split(".")[0] + ".*")
        return [("model.arch", f"timm has no weights tagged '{name}' (timm.list_pretrained: {', '.join(tags[:8])})")]
    return []


def check_options(model_cfg) -> list[tuple[str, str]]:
    """Config check of a known timm arch: its options, and pretrained weights that can be had now
    (cached, or their source answering): offline, the error comes before any work."""
    bad = [k for k in model_cfg.arch_kwargs() if k not in OPTIONS]
    if bad:
        return [
            (f"model.{k}", f"'{model_cfg.arch}' does not take this option (it takes: {', '.join(OPTIONS)})")
            for k in bad
        ]
    if model_cfg.pretrained is True:
        problem = weights_problem(model_cfg.arch.removeprefix(PREFIX))
        return [("model.pretrained", problem)] if problem else []
    return []  # a local weights file: models.check_model reads its header, as for every arch


def _unknown(name: str, names: list[str]) -> str:
    hint = did_you_mean(name, names)
    n = max((n for n in range(1, len(name) + 1) if any(m.startswith(name[:n]) for m in names)), default=0)
    close = [m for m in names if m.startswith(name[:n])] if n else []
    where = f"timm.list_models('{name[:n]}*'): {', '.join(close[:8])}{', ...' * (len(close) > 8)}" if close else ""
    return f"unknown timm model '{name}'" + (f"; {hint}" if hint else "") + f" ({where or 'see timm.list_models()'})"


def _hub(cfg) -> bool:
    """timm takes the weights from the HF hub where it can, else from the URL."""
    return bool(cfg.hf_hub_id) and importlib.util.find_spec("huggingface_hub") is not None


def _cached(cfg) -> bool:
    if cfg.file:
        return Path(cfg.file).is_file()
    if not _hub(cfg):
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file()
    from huggingface_hub import try_to_load_from_cache

    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _answers(url: str, wait: float) -> bool:
    """Does `url` answer within `wait` seconds (any HTTP answer; proxies as urllib finds them)? In a
    daemon thread, so a name lookup that hangs cannot hold the check longer."""
    answered = []

    def probe():
        with contextlib.suppress(Exception):  # no answer, whatever the reason
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=wait).close()
            except urllib.error.HTTPError:
                pass  # an answer all the same
            answered.append(True)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(wait + 0.5)
    return bool(answered)


def weights_problem(name: str, wait: float = 3.0) -> str | None:
    """Why `pretrained: true` cannot work for timm model `name` now, or None: the weights are cached,
    or their source answers (timm downloads them when the model is built). At most `wait` s."""
    cfg = _timm().get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        return f"timm has no pretrained weights for {name}: use pretrained: false or a local weights file (PATH)"
    if _cached(cfg):
        return None
    if _hub(cfg):
        from huggingface_hub import constants

        url, place = constants.ENDPOINT, f"{constants.HF_HUB_CACHE}, e.g. `hf download {cfg.hf_hub_id}` with internet"
    else:
        url, place = cfg.url, str(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name)
    if not _offline_env() and _answers(url, wait):
        return None
    return (
        f"timm could not download the weights of {name} ({'HF_HUB_OFFLINE is set' if _offline_env() else 'no internet?'})"
        f": download them where timm caches them ({place}) or give model.pretrained: PATH to a local "
        ".safetensors/.pth file"
    )


def pretrained_stats(model_cfg) -> tuple[list[float], list[float]] | None:
    """The mean and std the pretrained weights were trained with (timm's pretrained config)."""
    cfg = _timm().get_pretrained_cfg(model_cfg.arch.removeprefix(PREFIX))
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]


def _create(name: str, pretrained: bool, **kw) -> nn.Module:
    timm = _timm()
    try:
        return timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as e:  # noqa: BLE001 -- re-raised unless it is a failed download
        lib = type(e).__module__.split(".")[0]
        if not pretrained or not (isinstance(e, OSError) or lib in ("huggingface_hub", "httpx", "requests", "urllib3")):
            raise
        said = weights_problem(name, wait=0.5) or f"timm could not download the weights of {name} ({type(e).__name__})"
        raise RuntimeError(f"model.pretrained: {said}") from None


def _is_classifier(net: nn.Module):
    """Keys of timm's classifier (pretrained_cfg's `classifier`): left out of a local weights file."""
    names = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return lambda key: any(key == n or key.startswith(n + ".") for n in names)


class TimmBody(nn.Module):
    """A timm model up to its classifier: its feature map, or (pooled) its pooled pre-logits features."""

    def __init__(self, net: nn.Module, pooled: bool):
        super().__init__()
        self.net, self.pooled = net, pooled

    def forward(self, x):
        x = self.net.forward_features(x)
        return self.net.forward_head(x, pre_logits=True) if self.pooled else x


class TimmFeatures(nn.Module):
    """Features half of a `head: timm` model's split: its pooled pre-logits features. It holds every
    parameter but the classifier's (the body groups: precompute checks they are frozen and keys its
    cache on them); the model itself is kept outside its modules, for forward and train/eval."""

    def __init__(self, net: nn.Module, body_groups: list[nn.Module]):
        super().__init__()
        self.groups, self.net = nn.ModuleList(body_groups), [net]

    def train(self, mode: bool = True):
        self.net[0].train(mode)
        return super().train(mode)

    def forward(self, x):
        return self.net[0].forward_head(self.net[0].forward_features(x), pre_logits=True)


class Group(nn.Module):
    """Modules and loose parameters (a ViT's cls_token) of a model, held as one layer group."""

    def __init__(self, modules: list[nn.Module], params: list[nn.Parameter]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        for i, p in enumerate(params):
            self.register_parameter(f"param{i}", p)


def stage_groups(net: nn.Module, skip: nn.Module | None = None) -> list[nn.Module]:
    """Two groups of the body (its parameters but skip's): the stem and the first half of the stages
    (timm's coarse group_matcher; top-level children where a model has none), then the rest."""
    skip_ids = {id(p) for p in skip.parameters()} if skip is not None else set()
    params = [(n, p) for n, p in net.named_parameters() if id(p) not in skip_ids]
    try:
        from timm.models import group_parameters

        lid = group_parameters(net, net.group_matcher(coarse=True), reverse=True)
    except (AttributeError, NotImplementedError, TypeError):
        tops = list(dict.fromkeys(n.split(".")[0] for n, _ in params))
        lid = {n: tops.index(n.split(".")[0]) for n, _ in params}
    ids = sorted({lid.get(n, math.inf) for n, _ in params})
    early = set(ids[: math.ceil(len(ids) / 2)])
    bucket = {id(p): 0 if lid.get(n, math.inf) in early else 1 for n, p in params}
    parts: list[tuple[list, list]] = [([], []), ([], [])]

    def walk(module: nn.Module) -> None:
        inside = {bucket.get(id(p)) for p in module.parameters()}
        if len(inside) == 1 and None not in inside:
            parts[inside.pop()][0].append(module)
            return
        for p in module.parameters(recurse=False):
            if id(p) in bucket:
                parts[bucket[id(p)]][1].append(p)
        for child in module.children():
            walk(child)

    walk(net)
    return [Group(modules, loose) for modules, loose in parts]


def _has_feature_map(net: nn.Module, in_channels: int) -> bool:
    """Does forward_features give an NCHW map (concat pooling applies)? Probed at 64 px."""
    if getattr(net, "pretrained_cfg", {}).get("fixed_input_size") or getattr(net, "output_fmt", "NCHW") != "NCHW":
        return False
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net.forward_features(torch.zeros(1, in_channels, 64, 64))
        return out.ndim == 4 and out.shape[1] == net.num_features
    except Exception:  # noqa: BLE001 -- a model that cannot take 64 px: use its own pooling
        return False
    finally:
        net.train(was)


def _cam_layer(net: nn.Module) -> nn.Module | None:
    info = getattr(net, "feature_info", None)
    try:
        return net.get_submodule(info[-1]["module"]) if info else None
    except (AttributeError, KeyError, TypeError):
        return None


def _pooled_head(net: nn.Module, n_out: int, ps: float, hidden: int = 512) -> nn.Sequential:
    """Our head (from its BatchNorm on) for features timm pools itself; pre-logits MLPs widen some."""
    n = getattr(net, "head_hidden_size", None) or net.num_features
    bn, drop, relu = nn.BatchNorm1d, nn.Dropout, nn.ReLU(inplace=True)
    return nn.Sequential(
        nn.Flatten(), bn(n), drop(ps / 2), nn.Linear(n, hidden), relu, bn(hidden), drop(ps), nn.Linear(hidden, n_out)
    )


def timm_model(
    arch: str, n_out: int, in_channels: int = 3, pretrained: bool | str = False, ps=None, head: str = "ours", **_
) -> Built:
    name = arch.removeprefix(PREFIX)
    kw = (
        {"num_classes": n_out, **({"drop_rate": ps} if ps is not None else {})}
        if head == "timm"
        else {"num_classes": 0}
    )
    net = _create(name, pretrained is True, in_chans=in_channels, **kw)
    if isinstance(pretrained, str):
        load_into(net, read_state_dict(pretrained), pretrained, is_head=_is_classifier(net))
    feature_map = _has_feature_map(net, in_channels)
    cam = _cam_layer(net) if feature_map else None
    if head == "timm":
        cls = net.get_classifier()
        cls = nn.ModuleList(cls) if isinstance(cls, tuple | list) else cls  # distilled: two classifiers
        groups = stage_groups(net, skip=cls)
        extra = {} if isinstance(cls, nn.ModuleList) else split(TimmFeatures(net, groups), cls, cam)
        return Built(net, [*groups, cls], extra=extra)
    p = 0.5 if ps is None else ps
    head_ = our_head(net.num_features, n_out, p) if feature_map else _pooled_head(net, n_out, p)
    k = 2 if feature_map else 1  # concat pool + flatten / flatten: no parameters
    body = TimmBody(net, pooled=not feature_map)
    model = BodyHead(body, head_)
    notes = [] if feature_map else [f"{arch} has no NCHW feature map: the head takes timm's pooled features"]
    extra = split(nn.Sequential(body, *head_[:k]), head_[k:], cam)
    return Built(model, [*stage_groups(net), head_], extra=extra, notes=notes)

"""A per-layer summary of a model built from a config (shapes from one forward pass)."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.config import Config
from trainer.models import create_model
from trainer.train.plan import apply_freeze, make_plan, outline


def summarize(cfg: Config, stage: str | None = None) -> tuple[list[dict], int, int, str]:
    """Rows for each leaf layer of the model a run of this config builds, frozen as `stage` (the
    first by default) leaves it and at that stage's image size; and the stage's name."""
    from trainer.data.images import cache_size_for, list_items

    if cfg.data.layout == "text":
        from trainer.data.text import vocab_size

        built = create_model(cfg.model, vocab_size(cfg), 0, 0)
        chosen = _freeze(cfg, built, stage)
        return (*layer_rows(built.model, torch.zeros(cfg.data.bptt, 2, dtype=torch.long)), chosen.name)  # (seq, bs)
    items = list_items(cfg.data, cfg.seed or 0)
    stages = outline(cfg)
    decoded = cache_size_for(cfg.data, list(stages.image_sizes), items.train_files)
    model_cfg = cfg.model.model_copy(update={"pretrained": False})
    built = create_model(model_cfg, len(items.classes), cfg.data.channels, stages.first_size or decoded)
    chosen = _freeze(cfg, built, stage)
    size = chosen.size or decoded
    return (*layer_rows(built.model, torch.zeros(2, cfg.data.channels, size, size)), chosen.name)


def _freeze(cfg: Config, built, stage: str | None):
    """The stage's freeze state on the model (requires_grad), as training applies it."""
    chosen = make_plan(cfg, len(built.groups)).find(stage)
    apply_freeze(built.groups, chosen.freeze_to, chosen.train_bn)
    return chosen


def layer_rows(model: nn.Module, x: torch.Tensor) -> tuple[list[dict], int, int]:
    rows, hooks = [], []
    for name, m in model.named_modules():
        own_params = any(True for _ in m.parameters(recurse=False))
        if name == "" or (list(m.children()) and not own_params):
            continue  # containers add nothing; a layer with its own weights (BnLayer) is shown

        def hook(mod, inp, out, name=name):
            if any(r["name"] == name for r in rows):
                return  # a cell unrolled over a sequence runs once per step; show it once
            params = sum(p.numel() for p in mod.parameters(recurse=False))
            trainable = any(p.requires_grad for p in mod.parameters(recurse=False))
            out = out[0] if isinstance(out, tuple) else out  # recurrent layers return (output, state)
            rows.append(
                {
                    "name": name,
                    "layer": f"{name} ({type(mod).__name__})",
                    "shape": list(out.shape[1:]),
                    "params": params,
                    "trainable": trainable if params else "-",
                }
            )

        hooks.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return rows, total, trainable

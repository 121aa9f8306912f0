"""A per-layer summary of a model built from a config (shapes from one forward pass)."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.config import Config
from trainer.models import create_model
from trainer.train.plan import outline


def summarize(cfg: Config, n_out: int | None = None, size: int | None = None) -> tuple[list[dict], int, int]:
    """Rows for each leaf layer; n_out/size default to the data's (read from the config): the
    model a run of this config builds, at its first stage's size."""
    from trainer.data.images import cache_size_for, list_items

    if cfg.data.layout == "text":
        from trainer.data.text import vocab_size

        built = create_model(cfg.model, n_out or vocab_size(cfg), 0, 0)
        return layer_rows(built.model, torch.zeros(cfg.data.bptt, 2, dtype=torch.long))  # (seq, bs)
    items = list_items(cfg.data, cfg.seed or 0)
    n_out = n_out or len(items.classes)
    stages = outline(cfg)
    size = size or stages.first_size or cache_size_for(cfg.data, list(stages.image_sizes), items.train_files)
    built = create_model(cfg.model.model_copy(update={"pretrained": False}), n_out, cfg.data.channels, size)
    return layer_rows(built.model, torch.zeros(2, cfg.data.channels, size, size))


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

"""Reading model weights from a file: the one reader for pretrained weights and local weight files."""

from __future__ import annotations

from pathlib import Path

import torch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (tensors only, never code), unwrapped from
    the common checkpoint layouts ({"state_dict": ...}, {"model": ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state

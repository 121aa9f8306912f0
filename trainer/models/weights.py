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


def load_weights(model: torch.nn.Module, state: dict, source: str | Path) -> None:
    """A checkpoint's weights into the model built for it, or a ValueError that names the file and
    says what does not fit (a checkpoint of another run or architecture), never torch's dump."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and (not torch.is_tensor(state[k]) or state[k].shape != own[k].shape)]
    if missing or unexpected or shapes:
        parts = [
            f"{len(v)} {what}"
            for v, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
            if v
        ]
        example = shapes[0] if shapes else (missing or unexpected)[0]
        detail = (
            f"{example}: {tuple(state[example].shape)} here, {tuple(own[example].shape)} in the model"
            if shapes and torch.is_tensor(state[example])
            else example
        )
        raise ValueError(
            f"{source}: its weights do not fit this run's model ({', '.join(parts)} tensors, "
            f"e.g. {detail}); is it a checkpoint of another run or architecture?"
        )
    model.load_state_dict(state)

"""Reading model weights from a file: the one reader for pretrained weights and local weight files."""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

import torch


class WeightsError(ValueError):
    """A weights file that is missing, no state dict, or of another architecture: the CLI exits 2 on it."""


# (path, meta state dict) while a config check builds the model: read_state_dict gives this instead
_HEADER: contextvars.ContextVar[tuple[str, dict] | None] = contextvars.ContextVar("weights_header", default=None)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (tensors only, never code), unwrapped from
    the common checkpoint layouts ({"state_dict": ...}, {"model": ...})."""
    given = _HEADER.get()
    if given is not None and given[0] == str(path):
        return given[1]
    return _read(Path(path), lazy=False)


def read_header(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensor names and shapes as meta tensors: safetensors' header, or a .pth mapped, not read."""
    state = _read(Path(path), lazy=True)
    return {k: torch.empty(v.shape, device="meta") if torch.is_tensor(v) else v for k, v in state.items()}


@contextlib.contextmanager
def header_only(path: str | Path):
    """Within it, read_state_dict(path) gives read_header(path) and new tensors are meta: a config check
    builds the model and loads the file into it as fit does, reading and allocating no weights."""
    token = _HEADER.set((str(path), read_header(path)))
    try:
        with torch.device("meta"):
            yield
    finally:
        _HEADER.reset(token)


def _read(path: Path, lazy: bool) -> dict:
    if path.is_dir():
        raise WeightsError(f"model.pretrained: {path} is a folder, not a weights file (.safetensors or .pth)")
    if not path.is_file():
        raise WeightsError(f"model.pretrained: weights file {path} not found")
    try:
        state = _safetensors(path, lazy) if path.suffix == ".safetensors" else _torch_file(path, lazy)
    except Exception as e:  # noqa: BLE001 -- whatever the reader's complaint, the file holds no state dict
        raise _not_weights(path, _reason(e)) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise _not_weights(path, f"it holds a {type(state).__name__} without tensors")
    return state


def _safetensors(path: Path, lazy: bool) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not lazy:
        return load_file(str(path))
    with safe_open(str(path), "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def _torch_file(path: Path, lazy: bool):
    with path.open("rb") as f:
        head = f.read(4)
    zipped = head == b"PK\x03\x04"  # torch.save's format; before torch 1.6 a pickle (protocol 2+)
    if not zipped and head[:1] != b"\x80":  # a text file, say: unpickling it would only give an opaque KeyError
        raise ValueError("neither a zip archive nor a pickle, as torch.save writes")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=lazy and zipped)


def _not_weights(path: Path, reason: str) -> WeightsError:
    return WeightsError(f"model.pretrained: {path} is not a safetensors or .pth state dict ({reason})")


def _reason(e: Exception) -> str:
    """The reader's complaint in a line: torch's weights-only refusal wraps one line in a page of advice."""
    said = " ".join(str(e).split("WeightsUnpickler error:")[-1].split())
    return said.split(". ")[0][:160] or type(e).__name__


def load_fitting(net: torch.nn.Module, state: dict, source: str | Path, optional=lambda key: False) -> None:
    """A pretrained file's tensors into `net` (its keys that `optional` picks may be missing: a new
    head). A missing, unexpected or wrongly shaped tensor is a WeightsError naming the file, never
    torch's dump nor silently random weights."""
    said = f"model.pretrained: {source} does not fit this architecture"
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: torch's last line names one
        raise WeightsError(f"{said}: {str(e).splitlines()[-1].strip()[:200]}") from None
    missing = [k for k in missing if not optional(k)]
    if unexpected or missing:
        raise WeightsError(
            f"{said}: {len(missing)} missing key(s) (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


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

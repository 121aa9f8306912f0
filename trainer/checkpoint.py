"""Checkpoints: written atomically, read with weights_only=True (tensors and plain data only)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: Path, write) -> None:
    """Writes through a temporary file in the same folder, fsyncs, then renames over the target,
    so a crash mid-save leaves the old file intact, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def save(state: dict, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load(path: Path, map_location="cpu") -> dict:
    """Refuses anything but tensors and plain containers: a checkpoint is data, never code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises UnpicklingError and friends for a hostile pickle
        raise ValueError(f"{path}: refused to load the checkpoint (not plain tensors and data, "
                         f"or corrupt): {str(e).splitlines()[0]}") from None


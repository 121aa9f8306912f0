"""Storage for what a run writes and reads: atomic writes, and tensors-only loading (a checkpoint is data,
never code). The base layer: every other package may use it, it uses none of them."""

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
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Makes the rename itself durable (a power cut after it cannot bring the old file back)."""
    with contextlib.suppress(OSError):  # some filesystems and Windows cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Temporary files a killed process left behind (a kill -9 skips the cleanup above)."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for f in stale:
        with contextlib.suppress(OSError):
            f.unlink()
    return stale


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
        raise ValueError(
            f"{path}: refused to load the checkpoint (not plain tensors and data, or corrupt): {str(e).splitlines()[0]}"
        ) from None


def pack_rows(rows: list[dict]) -> dict:
    """Rows of numbers as columns of float64/int64 tensors (compact, exact, weights_only-safe);
    columns that are not all numbers stay lists."""
    cols: dict = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r.get(key) for r in rows]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            cols[key] = torch.tensor(values, dtype=torch.int64)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            cols[key] = torch.tensor(values, dtype=torch.float64)
        else:
            cols[key] = values
    return {"n": len(rows), "columns": cols}


def unpack_rows(packed: dict) -> list[dict]:
    cols = {k: v.tolist() if torch.is_tensor(v) else list(v) for k, v in packed["columns"].items()}
    return [{k: cols[k][i] for k in cols} for i in range(packed["n"])]

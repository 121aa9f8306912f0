"""Seeds and random states: every generator a resumed run or lr_find must put back exactly."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def rng_state() -> dict:
    """Every random state a resumed run needs to continue exactly (plain data and tensors)."""
    state = {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": _py_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _np_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _py_state():
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]

"""Tiny generated datasets: a few classes of coloured shapes, a labels CSV, a short text."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Decoded-image caches go to a fresh temporary folder, never the user's ~/.cache.
os.environ["TRAINER_CACHE"] = tempfile.mkdtemp(prefix="trainer-test-cache-")
# No fsync in tests (a power cut is not what they try; the writes stay atomic): the suite's
# thousands of checkpoint and table writes cost minutes of fsync on this machine's disk.
os.environ.setdefault("TRAINER_FSYNC", "0")
# Under pytest-xdist (`make test` runs a worker per core) each worker computes on one thread: two
# workers of two threads each on two cores would wait on each other's descheduled threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

CLASSES = ["circle", "square", "stripe"]


def shape_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A class-dependent picture with noise, so a tiny model can learn it quickly."""
    yy, xx = np.mgrid[:size, :size] / size
    cx, cy = rng.uniform(0.35, 0.65, 2)
    if kind == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.08
        colour = (220, 60, 60)
    elif kind == "square":
        mask = (abs(xx - cx) < 0.25) & (abs(yy - cy) < 0.25)
        colour = (60, 200, 60)
    else:
        mask = np.sin(xx * 20 + cx * 6) > 0
        colour = (60, 60, 220)
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    img[mask] = colour
    return Image.fromarray(img)


def make_folder_dataset(
    root: Path, n_train: int = 12, n_valid: int = 6, size: int = 16, seed: int = 0, valid: str = "valid", test: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    for part, n in (("train", n_train), (valid, n_valid)):
        for c in CLASSES:
            d = root / part / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape_image(c, size, rng).save(d / f"{c}_{i}.png")
    if test:
        (root / "test").mkdir(parents=True, exist_ok=True)
        for i in range(test):
            shape_image(CLASSES[i % 3], size, rng).save(root / "test" / f"t{i}.png")
    return root


def make_csv_dataset(root: Path, n: int = 30, size: int = 16, seed: int = 0, multi: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows = ["id,label"]
    for i in range(n):
        c = CLASSES[i % 3]
        shape_image(c, size, rng).save(root / "train" / f"img{i}.jpg")
        label = f"{c} {'big' if i % 2 else 'small'}" if multi else c
        rows.append(f"img{i},{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def folder_data(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("shapes"), test=4)


@pytest.fixture(scope="session")
def csv_data(tmp_path_factory) -> Path:
    return make_csv_dataset(tmp_path_factory.mktemp("shapes_csv"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    words = ["the will to power", "beyond good and evil", "what is noble", "for those who think"]
    path.write_text("\n".join(words[i % 4] + f" {i}." for i in range(400)), encoding="utf-8")
    return path


def tiny_config(data: Path, **over) -> str:
    """A config text for the shapes data, small enough to train in a second."""
    stages = over.pop("stages", "[{name: all, epochs: 2, lr: 1.0e-2}]")
    arch = over.pop("arch", "convnet2")
    layout = over.pop("layout", "folder")
    extra = over.pop("data_extra", "")
    return (
        f"name: tiny\nseed: 0\ndata: {{layout: {layout}, path: '{data}', bs: 8{extra}}}\n"
        f"model: {{arch: {arch}}}\ntrain:\n  stages: {stages}\n"
    )

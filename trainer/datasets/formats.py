"""Reading the official dataset files (Fashion-MNIST IDX, CIFAR-10 pickles or JPEG tarball) and
writing them out as image folders or a labels CSV. Torch-free, like trainer.datasets.get_data, which
locates and verifies the sources and calls these."""

from __future__ import annotations

import csv
import gzip
import os
import pickle  # only through _DataUnpickler below: arrays, never code
import shutil
import struct
import tarfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image


class GetDataError(RuntimeError):
    """A problem the user can fix (missing/corrupt source, offline); main prints it without a traceback."""


FMNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FMNIST_CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- writing images


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    if magic != 0x0800 | ndim:  # 0x08 = unsigned byte, low byte = number of dimensions
        raise GetDataError(f"{path} is not an IDX file of {ndim} dims (magic {magic:#x})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _write_pngs(job: tuple) -> None:
    # compress_level=1: these are tiny images, so zlib effort barely shrinks them but costs time.
    root, images, labels, classes, start = job
    for i, (img, lab) in enumerate(zip(images, labels, strict=True), start):
        Image.fromarray(img).save(Path(root) / classes[lab] / f"{i:05d}.png", compress_level=1)


def write_split(root: Path, images: np.ndarray, labels: np.ndarray, classes) -> None:
    """Write images as root/<class>/<index>.png, in parallel when there are many."""
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    step = 5000
    jobs = [(str(root), images[s : s + step], labels[s : s + step], classes, s) for s in range(0, len(images), step)]
    if len(jobs) == 1:  # a pool costs more than it saves on tiny sets (tests)
        _write_pngs(jobs[0])
        return
    with Pool(min(4, os.cpu_count() or 1)) as pool:
        pool.map(_write_pngs, jobs)


def build_fashion_mnist(paths: list[Path], out: Path) -> None:
    files = dict(zip(FMNIST_FILES, paths, strict=True))
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(files[f"{prefix}-images-idx3-ubyte.gz"], 3)
        labels = _read_idx(files[f"{prefix}-labels-idx1-ubyte.gz"], 1)
        if len(images) != len(labels) or labels.max(initial=0) >= len(FMNIST_CLASSES):
            raise GetDataError(
                f"fashion_mnist {split}: {len(images)} images, {len(labels)} labels "
                f"(max label {labels.max(initial=0)}): source files do not match"
            )
        log(f"  {split}: writing {len(images)} PNGs")
        write_split(out / split, images, labels, FMNIST_CLASSES)


class _DataUnpickler(pickle.Unpickler):
    """The official CIFAR-10 batches are pickles of dicts of numpy arrays: allow exactly the numpy
    reconstructors and refuse every other global, so a tampered archive cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name} in a CIFAR batch")


def _cifar_pickle(paths: list[Path], out: Path) -> None:
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    with tarfile.open(paths[0]) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for split, names in batches.items():
            # Unpickling is acceptable because the tarball's sha256 matched the official one
            # (or the user vouched for it with --no-verify).
            dicts = [_DataUnpickler(tar.extractfile(members[n]), encoding="bytes").load() for n in names]
            images = np.concatenate([d[b"data"] for d in dicts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.concatenate([d[b"labels"] for d in dicts]).astype(np.int64)
            log(f"  {split}: writing {len(images)} PNGs")
            write_split(out / split, np.ascontiguousarray(images), labels, CIFAR_CLASSES)


def _cifar_jpeg(paths: list[Path], out: Path) -> None:
    # Streamed by hand rather than extractall: one gunzip pass, no per-file chmod/utime (about
    # 25% faster on 60k files), and only split/class/name members are written, so no path tricks.
    log("  extracting JPEG tarball")
    count = 0
    with tarfile.open(paths[0], "r|gz") as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not (
                m.isfile()
                and len(parts) == 3
                and parts[0] in ("train", "test")
                and parts[1] in CIFAR_CLASSES
                and not parts[2].startswith(".")
            ):
                continue
            (out / parts[0] / parts[1]).mkdir(parents=True, exist_ok=True)
            (out / parts[0] / parts[1] / parts[2]).write_bytes(tar.extractfile(m).read())
            count += 1
    if not count:
        raise GetDataError(f"{paths[0]} holds no train/<class>/<image> files")


def build_cifar10(paths: list[Path], out: Path) -> None:
    (_cifar_pickle if paths[0].name == "cifar-10-python.tar.gz" else _cifar_jpeg)(paths, out)


def build_csv(folder: Path, out: Path) -> None:
    """Flatten a folder layout into split/<id>.<ext> + a labels CSV, hardlinking to save disk."""
    for split, csv_name in (("train", "labels.csv"), ("test", "test_labels.csv")):
        files = sorted(folder.glob(f"{split}/*/*"), key=lambda p: (p.stem, p.parent.name))
        (out / split).mkdir(parents=True)
        with open(out / csv_name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label"])
            # Fresh sequential ids: CIFAR's JPEG names repeat across classes (airplane/0000.jpg, ...).
            for i, p in enumerate(files):
                target = out / split / f"{i:05d}{p.suffix}"
                try:
                    os.link(p, target)
                except OSError:  # filesystem without hardlinks
                    shutil.copy2(p, target)
                w.writerow([f"{i:05d}", p.parent.name])

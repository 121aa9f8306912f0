"""Decode every image once into one uint8 array (N, C, S, S), cached on disk.

Decoding JPEGs one at a time in every epoch is what makes most training loops slow on a small
machine (airbench's lesson): here each file is read once, resized once, and later epochs index
a memory-mapped array. The cache is keyed by the files (path, size, mtime) and the target size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import multiprocessing
import os
import signal
import stat
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.data.items import DataError
from trainer.storage import atomic_write_text


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("TRAINER_CACHE") or Path.home() / ".cache" / "trainer"
    return Path(root)


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images all become L or RGB (never an error)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent -> white, not black
        img = Image.alpha_composite(canvas, img)
    return img.convert("L" if channels == 1 else "RGB")


@dataclass(frozen=True)
class Fit:
    """How an image becomes a size x size square (data.resize, fastai's ResizeMethod): crop (the
    shorter side to size, the centre cut out), squish (both sides to size, the shape distorted), or
    pad (the longer side to size, the rest filled with the image's reflection or zeros)."""

    mode: str = "crop"
    pad: str = "reflection"

    def apply(self, img: Image.Image, size: int) -> Image.Image:
        if img.size == (size, size):
            return img
        if self.mode == "squish":
            return img.resize((size, size), Image.Resampling.BILINEAR)
        if self.mode == "pad":
            return self._padded(img, size)
        return ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR, centering=(0.5, 0.5))

    def _padded(self, img: Image.Image, size: int) -> Image.Image:
        w, h = img.size
        small = img.resize(
            (max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h)))), Image.Resampling.BILINEAR
        )
        arr = np.asarray(small)
        top, left = (size - arr.shape[0]) // 2, (size - arr.shape[1]) // 2
        widths = [(top, size - arr.shape[0] - top), (left, size - arr.shape[1] - left)] + [(0, 0)] * (arr.ndim - 2)
        mode = "symmetric" if self.pad == "reflection" else "constant"  # symmetric: works for any pad width
        return Image.fromarray(np.pad(arr, widths, mode=mode))

    def native(self, width: int, height: int) -> int:
        """The square's side when no size is set: nothing lost by cropping, nothing made up by padding."""
        return min(width, height) if self.mode == "crop" else max(width, height)

    def describe(self) -> str:
        return {
            "crop": "centre-crops them to squares (data.resize: squish or pad keeps all of each image)",
            "squish": "squishes them into squares (data.resize: squish)",
            "pad": f"pads them to squares with {'their reflection' if self.pad == 'reflection' else 'zeros'} "
            "(data.resize: pad)",
        }[self.mode]


# PIL warns about images declaring more pixels than MAX_IMAGE_PIXELS and fails at twice that;
# _open refuses both as a bad image (named), so the warning itself would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@contextlib.contextmanager
def _open(path: Path):
    """Image.open, refusing an image that declares an enormous size before its pixels are read."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: cannot read image (it declares too many pixels: {str(e)[:100]})") from None
    with img:
        if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise DataError(
                f"{path}: cannot read image (it declares {img.width}x{img.height} pixels, more than "
                f"{Image.MAX_IMAGE_PIXELS:,}: a decompression bomb or a huge scan)"
            )
        yield img


def read_image(path: Path, size: int | None, channels: int, fit: Fit = Fit()) -> np.ndarray:
    return read_image_shape(path, size, channels, fit)[0]


def read_image_shape(path: Path, size: int | None, channels: int, fit: Fit = Fit()) -> tuple[np.ndarray, bool]:
    """(C, size, size) uint8 pixels, and whether the image was square before."""
    try:
        with _open(path) as img:
            img.load()
            img = _to_mode(ImageOps.exif_transpose(img) or img, channels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {str(e)[:120]})") from None
    square = img.width == img.height
    if size is not None:
        img = fit.apply(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), square


def native_size(path: Path, fit: Fit = Fit()) -> int:
    try:
        with _open(path) as img:
            return fit.native(*img.size)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def _key(files: list[Path], size: int, channels: int, fit: Fit) -> str:
    h = hashlib.sha1(f"v2|{size}|{channels}|{fit.mode}|{fit.pad}".encode())
    folders: dict[str, str] = {}  # each folder resolved once: resolving 60,000 files one by one took 3.5 s
    for f in map(os.fspath, files):
        st = os.lstat(f)
        if stat.S_ISLNK(st.st_mode):  # a link: its target's path, size and time
            real, st = os.path.realpath(f), os.stat(f)
        else:
            folder, name = os.path.split(f)
            if folder not in folders:
                folders[folder] = os.path.realpath(folder or ".")
            real = os.path.join(folders[folder], name)
        h.update(f"{real}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def decode_all(
    files: list[Path],
    size: int,
    channels: int,
    skip_bad: bool = False,
    cache_dir: str | None = None,
    log=print,
    fit: Fit = Fit(),
) -> tuple[np.ndarray, list[int], int]:
    """(array of the good images, indices of the bad ones, how many were not square); from the
    cache when it can."""
    root = cache_root(cache_dir)
    key = _key(files, size, channels, fit)
    arr_path, meta_path = root / f"{key}.npy", root / f"{key}.json"
    if arr_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            return np.load(arr_path, mmap_mode="r"), meta["bad"], meta["non_square"]
        except (OSError, ValueError, KeyError):
            log(f"the image cache {arr_path} is damaged; decoding again")
    processes = in_processes(len(files))
    try:
        out = new_images((len(files), channels, size, size), shared=processes)
    except (MemoryError, OSError):
        gib = len(files) * channels * size * size / 2**30
        raise DataError(
            f"{len(files)} images at {size}px need {gib:,.1f} GiB of memory, more than this machine has; "
            "lower data.size / the stages' size, or use data.subset"
        ) from None
    log(f"decoding {len(files)} images at {size}px (once; cached in {root})")
    square = np.ones(len(files), dtype=bool)
    bad = _decode_into(out, square, files, size, channels, fit, skip_bad, processes)
    non_square = int((~square).sum())
    if bad:
        out = np.delete(out, bad, axis=0)
    tmp = arr_path.with_suffix(f".{os.getpid()}.tmp.npy")
    try:
        root.mkdir(parents=True, exist_ok=True)
        np.save(tmp, out)
        os.replace(tmp, arr_path)
        atomic_write_text(meta_path, json.dumps({"bad": bad, "n": len(files), "size": size, "non_square": non_square}))
    except OSError as e:  # a full disk costs the cache, not the run: the images are decoded already
        tmp.unlink(missing_ok=True)
        log(
            f"warning: could not write the image cache {arr_path} ({e.strerror or e}); training from memory, "
            "decoding again next time"
        )
        return out, bad, non_square
    return np.load(arr_path, mmap_mode="r"), bad, non_square


# Below this many images a pool of processes costs more to start than it saves.
PROCESSES_FROM = 2000
CHUNK = (256, 2000)  # images a worker decodes at a time, at least and at most


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_processes(n: int) -> bool:
    """Whether n images are decoded in forked processes: a small image's decode is mostly Python
    holding the GIL (60,000 Fashion-MNIST PNGs: 27.2 s on two threads, 7.6 s on two processes,
    scripts/bench_decode.py); threads elsewhere (PIL releases the GIL inside the codec)."""
    return n >= PROCESSES_FROM and _cores() > 1 and sys.platform == "linux"


def new_images(shape: tuple[int, ...], shared: bool) -> np.ndarray:
    """An uninitialised uint8 array; shared: in memory that forked children write into."""
    if not shared:
        return np.empty(shape, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, math.prod(shape)), dtype=np.uint8).reshape(shape)


def _decode_into(out, square, files, size, channels, fit, skip_bad, processes: bool) -> list[int]:
    """Fills out (from new_images, shared when processes) and square, a chunk of files per job;
    the indices of the bad images (skip_bad) or the first DataError."""
    workers = _cores()
    least = CHUNK[0] if processes else 1  # a thread takes a file at a time: large JPEGs free the GIL
    step = min(CHUNK[1], max(least, -(-len(files) // (workers * 8))))  # small enough to balance the cores
    jobs = [(i, files[i : i + step], size, channels, fit, skip_bad) for i in range(0, len(files), step)]
    bad: list[int] = []
    with _pool(out, min(workers, len(jobs)), processes) as pool:
        for (i, *_), (sq, chunk_bad) in zip(jobs, pool.map(_decode_chunk, jobs), strict=True):
            square[i : i + len(sq)] = sq
            bad += [i + j for j in chunk_bad]
    return bad


_SHARED: list = [None]  # the array the jobs write into (forked children inherit it, never pickled)


@contextlib.contextmanager
def _pool(out, workers: int, processes: bool):
    _SHARED[0] = out
    with warnings.catch_warnings():
        # Python 3.12+ warns of fork in a threaded process (torch's threads): the children run no torch
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        if processes:
            pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), initializer=_ignore_interrupts)
        else:
            pool = ThreadPoolExecutor(max(1, workers))
        try:
            yield pool
        finally:  # Ctrl-C or a bad image: the jobs not started are dropped
            pool.shutdown(wait=True, cancel_futures=True)
            _SHARED[0] = None


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent alone answers Ctrl-C (no worker tracebacks)


def _decode_chunk(job) -> tuple[np.ndarray, list[int]]:
    start, files, size, channels, fit, skip_bad = job
    out = _SHARED[0]
    square, bad = np.ones(len(files), dtype=bool), []
    for j, f in enumerate(files):
        try:
            out[start + j], square[j] = read_image_shape(f, size, channels, fit)
        except DataError:
            if not skip_bad:
                raise
            bad.append(j)
    return square, bad

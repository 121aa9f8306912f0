"""Decode every image once into one uint8 array (N, C, S, S), cached on disk.

Decoding JPEGs one at a time in every epoch is what makes most training loops slow on a small
machine (airbench's lesson): here each file is read once, resized once, and later epochs index
a memory-mapped array. The cache is keyed by the files (path, size, mtime) and the target size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
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
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
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
    try:
        out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    except MemoryError:
        gib = len(files) * channels * size * size / 2**30
        raise DataError(
            f"{len(files)} images at {size}px need {gib:,.1f} GiB of memory, more than this machine has; "
            "lower data.size / the stages' size, or use data.subset"
        ) from None
    bad: list[int] = []
    square = np.ones(len(files), dtype=bool)

    def work(i: int):
        try:
            out[i], square[i] = read_image_shape(files[i], size, channels, fit)
        except DataError:
            if not skip_bad:
                raise
            bad.append(i)

    log(f"decoding {len(files)} images at {size}px (once; cached in {root})")
    # PIL releases the GIL while decoding, so threads use every core without copying arrays.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(work, range(len(files))))
    bad.sort()
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

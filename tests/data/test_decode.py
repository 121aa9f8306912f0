"""Decoding many images in forked processes (small images' decodes hold the GIL) gives the array,
the bad images and the error that the thread pool gives; the cache's key, each folder resolved
once, is the key of each file resolved."""

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data import decode
from trainer.data.items import DataError

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the process pool is used on Linux only")


def mixed_images(root, n=30):
    """Colour, grayscale, RGBA and non-square images, and (of more than 23) two files that are not images."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        h, w = (16, 16) if i % 3 else (12, 20)
        mode = ("RGB", "L", "RGBA")[i % 3]
        shape = (h, w) if mode == "L" else (h, w, len(mode))
        files.append(root / f"{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(files[-1])
    if n > 23:
        files[7].write_text("not an image")
        files[23].write_bytes(files[22].read_bytes()[:40])  # truncated
    return files


def decoded(files, monkeypatch, processes: bool, skip_bad: bool = True):
    monkeypatch.setattr(decode, "CHUNK", (4, 4))  # several chunks: their offsets are checked too
    out = decode.new_images((len(files), 3, 16, 16), shared=processes)
    square = np.ones(len(files), dtype=bool)
    bad = decode._decode_into(out, square, files, 16, 3, decode.Fit(), skip_bad, processes)
    return out, square, bad


@linux_only
def test_processes_decode_what_threads_decode(tmp_path, monkeypatch):
    files = mixed_images(tmp_path)
    pids = tmp_path / "pids"
    read = decode.read_image_shape

    def noting_pid(*args):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return read(*args)

    monkeypatch.setattr(decode, "read_image_shape", noting_pid)
    out_t, square_t, bad_t = decoded(files, monkeypatch, processes=False)
    pids.unlink()
    out_p, square_p, bad_p = decoded(files, monkeypatch, processes=True)
    assert set(pids.read_text().split()) - {str(os.getpid())}  # decoded in other processes
    assert bad_t == bad_p == [7, 23]
    good = [i for i in range(len(files)) if i not in bad_p]
    assert np.array_equal(out_t[good], out_p[good]) and out_p[good].any()
    assert np.array_equal(square_t, square_p) and not square_p[0] and square_p[1]


@linux_only
def test_a_bad_image_decoded_in_a_process_is_named(tmp_path, monkeypatch):
    files = mixed_images(tmp_path)
    with pytest.raises(DataError, match="07.png: cannot read image"):
        decoded(files, monkeypatch, processes=True, skip_bad=False)


def test_the_cache_key_is_each_file_resolved(tmp_path, monkeypatch):
    files = mixed_images(tmp_path / "real", n=6)
    (tmp_path / "linked").symlink_to(tmp_path / "real")  # a folder through a link
    (tmp_path / "one.png").symlink_to(files[0])  # a file that is a link
    monkeypatch.chdir(tmp_path)
    files = [Path("linked") / files[1].name, Path("real/../real") / files[2].name, Path("one.png"), files[3]]
    h = hashlib.sha1(b"v2|16|3|crop|reflection")
    for f in files:
        h.update(f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}\n".encode())
    assert decode._key(files, 16, 3, decode.Fit()) == h.hexdigest()[:20]  # caches made before still found

"""Decoding a folder of images into the uint8 cache: a thread pool against a pool of forked processes.

    python scripts/bench_decode.py data/fashion_mnist/train --size 28 --channels 1 --limit 12000
    python scripts/bench_decode.py data/cifar10/train --size 32 --limit 12000

Prints the best of --rounds wall seconds for each way, interleaved (this machine is shared), and
checks that both give the same array. No cache is read or written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.data import decode  # noqa: E402

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def decode_with(files: list[Path], size: int, channels: int, processes: bool) -> tuple[float, np.ndarray]:
    out = decode.new_images((len(files), channels, size, size), shared=processes)
    square = np.ones(len(files), dtype=bool)
    t = time.perf_counter()
    decode._decode_into(out, square, files, size, channels, decode.Fit(), False, processes)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--limit", type=int, default=12000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    files = sorted(f for f in args.folder.rglob("*") if f.suffix.lower() in EXTENSIONS)[: args.limit]
    if not files:
        sys.exit(f"no images under {args.folder}")
    torch.ones(512, 512) @ torch.ones(512, 512)  # torch's threads started, as in a run
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(files)} images from {args.folder} at {args.size}px, {cores} cores")
    best = {"threads": float("inf"), "processes": float("inf")}
    arrays = {}
    for _ in range(args.rounds):
        for way in best:
            seconds, arrays[way] = decode_with(files, args.size, args.channels, way == "processes")
            best[way] = min(best[way], seconds)
    assert np.array_equal(arrays["threads"], arrays["processes"]), "the two ways decoded different pixels"
    for way, seconds in best.items():
        print(
            f"  {way:<10} {seconds:6.2f} s  ({seconds / len(files) * 1e6:5.0f} us an image)  x{seconds / best['threads']:.2f}"
        )


if __name__ == "__main__":
    main()

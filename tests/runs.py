"""Helpers for the reliability tests: a resumable config, simulated crashes, run comparisons,
and starting trainer under torchrun."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from trainer import storage as checkpoint
from trainer.run.rundir import read_table
from trainer.train.loop import Callback

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *trainer_args: str) -> list[str]:
    """`python -m torch.distributed.run ... -m trainer ARGS` on this machine, on a free port."""
    return [
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=localhost:{free_port()}",
        "-m",
        "trainer",
        *trainer_args,
    ]


def pythonpath(*paths: Path) -> str:
    """This checkout (and `paths`) first, then whatever PYTHONPATH the tests run under (the packages
    of a machine that installs them outside the interpreter's site, as the GPU machine does)."""
    return os.pathsep.join([str(ROOT), *map(str, paths), *filter(None, [os.environ.get("PYTHONPATH")])])


def resumable_config(data: Path, every: int = 1, name: str = "tiny") -> str:
    """Two stages (frozen body, then all), dropout and augmentation: every kind of random state a
    resume must restore. 36 training images at bs 8: 4 batches an epoch, 12 steps in all."""
    return (
        f"name: {name}\nseed: 0\ndata: {{layout: folder, path: '{data}', bs: 8}}\n"
        "model: {arch: bnresnet, layers: [8, 16], ps: 0.25}\n"
        "transforms: {preset: side_on, max_zoom: 1.1}\n"
        f"train:\n  checkpoint_every: {every}\n  stages:\n"
        "    - {name: head, epochs: 1, lr: 1.0e-2, freeze: body}\n"
        "    - {name: all, epochs: 2, lr: 5.0e-3, unfreeze: true}\n"
    )


class Crash(Exception):
    """Stands for the process dying: nothing after it runs, state on disk is what is left."""


class CrashAt(Callback):
    """Raises Crash at the n-th occurrence of an event (1-based), at a given callback order:
    after_batch at order 99 comes after every checkpoint of that step; after_epoch at order 15
    falls between the Recorder's metrics row (10) and the Checkpointer (20)."""

    def __init__(self, n: int, event: str = "after_batch", order: int = 99):
        self.n, self.event, self.order, self.count = n, event, order, 0

    def __call__(self, event: str, learner) -> None:
        if event == self.event:
            self.count += 1
            if self.count == self.n:
                raise Crash(f"{event} #{self.n}")


def metrics_without_seconds(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_table(Path(run_dir) / "metrics.csv")]


def assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Bitwise equality of two checkpoints (tensors with torch.equal, the rest with ==)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            if k != "seconds":
                assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def assert_same_run(reference: Path, run: Path) -> None:
    """Same metrics (but seconds), same final checkpoint: weights, optimizer, random states,
    recorder steps; same best.pt."""
    got, want = metrics_without_seconds(run), metrics_without_seconds(reference)
    assert got == want, f"metrics.csv differs:\n  resumed   {got}\n  reference {want}"
    for name in ("last.pt", "best.pt"):
        assert_same_state(
            checkpoint.load(reference / "checkpoints" / name), checkpoint.load(run / "checkpoints" / name), name
        )


class SendSignal(Callback):
    """Sends a signal to this process at the n-th occurrence of an event, as a user or a job
    scheduler would; order 0 runs before the Checkpointer and SaveOnSignal see the step."""

    order = 0

    def __init__(self, signum: int, n: int, event: str = "after_batch"):
        self.signum, self.n, self.event, self.count = signum, n, event, 0

    def __call__(self, event: str, learner) -> None:
        if event == self.event:
            self.count += 1
            if self.count == self.n:
                import os

                os.kill(os.getpid(), self.signum)

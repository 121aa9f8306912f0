"""status.json and the run's lock: whether a run is running, finished, interrupted, diverged or
failed, and whether a process is training it right now.

A run killed with SIGKILL still says "running"; the lock tells: a training process holds an OS
lock on RUN_DIR/.lock, which the OS drops however the process ends, so a second process (a
resume of a live run, or --out into it) is refused and a stale lock cannot exist.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from trainer.run.rundir import RunDir
from trainer.run.signals import Interrupted
from trainer.train.guard import TrainingDiverged
from trainer.train.loop import Callback, Learner

STATUS = "status.json"


class RunInUse(ValueError):
    """Another process is training this run directory; the CLI prints it and exits 2."""


def write_status(run: RunDir, status: str, **extra) -> None:
    run.write_json(STATUS, {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def read_status(run_dir: Path) -> str:
    try:
        return RunDir(Path(run_dir)).read_json(STATUS).get("status", "unknown")
    except (OSError, ValueError, AttributeError):
        return "unknown"


def lock(run_dir: Path):
    """An exclusive lock on RUN_DIR/.lock, or None when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not protected from a second writer
        return open(Path(run_dir) / ".lock", "a")
    f = open(Path(run_dir) / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def in_use(run_dir: Path) -> bool:
    if not (Path(run_dir) / ".lock").exists():
        return False
    f = lock(run_dir)
    if f is not None:
        f.close()
    return f is None


class Clock:
    """The run's times for status.json: its first start (kept by a resume), and the wall seconds
    spent training it over every session; `ending` says how a run that raised nothing ended."""

    def __init__(self, run: RunDir, device: str, resumed: bool):
        earlier = _read(run.path) if resumed else {}
        self.run, self.device, self.t0 = run, device, time.monotonic()
        self.started = earlier.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S")
        self.before = float(earlier.get("seconds", 0.0)) if isinstance(earlier.get("seconds"), (int, float)) else 0.0
        self.ending, self.reason = "finished", None

    def write(self, status: str, **extra) -> None:
        seconds = round(self.before + time.monotonic() - self.t0, 1)
        write_status(self.run, status, started=self.started, seconds=seconds, device=self.device, **extra)

    def stopped_early(self, reason: str) -> None:
        self.ending, self.reason = "stopped", reason


class StatusEachEpoch(Callback):
    """status.json's wall seconds brought up to date after every epoch, so that a run killed
    without a word (kill -9, a lost machine) still tells how long it had trained."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def after_epoch(self, learn: Learner) -> None:
        self.clock.write("running")


def _read(run_dir: Path) -> dict:
    try:
        data = RunDir(Path(run_dir)).read_json(STATUS)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def run_status(run: RunDir, device: str = "", resumed: bool = False):
    """Holds the run's lock; running while inside; finished, stopped (early), interrupted, diverged
    or failed after. Ranks other than 0 of a multi-process run neither lock nor write (rank 0 does,
    for them all). Yields the run's Clock."""
    clock = Clock(run, device, resumed)
    if not run.writes:
        yield clock
        return
    held = lock(run.path)
    if held is None:
        raise RunInUse(f"{run.path} is being trained by another process right now")
    try:
        with _status(clock):
            yield clock
    finally:
        held.close()


@contextlib.contextmanager
def _status(clock: Clock):
    clock.write("running")
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        clock.write("interrupted")
        raise
    except TrainingDiverged as e:
        clock.write("diverged", message=str(e))
        raise
    except BaseException as e:
        clock.write("failed", message=f"{type(e).__name__}: {e}"[:500])
        raise
    clock.write(clock.ending, **({"reason": clock.reason} if clock.reason else {}))

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


@contextlib.contextmanager
def run_status(run: RunDir):
    """Holds the run's lock; running while inside; finished, interrupted, diverged or failed after.
    Ranks other than 0 of a multi-process run neither lock nor write (rank 0 does, for them all)."""
    if not run.writes:
        yield
        return
    held = lock(run.path)
    if held is None:
        raise RunInUse(f"{run.path} is being trained by another process right now")
    try:
        with _status(run):
            yield
    finally:
        held.close()


@contextlib.contextmanager
def _status(run: RunDir):
    write_status(run, "running")
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        write_status(run, "interrupted")
        raise
    except TrainingDiverged as e:
        write_status(run, "diverged", message=str(e))
        raise
    except BaseException as e:
        write_status(run, "failed", message=f"{type(e).__name__}: {e}"[:500])
        raise
    write_status(run, "finished")

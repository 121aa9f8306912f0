"""Ctrl-C and SIGTERM during training: save a checkpoint at the next step boundary, then stop.

The first SIGINT or SIGTERM only sets a flag; the SaveOnSignal callback sees it after the current
batch, writes last.pt (the exact mid-epoch position) and raises Interrupted, which the CLI turns
into exit code 130 (SIGINT) or 143 (SIGTERM) with the command that resumes the run. A second
signal exits at once without saving (last.pt still holds the last checkpoint: saves are atomic).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from trainer.train.loop import Callback, Learner

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after saving last.pt; exit_code is 128 + the signal number."""

    def __init__(self, signum: int, where: str, run_dir=None):
        self.signum, self.where, self.run_dir = signum, where, run_dir
        super().__init__(f"interrupted by {signal.Signals(signum).name}: saved checkpoints/last.pt at {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The signal handler: remembers the first signal, exits at once on the second."""

    def __init__(self, exit_now=os._exit, grace: float = 0.0):
        self.signum: int | None = None
        self._exit_now = exit_now
        # Under a launcher a Ctrl-C reaches every process from the terminal and again from the
        # launcher: a second signal within `grace` seconds is the same request, not a second one.
        self.grace, self._first_at = grace, 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __call__(self, signum: int, frame=None) -> None:
        # os.write, not print: a handler can run in the middle of another print to the same stream
        if self.signum is not None and time.monotonic() - self._first_at < self.grace:
            return
        if self.signum is not None:
            os.write(
                2, b"\nsecond interrupt: exiting now without saving (checkpoints/last.pt holds the last checkpoint)\n"
            )
            self._exit_now(128 + signum)
            return
        self.signum, self._first_at = signum, time.monotonic()
        os.write(
            2,
            f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
            "stopping (press Ctrl-C again to quit at once)\n".encode(),
        )


@contextlib.contextmanager
def graceful_stop(exit_now=os._exit, grace: float = 0.0):
    """Installs the handler for SIGINT and SIGTERM while training (main thread only) and puts
    the previous handlers back after."""
    stop = StopRequest(exit_now, grace)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, stop)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class SaveOnSignal(Callback):
    """Runs after the Recorder and the Checkpointer, so the saved state includes this step.
    `save(learn)` writes last.pt (the Checkpointer's save_last) into `run_dir`.

    With several processes, `agree` (the largest signal number over all ranks, one tiny
    all-reduce per step) makes a signal to any rank stop every rank after the same step; each
    rank takes part in the save (rank 0 writes) and raises Interrupted."""

    def __init__(self, stop: StopRequest, save, run_dir, describe=lambda learn: "", agree=None):
        self.stop, self.save, self.run_dir, self.describe = stop, save, run_dir, describe
        self.agree = agree or (lambda signum: signum)

    def _signal(self) -> int:
        return self.agree(self.stop.signum or 0)

    def after_batch(self, learn: Learner) -> None:
        signum = self._signal()
        if not signum:
            return
        self.save(learn)
        raise Interrupted(signum, self.describe(learn), self.run_dir)

    def after_epoch(self, learn: Learner) -> None:
        signum = self._signal()
        if signum:  # the Checkpointer has just written the epoch's last.pt
            raise Interrupted(signum, self.describe(learn) + " (end of the epoch)", self.run_dir)

"""A trial's epochs as Optuna sees them: the monitored metric reported after each, the pruner's
verdict, and the trial's time budget (objective.max_seconds)."""

from __future__ import annotations

import math
import time

import optuna

from trainer.run.checkpoints import monitored
from trainer.run.early_stop import StoppedEarly
from trainer.train.loop import Callback, Learner


def now() -> float:
    """The sweep's clock for trial times and budgets (a test replaces it)."""
    return time.monotonic()


class ReportEpochs(Callback):
    """The monitored metric to the trial after every epoch; the pruner's verdict ends the run as an
    early stop (its files complete, status "stopped"), and the trial is then recorded as pruned.
    The last epoch is never pruned by the pruner: its cost is spent, and its value is a finished
    trial's. With a time budget (objective.max_seconds), a trial on course to exceed it is stopped
    after any epoch, and one that finished over it is noted in `over` (the trial is then pruned)."""

    order = 40  # after the epoch's checkpoint, row and early-stopping verdict

    def __init__(
        self,
        trial: optuna.Trial,
        monitor: str,
        last_epoch: int,
        earlier: tuple[float, ...] = (),
        max_seconds: float | None = None,
        started: float | None = None,
        clock=None,
    ):
        self.trial, self.monitor, self.last_epoch, self.epochs, self.pruned = trial, monitor, last_epoch, 0, None
        self.max_seconds, self.over = max_seconds, None
        self.clock = clock or (lambda: now())  # looked up when called: a test may replace the module's clock
        self.started = (
            self.clock() if started is None else started
        )  # the trial's start, earlier processes' time included
        self.first_epoch_at, self.epochs_here = None, 0
        for value in earlier:  # a resumed trial's epochs before it was lost: the pruner compares whole curves
            self.epochs += 1
            if math.isfinite(value):
                trial.report(value, self.epochs)

    def before_epoch(self, learn: Learner) -> None:
        if self.first_epoch_at is None:
            self.first_epoch_at = self.clock()

    def after_epoch(self, learn: Learner) -> None:
        self.epochs += 1
        self.epochs_here += 1
        value = monitored(learn, self.monitor)
        if math.isfinite(value):
            self.trial.report(value, self.epochs)
        if self.max_seconds is not None and (over := self.over_budget()):
            if self.epochs >= self.last_epoch:
                self.over = over
                return
            self.pruned = f"pruned after epoch {self.epochs}: {over}"
            raise StoppedEarly(self.pruned)
        if self.epochs < self.last_epoch and self.trial.should_prune():
            self.pruned = f"pruned after epoch {self.epochs} ({self.monitor} {value:.4g})"
            raise StoppedEarly(self.pruned)

    def over_budget(self) -> str | None:
        """Why the trial breaks its time budget (None: it keeps it): the seconds so far, plus the
        epochs left at the mean of this process's epochs."""
        t = self.clock()
        first = t if self.first_epoch_at is None else self.first_epoch_at
        per_epoch = (t - first) / max(1, self.epochs_here)
        spent = t - self.started
        total = spent + per_epoch * max(0, self.last_epoch - self.epochs)
        if total <= self.max_seconds:
            return None
        budget = f"the time budget of {self.max_seconds:g} s (objective.max_seconds)"
        if self.epochs >= self.last_epoch:
            return f"took {spent:.0f} s, over {budget}"
        return f"on course for {total:.0f} s, over {budget}"

"""Early stopping (train.early_stop): the run stops after `patience` epochs in a row without an
improvement of more than `min_delta` in the monitored metric, as Lightning's EarlyStopping.

Two callbacks share one state: the judge runs before the checkpoint is written (so last.pt holds
this epoch's verdict and a resume goes on exactly), the stop after the epoch's row is printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.run.checkpoints import monitored
from trainer.run.topk import improves
from trainer.train.loop import Callback, Learner


class StoppedEarly(Exception):
    """The run stopped early; fit ends normally and status.json says "stopped"."""


@dataclass
class EarlyStopState:
    """One per run (owned by the session, saved in every checkpoint as "early_stop")."""

    monitor: str
    mode: str
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_row: int = 0  # the metrics.csv row of the best value
    wait: int = 0  # epochs since it

    def update(self, value: float, row: int) -> None:
        if self.best is None or improves(value, self.best, self.mode, self.min_delta):
            if math.isfinite(value):
                self.best, self.best_row, self.wait = value, row, 0
                return
        self.wait += 1

    @property
    def exhausted(self) -> bool:
        return self.wait >= self.patience

    def reason(self) -> str:
        best = f"best {self.best:.4g} at epoch {self.best_row}" if self.best is not None else "no finite value yet"
        return (
            f"stopped early: {self.monitor} has not improved by more than {self.min_delta:g} for "
            f"{self.wait} epoch(s) ({best}; patience {self.patience})"
        )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_row": self.best_row, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_row, self.wait = state.get("best"), state.get("best_row", 0), state.get("wait", 0)


class JudgeEpoch(Callback):
    """Updates the state with the epoch's value, before the checkpoint saves it."""

    def __init__(self, state: EarlyStopState, rows):
        self.state, self.rows = state, rows  # rows: the run's metrics rows so far

    def after_epoch(self, learn: Learner) -> None:
        self.state.update(monitored(learn, self.state.monitor), len(self.rows))


class StopWhenExhausted(Callback):
    """Ends the run once the patience is used up, unless this epoch was the run's last anyway."""

    def __init__(self, state: EarlyStopState, last_stage: bool):
        self.state, self.last_stage = state, last_stage

    def after_epoch(self, learn: Learner) -> None:
        s = learn.state
        if self.state.exhausted and not (self.last_stage and s.epoch + 1 >= s.n_epochs):
            raise StoppedEarly(self.state.reason())

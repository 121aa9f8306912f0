"""The callbacks that write checkpoints: last.pt and best.pt, SGDR cycle snapshots, and the
multi-label threshold that goes with best.pt. What a checkpoint holds is trainer/run/state.py's."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer import storage
from trainer.run.rundir import RunDir
from trainer.run.topk import TopK, improves
from trainer.train.callbacks import Recorder
from trainer.train.guard import TrainingDiverged
from trainer.train.loop import Callback, Learner
from trainer.train.optim import current_lr
from trainer.train.parallel import unwrap


@dataclass
class BestSoFar:
    """The best value of the monitored metric (checkpoint.monitor, valid_loss unless set) at the
    image size the run is at: best.pt holds its weights. One per run, written only by the
    Checkpointer, saved in every checkpoint as "best"; a stage that changes the image size starts
    it again (losses at 64 px and at 128 px do not compare)."""

    value: float = math.inf
    monitor: str = "valid_loss"
    mode: str = "min"

    def __post_init__(self):
        if self.mode == "max" and self.value == math.inf:
            self.value = -math.inf

    def better(self, value: float) -> bool:
        """A finite value better than every one before it."""
        return improves(value, self.value, self.mode)

    def reset(self) -> None:
        self.value = math.inf if self.mode == "min" else -math.inf


def monitored(learn: Learner, name: str) -> float:
    """The epoch's value of a metric: a validation metric, or the epoch's train loss."""
    s = learn.state
    if name in s.valid:
        return float(s.valid[name])
    return float(s.train_loss) if name == "train_loss" else math.nan


def non_finite(tensors: dict) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity."""
    return [
        k for k, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
    ]


class Checkpointer(Callback):
    """last.pt at every epoch end (and every N batches); best.pt only for a better, finite value of
    the monitored metric; with `top`, the k best of the run. Weights holding a NaN or an infinity
    are never written: the run stops instead, and the last good checkpoints stay as they were."""

    def __init__(
        self,
        run: RunDir,
        snapshot: Callable[[Learner, bool], dict],
        best: BestSoFar,
        every: int | None = None,
        top: TopK | None = None,
    ):
        self.run, self.snapshot, self.best, self.every, self.top = run, snapshot, best, every, top
        self.saved_best = False  # whether this epoch's state became best.pt

    def after_batch(self, learn: Learner) -> None:
        s = learn.state
        if self.every and (s.batch + 1) % self.every == 0 and s.batch + 1 < s.n_batches:
            self.save_last(learn)

    def after_epoch(self, learn: Learner) -> None:
        value = monitored(learn, self.best.monitor)
        self.saved_best = self.best.better(value)
        if self.saved_best:
            self.best.value = value  # first, so that last.pt records the best value it has seen
        row = len(self.run.metrics)  # this epoch's row of metrics.csv (the recorder has added it)
        stage = self.run.metrics[-1].get("stage", "") if self.run.metrics else ""
        entry = self.top.entry(value, row, stage) if self.top is not None else None
        if entry is not None:
            self.top.admit(entry)  # first too: last.pt holds the list these files make
        state = self._checked(learn, True)
        # best.pt and top-k before last.pt: a crash between them redoes this epoch, which
        # rewrites the same files
        if self.saved_best:
            self._save({**state, **best_keys(self.best.monitor, value)}, "best.pt")
        if entry is not None and self.run.writes:
            self.top.write(self.run.checkpoints, state, entry)
        self._save(state, "last.pt")

    def save_last(self, learn: Learner, epoch_end: bool = False) -> dict:
        """last.pt now (a signal asks for it at a step boundary)."""
        state = self._checked(learn, epoch_end)
        self._save(state, "last.pt")
        return state

    def _save(self, state: dict, name: str) -> None:
        if self.run.writes:  # every rank builds the state (a collective gathers the random states); rank 0 writes
            storage.save(state, self.run.checkpoints / name)

    def _checked(self, learn: Learner, epoch_end: bool) -> dict:
        state = self.snapshot(learn, epoch_end)
        bad = non_finite(state["model"])
        if bad:
            s = learn.state
            raise TrainingDiverged(
                f"the weights are not finite ({', '.join(bad[:3])}) after epoch "
                f"{s.epoch + 1}, batch {s.batch + 1} (step {s.step} of {s.total_steps}), "
                f"lr {current_lr(learn.opt):.3g}; not saved: checkpoints/ keep the last good "
                "state. Try a lower lr or train.clip"
            )
        return state


class CycleSaver(Callback):
    """SGDR snapshots: the weights at the end of every cycle, checkpoints/cycle-<k>.pt, for a
    snapshot ensemble (`trainer predict RUN --ensemble cycles`). fastai's fit_sgdr kept none.
    k counts over the run: `first` is the number of this stage's first cycle (from the plan)."""

    def __init__(self, run: RunDir, cycle_ends: tuple[int, ...], first: int, stage_index: int):
        self.run, self.ends, self.first, self.stage_index = run, list(cycle_ends), first, stage_index

    def after_epoch(self, learn: Learner) -> None:
        epoch = learn.state.epoch + 1
        if epoch in self.ends:
            k = self.first + self.ends.index(epoch)
            storage.save(
                {
                    "model": unwrap(learn.model).state_dict(),
                    "stage": self.stage_index,
                    "epoch": epoch,
                    "cycle": k,
                    "valid": dict(learn.state.valid),
                },
                self.run.checkpoints / f"cycle-{k}.pt",
            )


def best_keys(monitor: str, value: float) -> dict:
    """What best.pt adds to a checkpoint: the value that made it best (and best_valid_loss, which
    runs before the monitor existed read)."""
    old = {"best_valid_loss": value} if monitor == "valid_loss" else {}
    return {"best_metric": {"name": monitor, "value": value}, **old}


class SaveThreshold(Callback):
    """Multi-label: writes threshold.json (the threshold chosen on the validation set) whenever
    the Checkpointer has just saved a new best.pt, so predict uses the threshold of that model."""

    def __init__(self, run: RunDir, checkpointer: Checkpointer, recorder: Recorder):
        self.run, self.checkpointer, self.recorder = run, checkpointer, recorder

    def after_epoch(self, learn: Learner) -> None:
        v = learn.state.valid
        if "threshold" in v and self.checkpointer.saved_best:
            self.run.write_json(
                "threshold.json",
                {
                    "threshold": v.get("thresholds", v["threshold"]),
                    "fbeta": v.get("fbeta"),
                    "epoch": self.recorder.last_row.get("epoch"),
                },
            )

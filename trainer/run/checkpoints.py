"""The callbacks that write checkpoints: last.pt and best.pt, SGDR cycle snapshots, and the
multi-label threshold that goes with best.pt. What a checkpoint holds is trainer/run/state.py's."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer import storage
from trainer.run.rundir import RunDir
from trainer.train.callbacks import Recorder
from trainer.train.guard import TrainingDiverged
from trainer.train.loop import Callback, Learner
from trainer.train.optim import current_lr
from trainer.train.parallel import unwrap


@dataclass
class BestSoFar:
    """The lowest validation loss at the image size the run is at: best.pt holds its weights.
    One per run, written only by the Checkpointer, saved in every checkpoint as "best"; a stage
    that changes the image size starts it again (losses at 64 px and at 128 px do not compare)."""

    loss: float = math.inf


def non_finite(tensors: dict) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity."""
    return [
        k for k, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
    ]


class Checkpointer(Callback):
    """last.pt at every epoch end (and every N batches); best.pt only for a better, finite loss.
    Weights holding a NaN or an infinity are never written: the run stops instead, and the last
    good last.pt and best.pt stay as they were."""

    def __init__(
        self, run: RunDir, snapshot: Callable[[Learner, bool], dict], best: BestSoFar, every: int | None = None
    ):
        self.run, self.snapshot, self.best, self.every = run, snapshot, best, every

    def after_batch(self, learn: Learner) -> None:
        s = learn.state
        if self.every and (s.batch + 1) % self.every == 0 and s.batch + 1 < s.n_batches:
            self.save_last(learn)

    def after_epoch(self, learn: Learner) -> None:
        loss = learn.state.valid.get("valid_loss", math.nan)
        better = math.isfinite(loss) and loss < self.best.loss
        if better:
            self.best.loss = loss  # first, so that last.pt records the best loss it has seen
        state = self._checked(learn, True)
        if better:
            # best.pt before last.pt: a crash between them redoes this epoch and rewrites the same best
            self._save({**state, "best_valid_loss": loss}, "best.pt")
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


class SaveThreshold(Callback):
    """Multi-label: writes threshold.json (the threshold chosen on the validation set) whenever
    the Checkpointer has just saved a new best.pt, so predict uses the threshold of that model."""

    def __init__(self, run: RunDir, best: BestSoFar, recorder: Recorder):
        self.run, self.best, self.recorder = run, best, recorder

    def after_epoch(self, learn: Learner) -> None:
        v = learn.state.valid
        if "threshold" in v and v.get("valid_loss") == self.best.loss:
            self.run.write_json(
                "threshold.json",
                {
                    "threshold": v.get("thresholds", v["threshold"]),
                    "fbeta": v.get("fbeta"),
                    "epoch": self.recorder.last_row.get("epoch"),
                },
            )

"""The checkpoint: what it holds, written and read here and nowhere else, and how a resumed run
is put back exactly where the checkpoint left it.

A checkpoint (version 2) is a dict of tensors and plain data (torch.load(weights_only=True)
reads it):
  model, optimizer, scaler       the whole model (the weight average with train.ema), its optimizer
  stage, epoch, batch            where to continue: the next batch to train
  n_batches                      batches an epoch of that stage had (a changed dataset is refused)
  found_lr                       the peak lr lr_find chose for that stage (lr: auto), or None
  best                           the best value of checkpoint.monitor so far at the current image size
  top, early_stop                the top-k list (checkpoint.keep) and the early-stopping state, when used
  track                          the trackers' state (the MLflow run id), when tracking
  train_loss_sum/_count, skipped_steps   the partial epoch's loss sums
  rng (+ rng_ranks)              every random state (each process's, with several)
  callbacks (+ callbacks_ranks)  the state of the callbacks that keep some, by declared name
  metrics                        the metrics.csv rows so far
best.pt adds best_metric (and best_valid_loss); top-<k>.pt hold the model and the position only. Data order and augmentation are functions of (seed, epoch, batch),
so no loader state is needed. On the CPU with the same seed, a run killed at any moment and
resumed ends with the same metrics and bitwise the same weights.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer import storage
from trainer.models.weights import load_weights
from trainer.run.checkpoints import BestSoFar
from trainer.run.early_stop import EarlyStopState
from trainer.run.plots import History
from trainer.run.resume import ResumeError
from trainer.run.rundir import RunDir
from trainer.run.topk import TopK
from trainer.train.loop import Callback, Learner
from trainer.train.parallel import unwrap
from trainer.train.plan import StagePlan
from trainer.train.randomness import rng_state, set_rng_state
from trainer.train.world import World

VERSION = 2
# Version 1 (before 2026-12) keyed callback state by class name and kept "best" inside it.
V1_CALLBACKS = {"Recorder": "recorder", "NonFiniteGuard": "guard", "ResetState": "hidden_state", "WeightAverage": "ema"}


def snapshot(
    learn: Learner,
    stage: StagePlan,
    epoch_end: bool,
    model: torch.nn.Module,
    best: BestSoFar,
    callbacks: dict[str, Callback],
    per_rank: dict[str, Callback],
    run: RunDir,
    world: World,
    top: TopK | None = None,
    early: EarlyStopState | None = None,
    trackers=None,
) -> dict:
    """A checkpoint of this moment. `model` is the whole model (the learner may train only its
    head, on precomputed activations); `callbacks` names every callback with state, `per_rank`
    those of them whose state differs between processes (saved for each)."""
    s, rng = learn.state, rng_state()
    return {
        "version": VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": learn.opt.state_dict(),
        "scaler": learn.scaler.state_dict(),
        "stage": stage.index,
        "epoch": s.epoch + 1 if epoch_end else s.epoch,
        "batch": 0 if epoch_end else s.batch + 1,
        "n_batches": len(learn.train_dl),
        "found_lr": stage.found_lr,
        "best": best.value,
        **({"top": top.state_dict()} if top is not None else {}),
        **({"early_stop": early.state_dict()} if early is not None else {}),
        **({"track": trackers.state_dict()} if trackers else {}),
        "train_loss_sum": s.epoch_loss_sum,
        "train_loss_count": s.epoch_loss_count,
        "skipped_steps": s.skipped_steps,
        "rng": rng,
        **world.per_rank("rng_ranks", rng),
        "callbacks": {name: cb.state_dict() for name, cb in callbacks.items()},
        **world.per_rank("callbacks_ranks", {name: cb.state_dict() for name, cb in per_rank.items()}),
        "metrics": [dict(r) for r in run.metrics],
    }


@dataclass
class ResumePoint:
    run_dir: Path
    state: dict
    stage: int  # the stage to run next
    epoch: int  # the epoch within it
    batch: int  # the batch within that epoch
    fresh_stage: bool  # the checkpoint closed the previous stage: only weights and random states carry over
    stale: list[Path] = field(default_factory=list)  # temporary files of an interrupted save, removed

    @property
    def best(self) -> float:
        return self.state["best"]

    @property
    def found_lr(self) -> float | None:
        """The lr lr_find chose for the stage to continue (None for a stage that starts afresh)."""
        return None if self.fresh_stage else self.state["found_lr"]

    def describe(self, stage_names: list[str]) -> str:
        if self.stage >= len(stage_names):
            return "after the last stage"
        return (
            f"stage {self.stage + 1}/{len(stage_names)} '{stage_names[self.stage]}', epoch {self.epoch + 1}, "
            f"batch {self.batch + 1}"
        )


def load_point(run_dir: Path, stage_epochs: tuple[int, ...], mode: str = "min") -> ResumePoint:
    """Reads last.pt (refusing anything but tensors and plain data) and says where to continue.
    mode: whether best.pt's metric is better lower or higher."""
    stale = storage.remove_stale_temps(run_dir / "checkpoints")
    path = run_dir / "checkpoints" / "last.pt"
    state = upgrade(storage.load(path), path)
    best_pt = run_dir / "checkpoints" / "best.pt"
    position = (int(state["stage"]), int(state["epoch"]), int(state["batch"]))
    best = _readable(best_pt)
    if best is not None:  # a crash between writing best.pt and last.pt: best.pt is the newer
        if (best.get("stage", -1), best.get("epoch", -1), best.get("batch", -1)) > position:
            newer = best.get("best_metric", {}).get("value", best.get("best_valid_loss", math.nan))
            if math.isfinite(newer):
                state["best"] = (min if mode == "min" else max)(state["best"], newer)
    stage, epoch, batch = position
    if stage >= len(stage_epochs):
        raise ResumeError(
            f"{run_dir}: the checkpoint is at stage {stage + 1}, the config has {len(stage_epochs)} stage(s)"
        )
    if batch == 0 and epoch >= stage_epochs[stage]:
        return ResumePoint(run_dir, state, stage + 1, 0, 0, True, stale)
    return ResumePoint(run_dir, state, stage, epoch, batch, False, stale)


def _readable(path: Path) -> dict | None:
    """A checkpoint that may be missing or damaged (best.pt: only its loss is read here)."""
    try:
        state = storage.load(path)
    except (FileNotFoundError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def upgrade(state: dict, path: Path) -> dict:
    """A version 1 checkpoint in this version's form (the same numbers, moved to their declared
    places), so runs interrupted before the change resume exactly; anything else is refused."""
    if not isinstance(state, dict):
        raise ResumeError(f"{path}: not a resumable checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = sorted({"model", "optimizer", "stage", "epoch", "batch", "rng"} - set(state))
    version = state.get("version", 0)
    if missing or version not in (1, VERSION):
        raise ResumeError(
            f"{path}: not a resumable checkpoint of version {VERSION} (it is version {version}"
            + (f", missing {missing}" if missing else "")
            + "); start the run again without --resume"
        )
    if version == 1:
        callbacks = state.get("callbacks", {})
        state["best"] = callbacks.get("Checkpointer", {}).get("best", math.inf)
        groups = state["optimizer"].get("param_groups", [])  # v1 kept the stage's peak lrs there
        state["found_lr"] = groups[-1].get("peak_lr") if groups else None
        state["callbacks"] = {V1_CALLBACKS[k]: v for k, v in callbacks.items() if k in V1_CALLBACKS}
        if "callbacks_ranks" in state:
            state["callbacks_ranks"] = [
                {V1_CALLBACKS[k]: v for k, v in r.items() if k in V1_CALLBACKS} for r in state["callbacks_ranks"]
            ]
    return state


def start_from(
    point: ResumePoint,
    run: RunDir,
    history: History,
    best: BestSoFar,
    stage_names: list[str],
    log,
    top: TopK | None = None,
    early: EarlyStopState | None = None,
) -> None:
    """Before the first stage: the metrics rows up to the checkpoint (rows written after it are
    dropped, they are computed again), the per-step record and validation points of the plots,
    the best value so far, the top-k list (its files put back at their ranks) and the early-stopping
    state; log.txt says when, where from and with which command."""
    run.metrics = [dict(r) for r in point.state.get("metrics", [])]
    run.rewrite_metrics()
    recorder = point.state["callbacks"].get("recorder")
    if recorder is not None:  # the record spans the whole run, earlier stages included
        history.steps[:] = storage.unpack_rows(recorder["steps"])
        history.valid[:] = [tuple(p) for p in recorder.get("points", [])]
    best.value = point.best
    if early is not None:
        early.load_state_dict(point.state.get("early_stop", {}))
    if top is not None:
        top.load_state_dict(point.state.get("top", {}))
        lost = top.repair(run.checkpoints) if run.writes else []
        for e in lost:
            log(f"top-k: the state of epoch {e['row']} ({top.monitor} {e['value']:.4g}) was lost in the crash")
    log(
        f"resuming {point.run_dir} from checkpoints/last.pt: {point.describe(stage_names)}"
        + (f" (removed {len(point.stale)} temporary file(s) of an interrupted save)" if point.stale else "")
        + f"; command: {shlex.join(sys.argv)}"
    )


def restore_weights(model: torch.nn.Module, point: ResumePoint) -> None:
    """The checkpoint's weights into the whole model, before the stage's learner is built (so a
    precomputed stage computes its activations from them)."""
    weights = point.state["model"]
    if not isinstance(weights, dict):
        raise ResumeError(f"{point.run_dir / 'checkpoints' / 'last.pt'}: its model weights are not a state dict")
    load_weights(unwrap(model), weights, point.run_dir / "checkpoints" / "last.pt")


def restore(
    learn: Learner,
    point: ResumePoint,
    callbacks: dict[str, Callback],
    per_rank: dict[str, Callback],
    best: BestSoFar,
    world: World,
) -> tuple[int, int]:
    """Puts the rest of the checkpoint into the stage's freshly built learner; returns (start
    epoch, start batch). The random states go last, so nothing done while building can shift them."""
    state = point.state
    if not point.fresh_stage:
        if state.get("n_batches", len(learn.train_dl)) != len(learn.train_dl):
            raise ResumeError(
                f"{point.run_dir}: the checkpoint's epoch had {state['n_batches']} batches, "
                f"this data gives {len(learn.train_dl)} (did the dataset change?)"
            )
        learn.opt.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16 (a CPU run): the fresh scaler is right
            learn.scaler.load_state_dict(state["scaler"])
        s = learn.state
        s.epoch_loss_sum, s.epoch_loss_count = state["train_loss_sum"], state["train_loss_count"]
        s.skipped_steps = state.get("skipped_steps", 0)
        best.value = point.best
        own = world.own(state, "callbacks_ranks", {})  # this process's own, where it differs per rank
        for name, cb in {**callbacks, **per_rank}.items():
            saved = own.get(name, state["callbacks"].get(name)) if name in per_rank else state["callbacks"].get(name)
            if saved is not None:
                cb.load_state_dict(saved)
    set_rng_state(world.own(state, "rng_ranks", state["rng"]))
    return point.epoch, point.batch

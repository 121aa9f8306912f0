"""The learner for one stage, built in two steps with every callback named:

1. `step_learner`: the model as the stage trains it (frozen groups, precomputed activations,
   DDP), its optimizer and loaders, and the callbacks that are part of the training step. This
   is all lr_find needs, so `lr: auto` can find the stage's lr before the rest exists.
2. `add_run_callbacks`: the schedule (with the stage's peak lrs, found or given), the recorder,
   checkpoints, plots, progress, signals.

Callbacks see each event in the order of one table, ORDER. The builder returns them as named
handles (`Handles`), so no code searches a list of callbacks for one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

from trainer.data.shard import shard_train, shard_valid
from trainer.models import check_input
from trainer.run.checkpoints import Checkpointer, CycleSaver, SaveThreshold
from trainer.run.early_stop import JudgeEpoch, StopWhenExhausted
from trainer.run.plots import RunPlots
from trainer.run.progress import ProgressReport
from trainer.run.session import Session
from trainer.run.signals import SaveOnSignal, StopRequest
from trainer.run.state import snapshot
from trainer.run.status import StatusEachEpoch
from trainer.run.tracking import TrackEpochs
from trainer.train.callbacks import FreezeNorms, GradClip, Recorder, ResetState, ScheduleLR
from trainer.train.ema import WeightAverage
from trainer.train.guard import LossCheck, NonFiniteGuard, guard_every
from trainer.train.loop import Callback, Learner
from trainer.train.mixing import MixBatch, mix_batches
from trainer.train.optim import create_optimizer, param_groups
from trainer.train.parallel import Accumulate, DistributedLearner, SyncLoss, check_batch, wrap
from trainer.train.plan import StagePlan, apply_freeze

SMOKE_BATCHES = 2

# The order in which callbacks see every event, top to bottom. A callback passed to fit() from
# outside takes its place by its own `order` (0 unless it says otherwise); on a tie, the
# earlier-added goes first, and the run's own callbacks are added first.
ORDER = {
    "mix": -50,  # MixUp / CutMix: the whole batch, before accumulate splits it (not in STEP: lr_find runs unmixed)
    "accumulate": -40,  # splits the batch before anything reads the loss
    "sync_loss": -30,  # the loss averaged over processes, before anything reads it
    "hidden_state": -20,  # char models start each epoch from a zero hidden state
    "schedule": -10,  # this step's lr and momentum
    "freeze_norms": -5,  # frozen BatchNorm layers stay in eval mode
    "clip": 0,
    "guard": 5,  # a non-finite loss or gradient stops the run (or skips the step)
    "loss_check": 6,  # smoke runs: a loss that is not finite or explodes fails the run
    "recorder": 10,  # the step's loss and lr; the epoch's metrics row
    "ema": 15,  # the weight average moves after the step; validation swaps it in
    "early_stop": 19,  # judges the epoch before the checkpoint saves its verdict
    "cycles": 20,  # SGDR snapshots
    "checkpointer": 20,  # last.pt and best.pt, after the recorder and the average
    "threshold": 21,  # threshold.json next to a new best.pt
    "track": 18,  # TensorBoard / MLflow: the step's loss and lr, the epoch's row (before last.pt: see tracking.py)
    "plots": 25,
    "status": 25,  # status.json's wall time, after the epoch's checkpoint
    "signal": 25,  # Ctrl-C / SIGTERM: save and stop, after everything of this step
    "progress": 30,
    "stop_early": 35,  # ends the run after the epoch's row is saved, logged and printed
}


@dataclass
class Handles:
    """Every callback of a stage's learner, by name (None: not used in this run)."""

    mix: MixBatch | None = None
    accumulate: Accumulate | None = None
    sync_loss: SyncLoss | None = None
    hidden_state: ResetState | None = None
    schedule: ScheduleLR | None = None
    freeze_norms: FreezeNorms | None = None
    clip: GradClip | None = None
    guard: NonFiniteGuard | None = None
    loss_check: LossCheck | None = None
    recorder: Recorder | None = None
    ema: WeightAverage | None = None
    early_stop: JudgeEpoch | None = None
    cycles: CycleSaver | None = None
    checkpointer: Checkpointer | None = None
    threshold: SaveThreshold | None = None
    track: TrackEpochs | None = None
    plots: RunPlots | None = None
    status: StatusEachEpoch | None = None
    signal: SaveOnSignal | None = None
    progress: ProgressReport | None = None
    stop_early: StopWhenExhausted | None = None

    def named(self, names=None) -> dict[str, Callback]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None and (names is None or f.name in names)
        }

    def with_state(self) -> dict[str, Callback]:
        """The callbacks a checkpoint saves, by their declared names."""
        return self.named(("recorder", "guard", "hidden_state", "ema"))

    def per_rank(self) -> dict[str, Callback]:
        """Those whose state differs between processes: each rank has its own text streams."""
        return self.named(("hidden_state",))


def _in_order(handles: Handles, names) -> list[Callback]:
    callbacks = []
    for name, cb in handles.named(names).items():
        cb.order = ORDER[name]
        callbacks.append(cb)
    return callbacks


STEP = ("accumulate", "sync_loss", "freeze_norms", "clip")


def step_learner(sess: Session, stage: StagePlan) -> tuple[Learner, Handles]:
    """The stage's model, optimizer, loaders and the callbacks that shape each step."""
    cfg, built, world = sess.cfg, sess.built, sess.world
    frozen = apply_freeze(built.groups, stage.freeze_to, stage.train_bn)
    opt = create_optimizer(
        cfg.train.optimizer,
        param_groups(built.groups, stage.lrs, stage.wds),
        cfg.train.momentum,
        cfg.train.betas,
        cfg.train.eps,
        cfg.train.nesterov,
    )
    check_batch(stage.bs, world.world_size, cfg.train.accumulate, cfg.data.layout)
    train_dl, valid_dl = sess.bundle.loaders(stage.bs, stage.size)
    if getattr(sess.bundle, "images", None) is not None:
        check_input(built.model, cfg.model.arch, sess.bundle.in_channels, train_dl.size, sess.device)
    if sess.smoke:
        train_dl.limit, valid_dl.limit = SMOKE_BATCHES, 1
    model = built.model
    if stage.precompute:  # the frozen body runs once; this stage trains the head on its activations
        from trainer.train.precompute import head_only

        model, train_dl, valid_dl = head_only(
            built,
            stage,
            cfg.model.arch,
            train_dl,
            valid_dl,
            sess.precision,
            getattr(cfg.data, "cache_dir", None),
            sess.log,
        )
    train_dl = shard_train(train_dl, world.rank, world.world_size)
    valid_dl = shard_valid(valid_dl, world.rank, world.world_size)
    model = wrap(model, sess.device, world)
    handles = Handles(  # mix is made here (a text config fails before lr_find), added with the run's callbacks
        mix=None if stage.precompute else mix_batches(cfg, sess.task.name, sess.bundle.n_out, world.rank),
        accumulate=Accumulate(cfg.train.accumulate) if cfg.train.accumulate > 1 else None,
        sync_loss=SyncLoss(world) if world.enabled else None,
        freeze_norms=FreezeNorms(frozen, stage.train_bn, stage.bn_freeze, built.model),
        clip=GradClip(cfg.train.clip) if cfg.train.clip else None,
    )
    kind, extra = (DistributedLearner, {"world": world}) if world.enabled else (Learner, {})
    learner = kind(
        model, opt, sess.task, train_dl, valid_dl, _in_order(handles, STEP), sess.precision, sess.device, **extra
    )
    return learner, handles


def add_run_callbacks(
    sess: Session, learner: Learner, handles: Handles, stage: StagePlan, stop: StopRequest | None = None
) -> Handles:
    """The rest of the stage's callbacks, in place on the learner and its handles. Rank 0 alone
    draws, prints and saves cycle snapshots; every rank takes part in checkpoints (rank 0 writes)."""
    cfg, run, world = sess.cfg, sess.run, sess.world
    every = cfg.train.checkpoint_every if isinstance(cfg.train.checkpoint_every, int) else None
    handles.hidden_state = ResetState()
    handles.schedule = ScheduleLR(stage.schedule, stage.lrs)
    handles.guard = NonFiniteGuard(cfg.train.on_nan, guard_every(sess.device))
    handles.loss_check = LossCheck(stage.name) if sess.smoke else None
    extra = {"peak_lr": stage.found_lr} if stage.find_lr else {}
    handles.recorder = Recorder(
        stage.name, stage.first_epoch, sess.history.steps, run.add_metrics, extra, sess.history.valid
    )
    handles.ema = WeightAverage(learner.model, cfg.train.ema) if cfg.train.ema else None
    handles.cycles = (
        CycleSaver(run, stage.cycle_ends, stage.first_cycle, stage.index)
        if stage.cycle_ends and world.is_main
        else None
    )
    save = partial(
        snapshot,
        stage=stage,
        model=sess.built.model,
        best=sess.best,
        callbacks=handles.with_state(),
        per_rank=handles.per_rank(),
        run=run,
        world=world,
        top=sess.top,
        early=sess.early,
        trackers=sess.trackers,
    )
    if sess.early is not None:
        handles.early_stop = JudgeEpoch(sess.early, run.metrics)
        handles.stop_early = StopWhenExhausted(sess.early, stage.index == len(sess.plan.stages) - 1)
    handles.checkpointer = Checkpointer(run, lambda learn, end: save(learn, epoch_end=end), sess.best, every, sess.top)
    if sess.task.name == "multi_label":
        handles.threshold = SaveThreshold(run, handles.checkpointer, handles.recorder)
    if world.is_main:
        if sess.trackers:
            handles.track = TrackEpochs(sess.trackers, sess.history.steps, run.metrics, cfg.track.every)
        handles.plots = RunPlots(run, sess.history)
        handles.status = StatusEachEpoch(sess.clock) if sess.clock is not None else None
        handles.progress = ProgressReport(handles.recorder, sess.console, log=sess.log)
    if stop is not None:
        describe = partial(_where, stage=stage, n_stages=len(sess.plan.stages))
        handles.signal = SaveOnSignal(
            stop, handles.checkpointer.save_last, run.path, describe, world.largest if world.enabled else None
        )
    for cb in _in_order(handles, [n for n in ORDER if n not in STEP]) + sess.extra_callbacks:
        learner.add(cb)
    return handles


def stage_learner(sess: Session, stage: StagePlan, stop: StopRequest | None = None) -> tuple[Learner, Handles]:
    """Both steps at once, for a stage whose lr is known (tools and tests)."""
    learner, handles = step_learner(sess, stage)
    return learner, add_run_callbacks(sess, learner, handles, stage, stop)


def _where(learn: Learner, stage: StagePlan, n_stages: int) -> str:
    s = learn.state
    return (
        f"stage {stage.index + 1}/{n_stages} '{stage.name}', epoch {s.epoch + 1}/{s.n_epochs}, "
        f"after batch {s.batch + 1}/{s.n_batches}"
    )

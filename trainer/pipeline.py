"""The spine: config -> data -> model -> stages -> run directory. Read it top to bottom."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer import callbacks as cbs
from trainer import distributed
from trainer import resume as resuming
from trainer.config import Config, dump_config
from trainer.data.bundle import build_bundle
from trainer.data.shard import shard_train, shard_valid
from trainer.data.images import resolve_stats
from trainer.ema import WeightAverage
from trainer.guard import NonFiniteGuard, guard_every
from trainer.loop import Learner
from trainer.lr_find import LrFindResult, lr_find, save_result
from trainer.metrics import check_loss, make_task
from trainer.models import Built, check_input, create_model
from trainer.optim import create_optimizer, param_groups
from trainer.parallel import Accumulate, DistributedLearner, SyncLoss, check_batch
from trainer.plots import History, RunPlots
from trainer.progress import ProgressReport
from trainer.rundir import RunDir, new_run_dir
from trainer.runtime import (compile_model, compile_ready, pick_device, pick_precision, random_seed, rng_state,
                             seed_everything, set_deterministic, set_threads)
from trainer.signals import Interrupted, SaveOnSignal, graceful_stop
from trainer.stages import (apply_freeze, cycle_ends, expand_stages, freeze_points, is_auto, per_group,
                            stage_schedule)

SMOKE_BATCHES = 2
SMOKE_LR_FIND_IT = 4
SMOKE_MAX_SIZE = 64  # px: a smoke run checks the pipeline, not the accuracy
LAUNCHER_GRACE = 2.0  # s: a launcher forwards the Ctrl-C its processes already got (trainer/signals.py)


@dataclass
class Session:
    """Everything a stage needs, built once per run."""

    cfg: Config
    run: RunDir
    bundle: object
    built: Built
    device: torch.device
    precision: object
    task: object
    smoke: bool = False
    log: object = print
    console: object = None
    extra_callbacks: list = field(default_factory=list)
    history: History = field(default_factory=History)  # every step of every stage, for the plots
    cycles_saved: int = 0
    world: distributed.World = distributed.SINGLE  # this process among those training together


@dataclass
class FitResult:
    run_dir: Path
    metrics: list[dict]
    final: dict


def prepare(cfg: Config, out: str | Path | None = None, smoke: bool = False, console=None) -> Session:
    """With several processes, rank 0 picks the seed and the run directory for all of them and
    is the only one to write or print."""
    world, device = distributed.start(cfg.distributed.backend, pick_device(cfg.device))
    seed = cfg.seed if cfg.seed is not None else distributed.from_main(random_seed)
    cfg = cfg.model_copy(update={"seed": seed})  # a random seed is still recorded
    if smoke:
        cfg = smoke_sizes(cfg)
    seed_everything(seed)
    set_deterministic(cfg.deterministic)
    threads = set_threads()
    if smoke and out is None:
        out = distributed.from_main(lambda: tempfile.mkdtemp(prefix=f"trainer-smoke-{cfg.name}-"))
    run = RunDir(distributed.from_main(lambda: new_run_dir(cfg.name, out)), writes=world.is_main)
    run.write_text("config.yaml", dump_config(cfg))

    def log(line: str) -> None:
        run.log(line)

    with distributed.local_main_first():  # one decode per machine into the image cache
        bundle = build_bundle(cfg, seed, device, smoke, log=lambda m: (log(m), world.is_main and print(m, flush=True)))
    sizes = [s.size for s in cfg.train.stages if s.size]
    built = create_model(cfg.model, bundle.n_out, bundle.in_channels, sizes[0] if sizes else bundle_size(bundle))
    synced = distributed.use_sync_bn(cfg.train.sync_bn, built, device)
    if synced is not None:  # torch BatchNorm (CUDA) and the course's BnLayer (any backend)
        run.log(f"sync_bn: {synced} BatchNorm layer(s) now compute their statistics over every process's batch")
    if world.rank > 0:  # every rank built the same weights; each draws its own dropout masks from here
        torch.manual_seed((seed + world.rank) % 2**63)
    if getattr(bundle, "mean", None) is not None and cfg.data.stats is None and built.pretrained and built.stats:
        bundle.mean, bundle.std = resolve_stats(built.stats, bundle.images.train_x, True)
    for name, data in bundle.files_to_save().items():
        run.write_json(name, data)
    built.model.to(device)
    if cfg.channels_last:
        built.model.to(memory_format=torch.channels_last)
    if cfg.compile:
        why_not = "a smoke run checks the pipeline, not the speed" if smoke else compile_ready(device)
        if why_not:
            log(f"compile: skipped ({why_not})")
        else:
            compile_model(built.model)
    check_loss(cfg.train.loss, bundle.task_kind)
    task_kind = cfg.train.loss if cfg.train.loss != "auto" else bundle.task_kind
    task = make_task({"cross_entropy": "single_label", "bce": "multi_label"}.get(task_kind, task_kind),
                     cfg.train.label_smoothing)
    n_params = sum(p.numel() for p in built.model.parameters())
    precision = pick_precision(cfg.amp, device)
    log(f"run {run.path}: seed {seed}, device {device} ({threads} CPU threads), amp {precision.name}, "
        f"{n_params:,} parameters"
        + (f", {world.world_size} processes ({distributed.backend_for(cfg.distributed.backend, device)})"
           if world.enabled else ""))
    return Session(cfg, run, bundle, built, device, precision, task, smoke, log, console,
                   world=world)


def smoke_sizes(cfg: Config, limit: int = SMOKE_MAX_SIZE) -> Config:
    """Smoke runs scale every image size down by one factor so the largest is `limit` px: a
    ResNet-34 at 224 -> 299px then smokes in seconds on a CPU, and the sizes keep their ratios
    (progressive resizing still changes the size between stages)."""
    if cfg.data.layout == "text":
        return cfg
    sizes = [s for s in [cfg.data.size, cfg.data.cache_size, *(st.size for st in cfg.train.stages)] if s]
    if not sizes or max(sizes) <= limit:
        return cfg
    f = limit / max(sizes)
    scale = lambda s: max(8, round(s * f)) if s else s  # noqa: E731
    data = cfg.data.model_copy(update={"size": scale(cfg.data.size), "cache_size": scale(cfg.data.cache_size)})
    stages = [st.model_copy(update={"size": scale(st.size)}) for st in cfg.train.stages]
    return cfg.model_copy(update={"data": data, "train": cfg.train.model_copy(update={"stages": stages})})


def bundle_size(bundle) -> int:
    images = getattr(bundle, "images", None)
    return images.size if images is not None else 0


def make_learner(sess: Session, stage, stage_index: int, freeze_to: int, epoch_offset: int = 0) -> Learner:
    cfg, groups = sess.cfg, sess.built.groups
    n = len(groups)
    frozen = apply_freeze(groups, freeze_to, stage.train_bn)
    lrs = per_group(stage.lr, n, "lr", stage.name)
    wds = per_group(stage.wd if stage.wd is not None else cfg.train.wd, n, "wd", stage.name)
    opt = create_optimizer(cfg.train.optimizer, param_groups(groups, lrs, wds), cfg.train.momentum,
                           cfg.train.betas, cfg.train.eps, cfg.train.nesterov)
    world = sess.world
    check_batch(stage.bs or cfg.data.bs, world.world_size, cfg.train.accumulate, cfg.data.layout)
    train_dl, valid_dl = sess.bundle.loaders(stage.bs or cfg.data.bs, stage.size)
    if getattr(sess.bundle, "images", None) is not None:
        check_input(sess.built.model, cfg.model.arch, sess.bundle.in_channels, train_dl.size, sess.device)
    if sess.smoke:
        train_dl.limit = valid_dl.limit = SMOKE_BATCHES
    model = sess.built.model
    if stage.precompute:  # the frozen body runs once; this stage trains the head on its activations
        from trainer.precompute import head_only

        model, train_dl, valid_dl = head_only(sess.built, stage, cfg.model.arch, train_dl, valid_dl,
                                              sess.precision, getattr(cfg.data, "cache_dir", None), sess.log)
    train_dl, valid_dl = shard_train(train_dl, world.rank, world.world_size), \
        shard_valid(valid_dl, world.rank, world.world_size)
    model = distributed.wrap(model, sess.device)
    steps = sess.history.steps
    callbacks = [cbs.ScheduleLR(stage_schedule(stage)),
                 cbs.Recorder(sess.run, stage.name, epoch_offset, len(steps), steps), RunPlots(sess.run, sess.history),
                 cbs.FreezeNorms(frozen, stage.train_bn, stage.bn_freeze, sess.built.model),
                 NonFiniteGuard(cfg.train.on_nan, guard_every(sess.device)), cbs.ResetState(),
                 ProgressReport(sess.console, log=sess.log)]
    if cfg.train.clip:
        callbacks.append(cbs.GradClip(cfg.train.clip))
    if stage.save_cycles and world.is_main:
        callbacks.append(cbs.CycleSaver(sess.run, cycle_ends(stage), sess.cycles_saved + 1, stage_index))
    if cfg.train.accumulate > 1:
        callbacks.append(Accumulate(cfg.train.accumulate))
    if cfg.train.ema:
        callbacks.append(WeightAverage(model, cfg.train.ema))
    if world.enabled:
        callbacks.append(SyncLoss())
    if not world.is_main:  # rank 0 prints and draws for all
        callbacks = [c for c in callbacks if not isinstance(c, (RunPlots, ProgressReport))]
    learner = (DistributedLearner if world.enabled else Learner)(
        model, opt, sess.task, train_dl, valid_dl, callbacks + sess.extra_callbacks, sess.precision, sess.device)
    every = cfg.train.checkpoint_every if isinstance(cfg.train.checkpoint_every, int) else None
    ckpt = cbs.Checkpointer(sess.run, lambda lr_, end: snapshot(lr_, stage_index, end, sess.run, sess.built.model),
                            every, best_so_far=sess.__dict__.get("best", math.inf))
    learner.add(ckpt)
    if sess.task.name == "multi_label":
        learner.add(cbs.SaveThreshold(sess.run, ckpt))
    return learner


def snapshot(learn: Learner, stage_index: int, epoch_end: bool, run: RunDir | None = None, model=None) -> dict:
    """A checkpoint: tensors and plain data only, so weights_only loading can read it. `model` is
    the whole model when the learner trains only part of it (precomputed activations)."""
    s, rng = learn.state, rng_state()
    return {"model": distributed.unwrap(model or learn.model).state_dict(), "optimizer": learn.opt.state_dict(),
            "scaler": learn.scaler.state_dict(), "stage": stage_index,
            "epoch": s.epoch + 1 if epoch_end else s.epoch, "batch": 0 if epoch_end else s.batch + 1,
            "rng": rng, **distributed.rank_states("rng_ranks", rng), "train_loss_sum": s.epoch_loss_sum,
            "train_loss_count": s.epoch_loss_count,
            **resuming.loop_state(learn, run)}


def fit(cfg: Config, out: str | Path | None = None, smoke: bool = False, console=None,
        resume: str | Path | None = None, callbacks=()) -> FitResult:
    """Runs every stage. resume: a run directory, or "auto" for the newest unfinished run of this
    config's name, to continue exactly where its last checkpoint left off (trainer/resume.py).
    Under torchrun, rank 0 finds the run and reads its checkpoint, and hands both to every rank."""
    distributed.start(cfg.distributed.backend, pick_device(cfg.device))
    same_end = False  # every rank finished, or every rank stopped on a signal at the same step
    try:
        cfg, out, point = distributed.from_main(lambda: locate(cfg, out, smoke, resume))
        sess = prepare(cfg, out, smoke, console)
        sess.extra_callbacks += list(callbacks)
        result = run_stages(sess, point)
        same_end = True
        return result
    except Interrupted:
        same_end = True
        raise
    finally:
        distributed.stop(wait=same_end)


def locate(cfg: Config, out, smoke: bool, resume):
    """(config, run directory, resume point) before any work: a resumed run's own seed and
    checkpoint, or a check that --out is not a run already."""
    point = None
    if resume is not None:
        if smoke:
            raise resuming.ResumeError("--resume and --smoke do not go together (a smoke run is throwaway)")
        out = resuming.resolve(resume, cfg.name)
        cfg = resuming.reconcile(cfg, out)
        point = resuming.load_point(out, [st.total_epochs for st in expand_stages(cfg.train.stages)])
    elif out is not None:
        resuming.check_fresh_out(Path(out))
    return cfg, out, point


def run_stages(sess: Session, point=None) -> FitResult:
    """Every stage in order, each with a fresh optimizer, into one metrics.csv."""
    stages = expand_stages(sess.cfg.train.stages)
    points = freeze_points(stages, len(sess.built.groups))
    if point is not None:
        resuming.start_session(sess, point, [st.name for st in stages])
    epoch_offset = 0
    grace = LAUNCHER_GRACE if sess.world.enabled else 0.0
    agree = distributed.largest if sess.world.enabled else None
    with resuming.run_status(sess.run), graceful_stop(grace=grace) as stop:
        for k, (stage, freeze_to) in enumerate(zip(stages, points)):
            if point is not None and k < point.stage:
                epoch_offset += stage.total_epochs
                continue
            if k > 0 and image_size(stage, sess.cfg) != image_size(stages[k - 1], sess.cfg):
                sess.best = math.inf  # losses at another image size do not compare: best.pt is of the last size
            sess.log(f"stage {k + 1}/{len(stages)} '{stage.name}': {stage.total_epochs} epoch(s), "
                     f"{stage.schedule}, first trainable group {freeze_to}")
            learner = make_learner(sess, stage, k, freeze_to, epoch_offset)
            learner.add(SaveOnSignal(stop, lambda lr_, k=k: _where(lr_, k, stages), agree))
            resuming_here = point is not None and k == point.stage
            if is_auto(stage.lr) and not resuming_here:  # a resumed stage's optimizer holds its found lr
                use_found_lr(sess, learner, stage)
            start = resuming.restore(learner, point) if resuming_here else (0, 0)
            learner.fit(stage.total_epochs, *start)
            sess.cycles_saved += sum(len(c.saved) for c in learner.callbacks if isinstance(c, cbs.CycleSaver))
            sess.best = next(c.best for c in learner.callbacks if isinstance(c, cbs.Checkpointer))
            epoch_offset += stage.total_epochs
    final = sess.run.metrics[-1] if sess.run.metrics else {}
    sess.log(f"done: {final}")
    return FitResult(sess.run.path, sess.run.metrics, final)


def image_size(stage, cfg: Config):
    return stage.size or getattr(cfg.data, "size", None)


def _where(learn: Learner, k: int, stages) -> str:
    s = learn.state
    return (f"stage {k + 1}/{len(stages)} '{stages[k].name}', epoch {s.epoch + 1}/{s.n_epochs}, "
            f"after batch {s.batch + 1}/{s.n_batches}")


def use_found_lr(sess: Session, learner: Learner, stage) -> LrFindResult:
    """lr: auto: lr_find at the start of the stage (on the weights as the previous stages left
    them), its recommendation becomes the stage's peak lr; recorded in the run directory as
    lr_find-<stage>.csv/.json/.png, a line of log.txt and a peak_lr column in metrics.csv."""
    result = lr_find(learner, num_it=SMOKE_LR_FIND_IT if sess.smoke else 100, seed=sess.cfg.seed or 0)
    if sess.world.is_main:  # every rank found the same lr (the losses are averaged over ranks)
        save_result(result, sess.run.path, f"lr_find-{stage.name}")
    for g in learner.opt.param_groups:  # the groups hold the lr's shape, the last at 1.0
        g["peak_lr"] *= result.lr
        g["lr"] = g["peak_lr"]
    rec = next(c for c in learner.callbacks if isinstance(c, cbs.Recorder))
    rec.extra["peak_lr"] = result.lr
    sess.log(f"stage '{stage.name}': {result.summary()}; using lr {result.lr:.3g}")
    return result

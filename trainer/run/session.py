"""A run's session: what every stage shares, built once when the run starts (the run directory,
the data, the model, the stage plan, the task, the machine's settings)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from trainer.config import Config, dump_config
from trainer.config.base import better_mode
from trainer.data.bundle import ImageBundle, build_bundle
from trainer.data.text import TextBundle
from trainer.models import Built, create_model, input_stats
from trainer.run.checkpoints import BestSoFar
from trainer.run.distributed import backend_for
from trainer.run.early_stop import EarlyStopState
from trainer.run.plots import History
from trainer.run.rundir import RunDir, new_run_dir
from trainer.run.runtime import compile_model, compile_ready, pick_device, set_deterministic, set_threads
from trainer.run.status import Clock
from trainer.run.topk import TopK
from trainer.run.tracking import Trackers
from trainer.train.loop import Callback
from trainer.train.parallel import use_sync_bn
from trainer.train.plan import Plan, make_plan, outline
from trainer.train.precision import Precision, pick_precision, slow_here
from trainer.train.randomness import random_seed, seed_everything
from trainer.train.tasks import Task, check_loss, make_task
from trainer.train.world import SINGLE, World

SMOKE_MAX_SIZE = 32  # px: a smoke run checks the pipeline, not the accuracy


@dataclass
class Session:
    cfg: Config
    plan: Plan
    run: RunDir
    bundle: ImageBundle | TextBundle
    built: Built
    task: Task
    device: torch.device
    precision: Precision
    world: World
    smoke: bool = False
    log: Callable[[str], None] = print
    console: Console | None = None
    best: BestSoFar = field(default_factory=BestSoFar)  # these three: run-wide, in every checkpoint
    top: TopK | None = None  # checkpoint.keep > 0
    early: EarlyStopState | None = None  # train.early_stop
    history: History = field(default_factory=History)  # every step of every stage, for the plots
    trackers: Trackers | None = None  # TensorBoard / MLflow (rank 0), started with the stages
    clock: Clock | None = None  # status.json's times (rank 0), from when the stages start
    extra_callbacks: list[Callback] = field(default_factory=list)  # fit(callbacks=...): tests, tools


def open_session(
    cfg: Config,
    out: str | Path | None = None,
    world: World = SINGLE,
    device: torch.device | None = None,
    smoke: bool = False,
    console: Console | None = None,
) -> Session:
    """With several processes, rank 0 picks the seed and the run directory for all of them and
    is the only one to write or print. device: the config's when not given."""
    device = device if device is not None else pick_device(cfg.device)
    seed = cfg.seed if cfg.seed is not None else world.from_main(random_seed)
    cfg = cfg.model_copy(update={"seed": seed})  # a random seed is still recorded
    if smoke:
        cfg = smoke_config(cfg)
    seed_everything(seed)
    set_deterministic(cfg.deterministic)
    threads = set_threads()
    fresh = world.from_main(lambda: out is None or not Path(out).exists())  # a folder this call makes
    if smoke and out is None:
        out = world.from_main(lambda: tempfile.mkdtemp(prefix=f"trainer-smoke-{cfg.name}-"))
    run = RunDir(world.from_main(lambda: new_run_dir(cfg.name, out)), writes=world.is_main)
    with discarded_on_failure(run, fresh):
        run.write_text("config.yaml", dump_config(cfg))
        log = run.log

        stages = outline(cfg)
        with world.local_main_first():  # one decode per machine into the image cache
            bundle = build_bundle(
                cfg,
                seed,
                device,
                stages.image_sizes,
                max(stages.batch_sizes) if smoke else None,
                log=lambda m: (log(m), world.is_main and say(m)),
                model_stats=input_stats(cfg.model),
            )
        built = create_model(cfg.model, bundle.n_out, bundle.in_channels, stages.first_size or _decoded_size(bundle))
        for note in built.notes:
            log(note)
            if world.is_main:
                say(note)
        synced = use_sync_bn(cfg.train.sync_bn, built, device, world)
        if synced is not None:  # torch BatchNorm (CUDA) and the course's BnLayer (any backend)
            log(f"sync_bn: {synced} BatchNorm layer(s) now compute their statistics over every process's batch")
        if world.rank > 0:  # every rank built the same weights; each draws its own dropout masks from here
            torch.manual_seed((seed + world.rank) % 2**63)
        for name, data in bundle.files_to_save().items():
            run.write_json(name, data)
        _place(built.model, cfg, device, smoke, log)
        check_loss(cfg.train.loss, bundle.task_kind)
        task_kind = cfg.train.loss if cfg.train.loss != "auto" else bundle.task_kind
        task = make_task(
            {"cross_entropy": "single_label", "bce": "multi_label"}.get(task_kind, task_kind),
            cfg.train.label_smoothing,
            cfg.train.threshold,
        )
        n_params = sum(p.numel() for p in built.model.parameters())
        precision = pick_precision(cfg.amp, device)
        log(
            f"run {run.path}: seed {seed}, device {device} ({threads} CPU threads), amp {precision.name}, "
            f"{n_params:,} parameters"
            + (
                f", {world.world_size} processes ({backend_for(cfg.distributed.backend, device)})"
                if world.enabled
                else ""
            )
        )
        if (slow := slow_here(precision)) and world.is_main:
            log(slow)
            say(slow)
        plan = make_plan(cfg, len(built.groups))
        sess = Session(cfg, plan, run, bundle, built, task, device, precision, world, smoke, log, console)
        sess.best, sess.top, sess.early = watchers(cfg, task)
        return sess


@contextlib.contextmanager
def discarded_on_failure(run: RunDir, fresh: bool):
    """A run that fails before its first step (bad data, Ctrl-C while decoding) leaves no folder:
    nothing was done to keep, and `trainer runs` would list it forever as not started. Only a
    folder this call made, so never one of the user's, nor a resumed run's."""
    try:
        yield
    except BaseException:
        if fresh and run.writes:
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def watchers(cfg: Config, task: Task) -> tuple[BestSoFar, TopK | None, EarlyStopState | None]:
    """best.pt's metric, the top-k list and the early-stopping state, each on a metric the task
    reports (checked here: which metrics a dataset gives is known once its labels are read)."""
    ck, es = cfg.checkpoint, cfg.train.early_stop
    for key, name in [("checkpoint.monitor", ck.monitor)] + ([("train.early_stop.monitor", es.monitor)] if es else []):
        if name not in task.reports:
            raise ValueError(
                f"{key}: this run does not report '{name}' (a {task.name.replace('_', '-')} run reports "
                f"{', '.join(task.reports)})"
            )
    best = BestSoFar(monitor=ck.monitor, mode=better_mode(ck.monitor, ck.mode))
    top = TopK(ck.keep, ck.monitor, best.mode) if ck.keep else None
    early = EarlyStopState(es.monitor, better_mode(es.monitor, es.mode), es.patience, es.min_delta) if es else None
    return best, top, early


def say(message: str) -> None:
    """A line for the user: warnings to stderr, the rest to stdout."""
    print(message, file=sys.stderr if message.startswith("warning:") else sys.stdout, flush=True)


def _place(model: torch.nn.Module, cfg: Config, device: torch.device, smoke: bool, log) -> None:
    """The model on its device, in its memory format, compiled when asked and possible."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        why_not = "a smoke run checks the pipeline, not the speed" if smoke else compile_ready(device)
        if why_not:
            log(f"compile: skipped ({why_not})")
        else:
            compile_model(model)


def _decoded_size(bundle: ImageBundle | TextBundle) -> int:
    images = getattr(bundle, "images", None)
    return images.size if images is not None else 0


def smoke_config(cfg: Config, limit: int = SMOKE_MAX_SIZE) -> Config:
    """A smoke run checks the pipeline, not the accuracy: every stage for one epoch (an SGDR stage,
    one cycle of one epoch), at image sizes scaled by one factor so the largest is `limit` px."""
    one = {"epochs": 1, "n_cycles": None, "cycle_len": 1}
    stages = [
        st.model_copy(
            update={**one, "fine_tune": st.fine_tune and st.fine_tune.model_copy(update={"freeze_epochs": 1})}
        )
        for st in cfg.train.stages
    ]
    return smoke_sizes(cfg.model_copy(update={"train": cfg.train.model_copy(update={"stages": stages})}), limit)


def smoke_sizes(cfg: Config, limit: int = SMOKE_MAX_SIZE) -> Config:
    """Every image size scaled down by one factor so the largest is `limit` px: a ResNet-34 at
    224 -> 299px then smokes at 24 -> 32 px in seconds on a CPU, and the sizes keep their ratios
    (progressive resizing still changes the size between stages)."""
    if cfg.data.layout == "text":
        return cfg
    sizes = [s for s in [cfg.data.size, cfg.data.cache_size, *(st.size for st in cfg.train.stages)] if s]
    if not sizes or max(sizes) <= limit:
        return cfg
    f = limit / max(sizes)

    def scale(s: int | None) -> int | None:
        return max(8, round(s * f)) if s else s

    data = cfg.data.model_copy(update={"size": scale(cfg.data.size), "cache_size": scale(cfg.data.cache_size)})
    stages = [st.model_copy(update={"size": scale(st.size)}) for st in cfg.train.stages]
    return cfg.model_copy(update={"data": data, "train": cfg.train.model_copy(update={"stages": stages})})

"""The spine of `trainer fit`: config -> session (run directory, data, model, plan) -> every
stage -> metrics. Read it top to bottom; each line is a named step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from trainer.config import Config, dump_config
from trainer.config.base import better_mode
from trainer.run import distributed, state
from trainer.run.early_stop import StoppedEarly
from trainer.run.find_lr import find_lr
from trainer.run.learner import add_run_callbacks, step_learner
from trainer.run.plots import write_plots
from trainer.run.resume import ResumeError, check_fresh_out, reconcile, resolve, saved_config
from trainer.run.runtime import pick_device
from trainer.run.session import Session, open_session, say
from trainer.run.signals import Interrupted, StopRequest, graceful_stop
from trainer.run.status import run_status
from trainer.run.tracking import Trackers, mlflow_uri, open_trackers
from trainer.train.loop import Callback
from trainer.train.plan import StagePlan, outline

LAUNCHER_GRACE = 2.0  # s: a launcher forwards the Ctrl-C its processes already got (trainer/run/signals.py)


@dataclass
class FitResult:
    run_dir: Path
    metrics: list[dict]
    final: dict


def fit(
    cfg: Config,
    out: str | Path | None = None,
    smoke: bool = False,
    console: Console | None = None,
    resume: str | Path | None = None,
    callbacks: tuple[Callback, ...] = (),
    allow_changes: bool = False,
) -> FitResult:
    """Runs every stage. resume: a run directory, or "auto" for the newest unfinished run of this
    config's name, to continue exactly where its last checkpoint left off. Under torchrun, rank 0
    finds the run and reads its checkpoint, and hands both to every rank."""
    world, device = distributed.start(cfg.distributed.backend, pick_device(cfg.device))
    ended_alike = False  # every rank finished, or every rank stopped on a signal at the same step
    try:
        cfg, out, point, changes = world.from_main(lambda: locate(cfg, out, smoke, resume, allow_changes))
        sess = open_session(cfg, out, world, device, smoke, console)
        sess.extra_callbacks += list(callbacks)
        if changes:
            note_changes(sess, changes)
        result = train_stages(sess, point)
        ended_alike = True
        return result
    except Interrupted:
        ended_alike = True
        raise
    finally:
        distributed.stop(wait=ended_alike)


def train_stages(sess: Session, point: state.ResumePoint | None = None) -> FitResult:
    """Every stage in order (from the checkpoint's, when resuming), into one metrics.csv."""
    if point is not None:
        state.start_from(point, sess.run, sess.history, sess.best, sess.plan.names, sess.log, sess.top, sess.early)
    grace = LAUNCHER_GRACE if sess.world.enabled else 0.0
    with run_status(sess.run, str(sess.device), point is not None) as clock, graceful_stop(grace=grace) as stop:
        sess.clock, sess.trackers = clock if sess.run.writes else None, start_tracking(sess, point)
        try:
            if sess.early is not None and sess.early.exhausted:  # killed just after the verdict
                raise StoppedEarly(sess.early.reason())
            for stage in sess.plan.stages[point.stage if point is not None else 0 :]:
                train_stage(sess, stage, stop, point if point is not None and stage.index == point.stage else None)
        except StoppedEarly as e:
            sess.log(str(e))
            say(str(e))
            clock.stopped_early(str(e))
        except BaseException as e:
            if isinstance(e, Interrupted):
                sess.log(str(e))  # when and where; the resume will say how it went on
            draw(sess, quietly=True)  # the plots of what was done, whatever stopped the run
            finish_tracking(sess, "interrupted" if isinstance(e, Interrupted | KeyboardInterrupt) else "failed")
            raise
        draw(sess)
        finish_tracking(sess, clock.ending)
    final = sess.run.metrics[-1] if sess.run.metrics else {}
    sess.log(f"done: {final}")
    return FitResult(sess.run.path, sess.run.metrics, final)


def start_tracking(sess: Session, point: state.ResumePoint | None) -> Trackers:
    """The config's trackers, on rank 0 (the MLflow run of a resumed run continued)."""
    if not sess.world.is_main or not (sess.cfg.track.tensorboard or sess.cfg.track.mlflow):
        return Trackers({}, say)
    saved = point.state.get("track", {}) if point is not None else None
    warn = lambda m: (sess.log(m), say(m))  # noqa: E731
    trackers = open_trackers(sess.cfg, sess.run.path, saved, len(sess.history.steps), sess.device, warn)
    if "mlflow" in trackers.items:
        ml = sess.cfg.track.mlflow
        sess.log(
            f"mlflow: run {trackers.items['mlflow'].run_id} in experiment '{ml.experiment or sess.cfg.name}' at {mlflow_uri(ml)}"
        )
    return trackers


def finish_tracking(sess: Session, status: str) -> None:
    """The last points, the plots, config and tables as artifacts, the tracker runs closed."""
    if sess.trackers:
        files = [sess.run.path / n for n in ("config.yaml", "metrics.csv", "log.txt")]
        files += sorted(sess.run.path.glob("*.png"))
        sess.trackers.call("finish", status, [f for f in files if f.is_file()])


def draw(sess: Session, quietly: bool = False) -> None:
    """The run's plots (rank 0). `quietly`: another error is on its way, which a failed drawing
    (a full disk) must not hide."""
    if not sess.world.is_main:
        return
    try:
        write_plots(sess.run, sess.history)
    except Exception:
        if not quietly:
            raise


def train_stage(sess: Session, stage: StagePlan, stop: StopRequest, point: state.ResumePoint | None) -> None:
    """One stage: its learner, its lr when lr_find picks it, then its epochs (from the checkpoint's
    position when resuming)."""
    sess.log(stage.describe(len(sess.plan.stages)))
    if stage.new_size:
        sess.best.reset()  # losses at another image size do not compare: best.pt is of the last size
    if point is not None:
        state.restore_weights(sess.built.model, point)
    learner, handles = step_learner(sess, stage)
    if stage.find_lr:
        found = point.found_lr if point is not None else None
        stage = stage.with_found_lr(found if found is not None else find_lr(sess, learner, stage))
    add_run_callbacks(sess, learner, handles, stage, stop)
    start = (0, 0)
    if point is not None:
        start = state.restore(learner, point, handles.with_state(), handles.per_rank(), sess.best, sess.world)
    learner.fit(stage.epochs, *start)


def note_changes(sess: Session, changes: list[str]) -> None:
    """--allow-changes: the run is no longer what one config computes from the start, and says so
    in log.txt and at the head of its config.yaml (the config it goes on with)."""
    said = "; ".join(changes)
    sess.log(f"resumed with --allow-changes ({said}): this run is not bitwise reproducible from its config.yaml")
    head = f"# resumed with --allow-changes ({said}):\n# stages before these ran with the earlier values\n"
    sess.run.write_text("config.yaml", head + dump_config(sess.cfg))


def locate(cfg: Config, out: str | Path | None, smoke: bool, resume_from: str | Path | None, allow_changes: bool):
    """(config, run directory, resume point, changes) before any work: a resumed run's own seed and
    checkpoint, and with allow_changes the changes made to stages that have not started; or a
    check that --out is not a run already."""
    if resume_from is None:
        if allow_changes:
            raise ResumeError("--allow-changes goes with --resume (it lets a resumed run change its later stages)")
        if out is not None:
            check_fresh_out(Path(out))
        return cfg, out, None, []
    if smoke:
        raise ResumeError("--resume and --smoke do not go together (a smoke run is throwaway)")
    out = resolve(resume_from, cfg.name)
    saved = saved_config(out)
    point = state.load_point(out, outline(saved).epochs, better_mode(saved.checkpoint.monitor, saved.checkpoint.mode))
    changeable = point.stage + (0 if point.fresh_stage else 1) if allow_changes else None
    cfg, changes = reconcile(cfg, out, changeable)
    return cfg, out, point, changes

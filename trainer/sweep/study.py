"""`trainer sweep`: an Optuna study whose trials are ordinary runs (DIR/trials/<number>/).

Optuna does the searching, pruning and bookkeeping: its samplers, its pruners, its database
storage (SQLite in DIR/sweep.db by default; any URL it takes, e.g. PostgreSQL, for several machines),
studies loaded by name so a second process or a second invocation joins the same study, and
heartbeats so a trial whose process was killed is marked failed. This module only turns a trial
into a config and a run, and the run's epochs into the trial's reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna

from trainer.config import ConfigError
from trainer.run.fit import fit
from trainer.run.resume import ResumeError, resolve
from trainer.run.rundir import read_table
from trainer.run.signals import Interrupted
from trainer.storage import atomic_write_text, sqlite_file
from trainer.sweep import epochs
from trainer.sweep.database import DATABASE, INTERRUPTED, StorageError, connect, counted, lost, retry_lost, safe_url
from trainer.sweep.epochs import ReportEpochs
from trainer.sweep.samplers import choice_key, make_pruner, make_sampler
from trainer.sweep.space import Choice, IntRange, LogRange, Space, outside, trial_config
from trainer.train.plan import outline

HEARTBEAT, GRACE = 30, 120  # s: a trial silent this long belongs to a dead process and is marked failed
MARKER = "sweep.json"  # what makes a folder a sweep's (it is never one of the user's)
# a sweep folder's own files before its marker exists (another worker may be opening the study);
# .sweep.lock: where earlier versions kept the database's lock
OWN_FILES = (MARKER, ".sweep.lock", *(DATABASE + end for end in ("", "-journal", "-wal", "-shm")))
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


class TrialFailed(Exception):
    """A trial that could not run or ended badly (recorded as failed; the sweep goes on)."""


@dataclass
class Sweep:
    config: Path
    sets: list[str]
    space: Space
    out: Path
    n_trials: int
    storage: str | None = None
    study_name: str = "sweep"
    timeout: float | None = None
    say: object = print
    console: object = None

    @property
    def url(self) -> str:
        return self.storage or f"sqlite:///{self.out.resolve() / DATABASE}"


def open_study(sweep: Sweep) -> optuna.Study:
    engine = {"connect_args": {"timeout": 60}} if sweep.url.startswith("sqlite") else None  # wait out a writer

    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: marked experimental
            storage = optuna.storages.RDBStorage(
                sweep.url,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT,
                grace_period=GRACE,
                heartbeat_stale_trial_callback=retry_lost,
            )
        return optuna.create_study(
            storage=storage,
            study_name=sweep.study_name,
            direction=sweep.space.objective.direction,
            sampler=make_sampler(sweep.space),
            pruner=make_pruner(sweep.space),
            load_if_exists=True,
        )

    sweep.out.mkdir(parents=True, exist_ok=True)  # the default database's folder, and the results'
    with one_at_a_time(sweep):
        return connect(sweep.url, make)


@contextlib.contextmanager
def one_at_a_time(sweep: Sweep):
    """A file lock on the SQLite database, for what SQLite does not make atomic across processes:
    creating the study's tables (two workers would both run the migrations), queueing the space's
    points, and taking a queued trial (no SELECT FOR UPDATE: two workers both took trial 0). A
    server database (PostgreSQL) locks its own rows."""
    path = lock_file(sweep)
    if path is None:
        yield
        return
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    except OSError as e:
        raise StorageError(f"--storage {safe_url(sweep.url)}: cannot take its lock {path} ({e.strerror})") from None
    try:
        with contextlib.suppress(OSError):  # another user's workers on a shared database open it too
            os.fchmod(fd, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lock_file(sweep: Sweep) -> Path | None:
    """The lock of a SQLite database: a file in the temporary folder named for the database's real
    path, so every worker of this machine on that file takes turns, whatever its --out, and nothing
    is written beside a user's database. None for a server database or SQLite in memory."""
    db = sqlite_file(sweep.url)
    if db is None:
        return None
    digest = hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"trainer-sweep-{digest}.lock"


def suggest(trial: optuna.Trial, key: str, p) -> object:
    if isinstance(p, LogRange):
        return trial.suggest_float(key, *p.log, log=True)
    if isinstance(p, IntRange):
        return trial.suggest_int(key, *p.int, step=p.step)
    if isinstance(p, Choice):
        return choice_value(p, trial.suggest_categorical(key, [choice_key(v) for v in p.choice]))
    return trial.suggest_float(key, *p.range, step=p.step)


def sampled(sweep: Sweep, trial: optuna.Trial) -> tuple[dict, list[str]]:
    """The trial's values, or, for a point queued before the space file was edited, the point and
    why the space no longer holds it (Optuna would run it with a raw warning, or fail on a choice)."""
    params, point = sweep.space.params, queued(trial)
    stale = [f"{k}: no longer a param of the space" for k in point if k not in params]
    for k, v in point.items():
        value = choice_value(params[k], v) if isinstance(params.get(k), Choice) else v
        if k in params and (why := outside(params[k], value)):
            stale.append(f"{k}: {why}")
    if stale:
        return point, stale
    return {key: suggest(trial, key, p) for key, p in params.items()}, []


def queued(trial: optuna.Trial) -> dict:
    """The values Optuna's enqueue_trial fixed for this trial, as stored ({} for a sampled trial)."""
    running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return next((t.system_attrs.get("fixed_params", {}) for t in running if t.number == trial.number), {})


def choice_value(p: Choice, stored):
    """A choice as the space writes it, from Optuna's stored form (a list is stored as its JSON
    text); a stored value that is no choice (queued before an edit) comes back as it is."""
    return {choice_key(c): c for c in p.choice}.get(stored, stored)


def fixed(space: Space, point: dict) -> dict:
    """A queued point as Optuna stores a trial's params (a float as a float: `skip_if_exists`
    compares types, so an lr written as 1 would be queued again on every run)."""
    as_stored = {LogRange: float, IntRange: int, Choice: choice_key}
    return {k: as_stored.get(type(space.params[k]), float)(v) for k, v in point.items()}


def objective(sweep: Sweep, trial: optuna.Trial) -> float:
    values, stale = sampled(sweep, trial)
    monitor = sweep.space.objective.monitor
    resume = resumable(trial.user_attrs.get("resume"))
    run_dir = resume or sweep.out / "trials" / str(trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    started = epochs.now()  # the trial's time budget counts from here
    retry = trial.user_attrs.get("retry_of")
    again = "" if retry is None else f" (trial {retry} again" + (", from its checkpoint)" if resume else ")")
    again = again or (" (queued in the space file)" if trial.user_attrs.get("queued") else "")
    sweep.say(f"trial {trial.number}{again}: " + ", ".join(f"{k}={_short(v)}" for k, v in values.items()))
    if stale:
        raise _failed(trial, "queued before the space changed: " + "; ".join(stale))
    try:
        cfg = trial_config(sweep.config, sweep.sets, values)
    except ConfigError as e:
        raise _failed(trial, f"the sampled config is invalid: {e}") from None
    rows = epoch_rows(resume) if resume else []
    earlier = tuple(float(r[monitor]) for r in rows if r.get(monitor) not in (None, ""))
    spent = sum(float(r["seconds"]) for r in rows if r.get("seconds"))  # the lost process's epochs count too
    budget = sweep.space.objective.max_seconds
    report = ReportEpochs(trial, monitor, sum(outline(cfg).epochs), earlier, budget, started - spent)
    try:
        result = fit(cfg, None if resume else run_dir, console=sweep.console, resume=resume, callbacks=[report])
    except Interrupted as e:  # Ctrl-C: the run saved its checkpoint; the trial ends failed, the sweep stops
        trial.set_user_attr("error", f"{INTERRUPTED}{e}")
        raise KeyboardInterrupt from None
    except (RuntimeError, ValueError, OSError) as e:  # a diverged run, bad data, a full disk
        raise _failed(trial, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if report.pruned or report.over:
        note = report.pruned or f"pruned: {report.over}"
        trial.set_user_attr("note", note)
        raise optuna.TrialPruned(note)
    values_seen = [*earlier, *(float(r[monitor]) for r in result.metrics if monitor in r)]
    finite = [v for v in values_seen if math.isfinite(v)]
    if not finite:
        raise _failed(trial, f"no finite {monitor} in any epoch")
    return min(finite) if sweep.space.objective.direction == "minimize" else max(finite)


def resumable(run_dir: str | None) -> Path | None:
    """A lost trial's run directory, when --resume would take it (a checkpoint, not ended, not in use)."""
    if not run_dir:
        return None
    try:
        return resolve(run_dir, name="")
    except ResumeError:
        return None


def epoch_rows(run_dir: Path) -> list[dict]:
    """The rows of the epochs the run finished (metrics.csv)."""
    path = run_dir / "metrics.csv"
    return read_table(path) if path.is_file() else []


def _failed(trial: optuna.Trial, message: str) -> TrialFailed:
    trial.set_user_attr("error", message[:1000])
    return TrialFailed(message)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_sweep(sweep: Sweep) -> optuna.Study:
    """Trials until the study holds n_trials (those of every process and every earlier invocation
    count), or the timeout. A failed trial is recorded and the sweep goes on."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead of Optuna's
    fresh = not sweep.out.exists()
    try:
        study = open_study(sweep)
    except StorageError:
        if fresh:  # the folder is ours and holds only the lock: a corrected command starts clean
            shutil.rmtree(sweep.out, ignore_errors=True)
        raise
    atomic_write_text(
        sweep.out / MARKER, json.dumps({"study": sweep.study_name, "storage": safe_url(sweep.url)}, indent=1)
    )
    study.set_user_attr("monitor", sweep.space.objective.monitor)
    with one_at_a_time(sweep):  # one worker at a time, so each sees the points another queued
        for point in sweep.space.enqueue:  # a point any trial has had already (queued, run) is skipped
            study.enqueue_trial(fixed(sweep.space, point), user_attrs={"queued": True}, skip_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial is lost (and queued) before we count
    asking_alone(study, sweep)
    left = sweep.n_trials - counted(study)
    if left <= 0:
        sweep.say(f"study '{sweep.study_name}' already holds {counted(study)} trial(s); nothing to run")
        return study
    try:
        study.optimize(
            lambda t: objective(sweep, t),
            n_trials=left,
            timeout=sweep.timeout,
            catch=(TrialFailed,),
            callbacks=[lambda s, t: _said(sweep, s, t), lambda s, t: counted(s) >= sweep.n_trials and s.stop()],
            gc_after_trial=True,
        )
    except KeyboardInterrupt:  # the interrupted trial (failed by Optuna) runs again first next time
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            if lost(t):
                retry_lost(study, t)
        raise
    return study


def asking_alone(study: optuna.Study, sweep: Sweep) -> None:
    """study.optimize takes each trial with study.ask: under the lock, so a queued trial goes to one worker."""
    ask = study.ask

    def ask_alone(*args, **kwargs):
        with one_at_a_time(sweep):
            return ask(*args, **kwargs)

    study.ask = ask_alone


def _said(sweep: Sweep, study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    state = t.state.name.lower()
    what = {"complete": f"{sweep.space.objective.monitor} {t.value:.4g}" if t.value is not None else ""}.get(state, "")
    detail = t.user_attrs.get("note") or t.user_attrs.get("error") or what
    said = f"trial {t.number}: " + (detail if detail.startswith(state) else state + (f" ({detail})" if detail else ""))
    best = ""
    try:
        best = f"; best so far: trial {study.best_trial.number}, {study.best_value:.4g}"
    except ValueError:  # no trial has completed yet
        pass
    sweep.say(said + best)

"""`trainer sweep`: an Optuna study whose trials are ordinary runs (DIR/trials/<number>/).

Optuna does the searching, pruning and bookkeeping: its samplers, its pruners, its database
storage (SQLite in DIR/sweep.db by default; any URL it takes, e.g. PostgreSQL, for several machines),
studies loaded by name so a second process or a second invocation joins the same study, and
heartbeats so a trial whose process was killed is marked failed. This module only turns a trial
into a config and a run, and the run's epochs into the trial's reports.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from trainer.config import ConfigError
from trainer.run.checkpoints import monitored
from trainer.run.early_stop import StoppedEarly
from trainer.run.fit import fit
from trainer.run.signals import Interrupted
from trainer.storage import atomic_write_text
from trainer.sweep.space import Choice, IntRange, LogRange, Space, trial_config
from trainer.train.loop import Callback, Learner
from trainer.train.plan import outline

HEARTBEAT, GRACE = 30, 120  # s: a trial silent this long belongs to a dead process and is marked failed
MARKER = "sweep.json"  # what makes a folder a sweep's (it is never one of the user's)
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
    started: dict = field(default_factory=dict)  # trial number -> start time

    @property
    def url(self) -> str:
        return self.storage or f"sqlite:///{self.out.resolve() / 'sweep.db'}"


def open_study(sweep: Sweep) -> optuna.Study:
    engine = {"connect_args": {"timeout": 60}} if sweep.url.startswith("sqlite") else None  # wait out a writer
    with creating(sweep), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: marked experimental
        storage = optuna.storages.RDBStorage(
            sweep.url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT, grace_period=GRACE
        )
    return optuna.create_study(
        storage=storage,
        study_name=sweep.study_name,
        direction=sweep.space.objective.direction,
        sampler=make_sampler(sweep.space),
        pruner=make_pruner(sweep.space, sweep),
        load_if_exists=True,
    )


@contextlib.contextmanager
def creating(sweep: Sweep):
    """One process at a time creates a SQLite study's tables: two workers started together on a
    new file would both run the migrations and one would fail."""
    if not sweep.url.startswith("sqlite"):
        yield
        return
    import fcntl

    sweep.out.mkdir(parents=True, exist_ok=True)
    with open(sweep.out / ".sweep.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def make_sampler(space: Space) -> optuna.samplers.BaseSampler:
    s = space.sampler
    if s.name == "grid":
        return optuna.samplers.GridSampler(
            {k: [_choice_key(v) for v in p.choice] for k, p in space.params.items()}, s.seed
        )
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, constant_liar=True)  # workers in parallel try different points


def make_pruner(space: Space, sweep: Sweep) -> optuna.pruners.BasePruner:
    p = space.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.warmup_epochs))
    return optuna.pruners.NopPruner()


def _choice_key(value):
    """Optuna's categorical choices are plain values: a list (model.layers) goes as its YAML text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def suggest(trial: optuna.Trial, key: str, p) -> object:
    if isinstance(p, LogRange):
        return trial.suggest_float(key, *p.log, log=True)
    if isinstance(p, IntRange):
        return trial.suggest_int(key, *p.int, step=p.step)
    if isinstance(p, Choice):
        keys = [_choice_key(v) for v in p.choice]
        return p.choice[keys.index(trial.suggest_categorical(key, keys))]
    return trial.suggest_float(key, *p.range, step=p.step)


class ReportEpochs(Callback):
    """The monitored metric to the trial after every epoch; the pruner's verdict ends the run as an
    early stop (its files complete, status "stopped"), and the trial is then recorded as pruned.
    The last epoch is never pruned: its cost is spent, and its value is a finished trial's."""

    order = 40  # after the epoch's checkpoint, row and early-stopping verdict

    def __init__(self, trial: optuna.Trial, monitor: str, last_epoch: int):
        self.trial, self.monitor, self.last_epoch, self.epochs, self.pruned = trial, monitor, last_epoch, 0, None

    def after_epoch(self, learn: Learner) -> None:
        self.epochs += 1
        value = monitored(learn, self.monitor)
        if math.isfinite(value):
            self.trial.report(value, self.epochs)
        if self.epochs < self.last_epoch and self.trial.should_prune():
            self.pruned = f"pruned after epoch {self.epochs} ({self.monitor} {value:.4g})"
            raise StoppedEarly(self.pruned)


def objective(sweep: Sweep, trial: optuna.Trial) -> float:
    values = {key: suggest(trial, key, p) for key, p in sweep.space.params.items()}
    run_dir = sweep.out / "trials" / str(trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    sweep.started[trial.number] = time.monotonic()
    sweep.say(f"trial {trial.number}: " + ", ".join(f"{k}={_short(v)}" for k, v in values.items()))
    try:
        cfg = trial_config(sweep.config, sweep.sets, values)
    except ConfigError as e:
        raise _failed(trial, f"the sampled config is invalid: {e}") from None
    report = ReportEpochs(trial, sweep.space.objective.monitor, sum(outline(cfg).epochs))
    try:
        result = fit(cfg, run_dir, console=sweep.console, callbacks=[report])
    except Interrupted as e:  # Ctrl-C: the run saved its checkpoint; the trial ends failed, the sweep stops
        trial.set_user_attr("error", f"interrupted: {e}")
        raise KeyboardInterrupt from None
    except (RuntimeError, ValueError, OSError) as e:  # a diverged run, bad data, a full disk
        raise _failed(trial, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if report.pruned:
        trial.set_user_attr("note", report.pruned)
        raise optuna.TrialPruned(report.pruned)
    values_seen = [
        float(r[sweep.space.objective.monitor]) for r in result.metrics if sweep.space.objective.monitor in r
    ]
    finite = [v for v in values_seen if math.isfinite(v)]
    if not finite:
        raise _failed(trial, f"no finite {sweep.space.objective.monitor} in any epoch")
    return min(finite) if sweep.space.objective.direction == "minimize" else max(finite)


def _failed(trial: optuna.Trial, message: str) -> TrialFailed:
    trial.set_user_attr("error", message[:1000])
    return TrialFailed(message)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_sweep(sweep: Sweep) -> optuna.Study:
    """Trials until the study holds n_trials (those of every process and every earlier invocation
    count), or the timeout. A failed trial is recorded and the sweep goes on."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead of Optuna's
    sweep.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        sweep.out / MARKER, json.dumps({"study": sweep.study_name, "storage": _safe(sweep.url)}, indent=1)
    )
    study = open_study(sweep)
    study.set_user_attr("monitor", sweep.space.objective.monitor)
    left = sweep.n_trials - len(study.get_trials(deepcopy=False))
    if left <= 0:
        sweep.say(f"study '{sweep.study_name}' already holds {len(study.trials)} trial(s); nothing to run")
        return study
    study.optimize(
        lambda t: objective(sweep, t),
        n_trials=left,
        timeout=sweep.timeout,
        catch=(TrialFailed,),
        callbacks=[optuna.study.MaxTrialsCallback(sweep.n_trials, states=None), lambda s, t: _said(sweep, s, t)],
        gc_after_trial=True,
    )
    return study


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


def _safe(url: str) -> str:
    """A storage URL without its password (sweep.json is plain text)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url

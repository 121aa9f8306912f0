"""Experiment tracking (the config's `track:`): TensorBoard and MLflow, fed from the run's own
records on rank 0. metrics.csv stays the source of truth: a tracker that fails (a server down, a
full disk) prints one warning and is dropped, and the run goes on.

Two x axes: the train loss and lr every `track.every` optimizer steps (step = steps done), and
each epoch's metrics.csv row, at the epoch number in MLflow (its `step`) and at the epoch's last
step in TensorBoard (as Lightning logs epoch metrics), where a resume's purge_step then removes
exactly what is computed again. MLflow skips the steps it already holds, so nothing is doubled.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from trainer.config import Config, flat_keys
from trainer.storage import foreign_sqlite
from trainer.train.loop import Callback, Learner

PIP = "pip install -e '.[track]'"


def missing_packages(cfg: Config) -> list[tuple[str, str]]:
    """A config check: a tracker asked for whose package is not installed (before any work)."""
    wanted = []
    if cfg.track.tensorboard:
        wanted.append(("track.tensorboard", "tensorboard", "tensorboard"))
    if cfg.track.mlflow is not None:
        wanted.append(("track.mlflow", "mlflow", "mlflow-skinny"))
        if mlflow_uri(cfg.track.mlflow).split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
            wanted.append(("track.mlflow.uri", "sqlalchemy", "sqlalchemy alembic"))
    return [
        (key, f"needs the {pip.split()[0]} package, which is not installed: {PIP} (or pip install {pip})")
        for key, module, pip in wanted
        if not installed(module)
    ]


def foreign_store(cfg: Config) -> list[tuple[str, str]]:
    """A config check: MLflow's SQLite store is a file of another program's (say, a ./mlflow.db that
    is not MLflow's): refused before any work, where MLflow would add its tables to it."""
    if cfg.track.mlflow is None:
        return []
    uri = mlflow_uri(cfg.track.mlflow)
    why = foreign_sqlite(uri, "experiments", "MLflow")
    if not why:
        return []
    if cfg.track.mlflow.uri:
        return [("track.mlflow.uri", f"{uri}: {why}; name another file")]
    source = " (from $MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") else ""
    return [("track.mlflow", f"{uri}{source}: {why}; name another file with track.mlflow.uri")]


def mlflow_uri(ml) -> str:
    """The tracking URI the run will use: the config's, else MLflow's default (its environment
    variable, else a SQLite file in the working folder; MLflow 3 refuses its old ./mlruns store)."""
    return ml.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Trackers:
    """The run's trackers, by name. A call that fails says so once on stderr (and in log.txt) and
    drops that tracker: the run goes on, its directory complete."""

    def __init__(self, items: dict, warn):
        self.items, self.warn = dict(items), warn

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, name: str, build) -> None:
        """A tracker built by `build()`; failing to import or connect is a tracker failure too."""
        try:
            self.items[name] = build()
        except Exception as e:  # noqa: BLE001 - a tracker must not stop the run
            self._drop(name, None, e)

    def call(self, method: str, *args) -> None:
        for name, tracker in list(self.items.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must not stop the run
                self._drop(name, tracker, e)

    def _drop(self, name: str, tracker, e: Exception) -> None:
        self.items.pop(name, None)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first if len(first) <= 300 else first[:300].rsplit(" ", 1)[0] + " ..."  # whole words
        self.warn(f"warning: {name}: {first}; stopped tracking to it, the run goes on (metrics.csv has it all)")
        if tracker is not None:
            tracker.abandon()

    def state_dict(self) -> dict:
        return {name: t.state_dict() for name, t in self.items.items()}


def open_trackers(cfg: Config, run_dir: Path, saved: dict | None, steps_done: int, device, warn) -> Trackers:
    """The trackers the config asks for, started. saved: their state in a resumed run's checkpoint
    (the MLflow run to continue); steps_done: the optimizer steps before the resume point."""
    from trainer.run import trackers as kinds

    made = Trackers({}, warn)
    if cfg.track.tensorboard:
        purge = steps_done + 1 if saved is not None else None  # what the resume computes again
        made.add("tensorboard", lambda: kinds.TensorBoard(run_dir / "tensorboard", purge))
    if cfg.track.mlflow is not None:
        ml, run_id = cfg.track.mlflow, (saved or {}).get("mlflow", {}).get("run_id")
        made.add("mlflow", lambda: kinds.Mlflow(mlflow_uri(ml), ml.experiment or cfg.name, run_name(run_dir), run_id))
    made.call("start", flat_params(cfg), run_tags(device))
    return made


def run_name(run_dir: Path) -> str:
    """runs/<name>/<time> -> <name>/<time>; any other folder by its own name."""
    run_dir = Path(run_dir).resolve()
    return f"{run_dir.parent.name}/{run_dir.name}"


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted keys (train.stages.0.lr), values as text."""
    return {k: "None" if v is None else str(v) for k, v in flat_keys(cfg.model_dump(mode="json")).items()}


def run_tags(device) -> dict[str, str]:
    from trainer import __version__

    tags = {
        "trainer.version": __version__,
        "torch.version": torch.__version__,
        "cuda.version": torch.version.cuda or "none",
        "device": str(device),
        "python.version": sys.version.split()[0],
        "command": " ".join(sys.argv),
    }
    commit = git_commit(Path.cwd())
    if commit:
        tags["git.commit"] = commit
    return tags


def git_commit(folder: Path) -> str | None:
    """The commit of the working directory's repository, '+dirty' with uncommitted changes; None
    outside a repository or without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


class TrackEpochs(Callback):
    """Feeds the trackers: the train loss and lr every `every` steps, each epoch's row."""

    def __init__(self, trackers: Trackers, steps: list[dict], rows: list[dict], every: int):
        self.trackers, self.steps, self.rows, self.every = trackers, steps, rows, every

    def after_batch(self, learn: Learner) -> None:
        row = self.steps[-1]
        step = row["step"] + 1
        if step % self.every == 0:  # one float of the loss (a device sync) every `every` steps
            self.trackers.call("log_steps", {"train/loss": float(row["loss"]), "train/lr": float(row["lr"])}, step)

    def after_epoch(self, learn: Learner) -> None:
        if not self.rows:
            return
        values = {f"epoch/{k}": float(v) for k, v in self.rows[-1].items() if _number(v) and k != "epoch"}
        step = self.steps[-1]["step"] + 1 if self.steps else 0
        self.trackers.call("log_epoch", values, len(self.rows), step)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def quiet_mlflow() -> None:
    """MLflow's own INFO lines (creating tables, run links) off the user's terminal; and a server
    that does not answer costs seconds, not minutes of retries (the user's settings win)."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

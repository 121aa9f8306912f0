"""A sweep's study in its database: opened with the database's own errors said in one line, and
the bookkeeping of trials whose process was lost (Ctrl-C, kill -9): they do not count towards
--trials and run again first, from their run's last checkpoint."""

from __future__ import annotations

from pathlib import Path

import optuna

from trainer.storage import foreign_sqlite, sqlite_file, sqlite_tables

DATABASE = "sweep.db"  # the default storage, a SQLite file in the sweep folder
INTERRUPTED = "interrupted: "  # how a Ctrl-C'd trial's error starts (study.objective writes it)


class StorageError(ValueError):
    """A storage URL that names no database this process can open (one line, exit 2)."""


def connect(url: str, make):
    """make() with the storage's own errors (a garbled URL, no server, a missing driver, a file
    that is not a database) said in one line that names the URL. A SQLite file of another
    program's is refused before Optuna adds its tables to it."""
    import sqlalchemy.exc

    foreign = foreign_sqlite(url, "studies", "Optuna")
    if foreign:
        raise StorageError(f"--storage {safe_url(url)}: cannot open it: {foreign}")

    try:
        return make()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ModuleNotFoundError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"--storage {safe_url(url)}: cannot open it: {reason[:300]}") from None


def shares_mlflow_store(url: str, cfg) -> str | None:
    """Why a sweep's storage cannot be the file its runs track to: Optuna's and MLflow's tables
    (both keep an alembic_version of their own) do not share one database."""
    from trainer.run.tracking import mlflow_uri

    mine, theirs = sqlite_file(url), cfg.track.mlflow and sqlite_file(mlflow_uri(cfg.track.mlflow))
    if mine is not None and theirs and mine.resolve() == theirs.resolve():
        return f"--storage {safe_url(url)}: the runs' MLflow store (track.mlflow) is this file; give each its own"
    return None


def load_study(url: str, name: str | None) -> optuna.Study:
    """An existing study, for a report; a name the storage lacks is said with the names it has.
    No name: the storage's only study. A report never makes or changes a database."""
    path = sqlite_file(url)
    if path is not None and not _an_optuna_file(path):
        raise StorageError(f"--storage {url}: no sweep database there (a report never makes or changes one)")

    def make():
        names = optuna.get_all_study_names(storage=url)
        if name is None and len(names) != 1:
            held = f"{len(names)} studies; name one with --study ({', '.join(names)})" if names else "no study"
            raise StorageError(f"{safe_url(url)} holds {held}")
        if name is not None and name not in names:
            raise StorageError(f"no study '{name}' in {safe_url(url)} (it holds: {', '.join(names) or 'none'})")
        return optuna.load_study(study_name=name or names[0], storage=url)

    return connect(url, make)


def folder_storage(url: str | None, folder: Path) -> str | None:
    """A sweep folder's storage as seen now: sweep.json keeps the absolute path of the default
    database, so a folder moved (or copied) since the sweep reads its own sweep.db."""
    path = sqlite_file(url)
    if path is not None and path.name == DATABASE and not path.exists() and (folder / DATABASE).is_file():
        return f"sqlite:///{(folder / DATABASE).resolve()}"
    return url


def _an_optuna_file(path: Path) -> bool:
    """Whether a SQLite file holds Optuna's tables (a report never makes them in another file)."""
    tables = sqlite_tables(path) if path.is_file() else set()
    return tables is None or "studies" in tables  # unreadable now (a sweep writing): Optuna says why


def lost(t: optuna.trial.FrozenTrial) -> bool:
    """A trial whose process stopped under it (Ctrl-C, kill -9): it failed through no fault of its
    params, so it does not count towards --trials and is run again (see retry_lost)."""
    error = t.user_attrs.get("error")
    return t.state == optuna.trial.TrialState.FAIL and (error is None or error.startswith(INTERRUPTED))


def retry_lost(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    """The lost trial's params go first in the queue (Optuna's enqueue_trial), with its run
    directory, which the retry resumes from its last checkpoint."""
    if any(o.user_attrs.get("retry_of") == t.number for o in study.get_trials(deepcopy=False)):
        return  # already queued (by another process, or an earlier Ctrl-C)
    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "resume": t.user_attrs.get("run_dir", "")})


def counted(study: optuna.Study) -> int:
    """The trials that count towards --trials: every one but the lost, and those queued (the
    process that takes one counts it then)."""
    waiting = optuna.trial.TrialState.WAITING
    return sum(not lost(t) and t.state != waiting for t in study.get_trials(deepcopy=False))


def safe_url(url: str) -> str:
    """A storage URL without its password (sweep.json is plain text)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url

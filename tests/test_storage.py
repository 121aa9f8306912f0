"""Storage: a file written atomically gets the permissions a plain open() would give it (the team
reads the runs on a shared filesystem), not the 0600 of the temporary file it was written through."""

import os
from pathlib import Path

import pytest

from trainer import storage


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_an_atomic_write_gets_the_mode_open_would_give(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        storage.atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        storage.save({"x": 1}, tmp_path / "last.pt")  # checkpoints go the same way
        (tmp_path / "log.txt").write_text("opened plainly\n")
        assert storage.umask() == mask
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"config.yaml": mode, "last.pt": mode, "log.txt": mode}


def test_replacing_a_file_gives_the_new_one_the_same_mode(tmp_path):
    old = os.umask(0o022)
    try:
        for text in ("first\n", "second\n"):
            storage.atomic_write_text(tmp_path / "metrics.csv", text)
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.csv").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_foreign_sqlite_reads_without_writing_beside_the_file_or_waiting(tmp_path, monkeypatch):
    """MLflow and Optuna add their tables to any database: a file of another program's is named,
    read without a byte written beside it (a WAL database opened plainly gets -shm and -wal files)
    and without waiting on a lock (a busy file of the owner's own is the owner's to report)."""
    import contextlib
    import sqlite3
    import time

    from trainer.storage import foreign_sqlite, sqlite_file

    monkeypatch.chdir(tmp_path)
    with contextlib.closing(sqlite3.connect("app.db")) as db:
        db.execute("pragma journal_mode=wal")
        db.execute("create table orders (id integer)")
        db.commit()
    listed = sorted(p.name for p in tmp_path.iterdir())
    for url in (
        "sqlite:///app.db",
        "sqlite:///app.db?timeout=20",
        "sqlite+pysqlite:///app.db",
        f"sqlite:///{tmp_path}/app.db",
    ):
        assert "holds another program's tables (orders); MLflow would add its own" in foreign_sqlite(
            url, "experiments", "MLflow"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == listed == ["app.db"]
    assert sqlite_file("sqlite:///a%20b.db") == Path("a b.db") and sqlite_file("sqlite:///:memory:") is None
    (tmp_path / "notes.txt").write_text("not a database\n")
    (tmp_path / "empty.db").touch()
    (tmp_path / "folder.db").mkdir()
    assert foreign_sqlite("sqlite:///notes.txt", "experiments", "MLflow") == "notes.txt is not a SQLite database"
    assert (
        foreign_sqlite("sqlite:///folder.db", "experiments", "MLflow") == "folder.db is a folder, not a database file"
    )
    assert foreign_sqlite("sqlite:///empty.db", "experiments", "MLflow") is None  # a new database
    assert foreign_sqlite("sqlite:///gone.db", "experiments", "MLflow") is None
    assert foreign_sqlite("postgresql://u@h/db", "experiments", "MLflow") is None
    with contextlib.closing(sqlite3.connect("own.db", isolation_level=None)) as writer:
        writer.execute("create table experiments (id integer)")
        writer.execute("begin exclusive")  # the owner's own file, busy
        start = time.monotonic()
        assert foreign_sqlite("sqlite:///own.db", "experiments", "MLflow") is None
        assert time.monotonic() - start < 2

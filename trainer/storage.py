"""Storage for what a run writes and reads: atomic writes, and tensors-only loading (a checkpoint is data,
never code). The base layer: every other package may use it, it uses none of them."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import urllib.parse
from pathlib import Path

import torch


def atomic_write_bytes(path: Path, write) -> None:
    """Writes through a temporary file in the same folder, fsyncs, then renames over the target,
    so a crash mid-save leaves the old file intact, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable():
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600: give what open() would (shared run folders)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full_disk(e):
            raise OSError(e.errno, f"{path}: no space left to write it (the partial file was removed)") from None
        raise
    _fsync_dir(path.parent)


def umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere it is read by setting it and back,
    which another thread creating a file in between could see (hence /proc first)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in lines if line.startswith("Umask:")).split()[1], 8)
    old = os.umask(0o077)
    os.umask(old)
    return old


def full_disk(e: BaseException) -> bool:
    """No space left, a quota, or a file-size limit: the same thing to a user."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def durable() -> bool:
    """fsync before and after the rename (a power cut loses nothing written). TRAINER_FSYNC=0 skips
    it, for the test suite and throwaway runs on slow disks: the writes stay atomic, the temporary
    file and the rename are the same, only a power cut could lose the newest file."""
    return os.environ.get("TRAINER_FSYNC", "1") != "0"


def _fsync_dir(folder: Path) -> None:
    """Makes the rename itself durable (a power cut after it cannot bring the old file back)."""
    if not durable():
        return
    with contextlib.suppress(OSError):  # some filesystems and Windows cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Temporary files a killed process left behind (a kill -9 skips the cleanup above)."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for f in stale:
        with contextlib.suppress(OSError):
            f.unlink()
    return stale


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def save(state: dict, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load(path: Path, map_location="cpu") -> dict:
    """Refuses anything but tensors and plain containers: a checkpoint is data, never code."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise ValueError(f"{path}: the checkpoint is an empty file (a save cut short, or a copy that failed)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises UnpicklingError and friends for a hostile pickle
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]  # an empty file says nothing
        raise ValueError(
            f"{path}: refused to load the checkpoint (not plain tensors and data, or corrupt): {why}"
        ) from None


def model_state(path: Path) -> dict:
    """The model weights of a checkpoint of this tool, or a ValueError naming the file."""
    state = load(path)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        held = (
            f"a dict without model weights (keys: {sorted(map(str, state))[:5]})"
            if isinstance(state, dict)
            else f"a {type(state).__name__}"
        )
        raise ValueError(f"{path}: not a checkpoint of trainer (it holds {held})")
    return weights


def pack_rows(rows: list[dict]) -> dict:
    """Rows of numbers as columns of float64/int64 tensors (compact, exact, weights_only-safe);
    columns that are not all numbers stay lists."""
    cols: dict = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r.get(key) for r in rows]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            cols[key] = torch.tensor(values, dtype=torch.int64)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            cols[key] = torch.tensor(values, dtype=torch.float64)
        else:
            cols[key] = values
    return {"n": len(rows), "columns": cols}


def unpack_rows(packed: dict) -> list[dict]:
    cols = {k: v.tolist() if torch.is_tensor(v) else list(v) for k, v in packed["columns"].items()}
    return [{k: cols[k][i] for k in cols} for i in range(packed["n"])]


class OutputError(ValueError):
    """An output path that cannot or must not be written; the CLI prints it and exits 2."""


def writable_file(path: str | Path) -> Path:
    """An output file the user named, checked before any work: its folder is made; a folder, a
    link or a device at the path is refused, never replaced by a file."""
    path = Path(path)
    _refuse_non_file(path)
    writable_folder(path.parent)
    return path


def _refuse_non_file(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
        raise OutputError(f"{path}: is {kind}; give the path of a file to write (nothing was replaced)")


PNG_MARK = "trainer"  # the PNG "Software" text of every picture we write: our own to replace, unlike a user's


def writable_picture(path: str | Path) -> Path:
    """A PNG the user named, checked before any work: a name without a suffix gets .png, another
    suffix is refused, and an existing file is replaced only if it carries PNG_MARK (a picture an
    earlier command wrote), never a file of the user's."""
    path = Path(path)
    if not path.suffix and not (path.exists() or path.is_symlink()):
        path = path.with_suffix(".png")  # an existing "adir" is checked as named: a folder is refused, not adir.png
    _refuse_non_file(path)
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: the picture is a PNG; give a path ending in .png (nothing was written)")
    if path.exists() and not marked_png(path):
        raise OutputError(
            f"{path}: exists and was not written by trainer; give another path or remove it (nothing was replaced)"
        )
    return writable_file(path)


def marked_png(path: Path) -> bool:
    """Whether the file is a PNG carrying PNG_MARK; anything unreadable is not ours."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a huge declared size warns: it only has to be read, not decoded
            with Image.open(path, formats=["PNG"]) as img:
                return img.info.get("Software") == PNG_MARK
    except Exception:  # noqa: BLE001 - PIL raises many kinds for a file that is no PNG: not ours either way
        return False


def writable_folder(path: str | Path) -> Path:
    """A folder to write into, made if missing; a file at the path is refused."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{path}: is a file (or below one), not a folder to write into") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot make this folder ({e.strerror or e})") from None
    try:  # a real file, not access(): as root that says yes to anything (/proc, a read-only mount)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".trainer-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:  # /proc says "no such file": the folder's fault is the only one worth saying
        why = "" if e.errno == errno.ENOENT else f" ({e.strerror or e})"
        raise OutputError(f"{path}: this folder is not writable{why}") from None
    return path


def write_output(path: Path, write) -> None:
    """Writes an output file atomically; a failure (a full disk, a folder gone read-only) is an
    OutputError naming the path, the work before it having been done in vain but nothing half-written."""
    try:
        atomic_write_bytes(path, write)
    except OSError as e:
        raise OutputError(f"{path}: could not write it ({e.strerror or e})") from None


def sqlite_file(url: str | None) -> Path | None:
    """The file of a SQLite URL as SQLAlchemy reads it (sqlite[+driver]:///PATH[?options], the path
    percent-decoded; None for any other database, or for a SQLite one in memory)."""
    head, sep, rest = (url or "").partition(":///")
    if not sep or head.split("+")[0] != "sqlite":
        return None
    path = urllib.parse.unquote(rest.partition("?")[0])
    return Path(path) if path and path != ":memory:" else None


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def sqlite_tables(path: Path) -> set[str] | None:
    """The tables of a SQLite file (None when they cannot be read now: locked, unreadable). Read-only,
    and immutable unless a -wal file shows a writer at work: a WAL database opened otherwise would
    get -shm and -wal files beside it. No lock is waited on."""
    import sqlite3

    busy = path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if busy else "&immutable=1")
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=0)) as db:
            return {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    except sqlite3.Error:
        return None


def foreign_sqlite(url: str | None, own_table: str, owner: str) -> str | None:
    """Why a SQLite URL's file is not one for `owner` (None when it is absent, empty, has
    own_table, or cannot be read now: its owner says why): MLflow and Optuna add their tables to
    any database file they are given."""
    path = sqlite_file(url)
    if path is None or not (path.exists() or path.is_symlink()):
        return None
    if path.is_dir():
        return f"{path} is a folder, not a database file"
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError:
        return None
    if not header:
        return None  # an empty file: a new database
    if header != SQLITE_HEADER:
        return f"{path} is not a SQLite database"
    tables = sqlite_tables(path)
    if tables and own_table not in tables:
        shown = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
        return f"{path} holds another program's tables ({shown}); {owner} would add its own to them"
    return None

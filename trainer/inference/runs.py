"""The run directories under a folder, read tolerantly (`trainer runs`, `trainer compare`).

A run directory is a folder holding config.yaml, status.json, metrics.csv or log.txt. One that is
corrupt or half-written is still listed, as `damaged` with the reason and whatever could be read:
a listing of many runs must not stop at one bad folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from trainer.config import Config, ConfigError, parse_yaml, read_saved_config
from trainer.config.base import better_mode
from trainer.run.status import in_use
from trainer.train.plan import outline

MARKERS = {"config.yaml", "status.json", "metrics.csv", "log.txt"}
TEXT_COLUMNS = {"stage"}  # every other column of metrics.csv holds numbers
STAMP = re.compile(r"(\d{8}-\d{6})(-\d+)?")  # runs/<name>/<time>[-n], as new_run_dir names them
LOG_DEVICE = re.compile(r": seed \S+, device (\S+) \(")  # the session line of log.txt
COLUMNS = ("name", "started", "status", "epochs", "best", "wall", "device", "run directory")


@dataclass
class RunInfo:
    path: Path
    name: str | None = None
    status: str = "unknown"
    reason: str | None = None
    started: datetime | None = None
    epochs_done: int | None = None
    epochs_planned: int | None = None
    monitor: str = "valid_loss"
    mode: str = "min"  # which way `monitor` gets better
    best: float | None = None
    seconds: float | None = None
    device: str | None = None
    config: Config | None = field(default=None, repr=False)
    metrics: list[dict] = field(default_factory=list, repr=False)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """For --json: numbers as numbers, None as null."""
        keys = ("status", "reason", "epochs_done", "epochs_planned", "monitor", "best", "seconds", "device")
        started = self.started.isoformat(timespec="seconds") if self.started else None
        return {"name": self.name, "started": started, **{k: getattr(self, k) for k in keys}, "path": str(self.path)}


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every run directory under `root` (at any depth), newest first; those without a start time last."""
    runs = [read_run(p) for p in find_run_dirs(Path(root))]
    return sorted(runs, key=lambda r: (r.started is None, -r.started.timestamp() if r.started else 0, str(r.path)))


def find_run_dirs(root: Path) -> list[Path]:
    found = []
    for folder, subfolders, files in os.walk(root):  # links not followed: a link loop cannot trap it
        subfolders.sort()
        if MARKERS & set(files):
            subfolders.clear()  # a run's checkpoints/, tensorboard/ ... are not runs
            if not is_lr_find(files):
                found.append(Path(folder))
    return found


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    files = {p.name for p in path.iterdir() if p.is_file()}
    return bool(MARKERS & files) and not is_lr_find(files)


def is_lr_find(files) -> bool:
    """`trainer lr-find`'s folder holds config.yaml and log.txt too, but it trains nothing."""
    files = set(files)
    return "lr_find.json" in files and not files & {"status.json", "metrics.csv"}


def read_run(path: str | Path) -> RunInfo:
    run = RunInfo(Path(path))
    read_config(run)
    read_metrics_into(run)
    read_status(run)
    fill_in(run)
    if run.problems:
        run.status, run.reason = "damaged", "; ".join(run.problems)
    return run


def read_config(run: RunInfo) -> None:
    file = run.path / "config.yaml"
    if not file.is_file():
        run.problems.append("config.yaml: missing")
        return
    try:
        cfg = read_saved_config(file)
    except ConfigError as e:
        problem, run.name = config_problem(file, e)
        run.problems.append(problem)
        return
    run.config, run.name = cfg, cfg.name
    run.monitor, run.mode = cfg.checkpoint.monitor, better_mode(cfg.checkpoint.monitor, cfg.checkpoint.mode)
    try:
        run.epochs_planned = sum(outline(cfg).epochs)
    except ValueError:  # a stage the plan refuses: the run never trained it either
        pass


def config_problem(file: Path, error: ConfigError) -> tuple[str, str | None]:
    """A short reason, and the name when the config parses but does not validate."""
    try:
        data, _ = parse_yaml(file.read_text(encoding="utf-8"), str(file))
    except ConfigError:
        return "config.yaml: not valid YAML", None
    except (OSError, UnicodeDecodeError):
        return "config.yaml: cannot be read", None
    if not isinstance(data, dict):
        return f"config.yaml: not a mapping of keys (a {type(data).__name__})", None
    name = data.get("name")
    return str(error).splitlines()[0].replace(str(file), "config.yaml"), name if isinstance(name, str) else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv's rows, numbers as floats (None where empty); ValueError for a table that is
    not one (ragged, not numbers, not text)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, row) for row in reader if row]  # blank lines skipped, numbers kept
    except UnicodeDecodeError:
        raise ValueError("not text") from None
    except csv.Error as e:
        raise ValueError(f"not a CSV table ({e})") from None
    if not lines:
        raise ValueError("empty (no header)")
    header = lines[0][1]
    if "epoch" not in header:
        raise ValueError("no epoch column (not a metrics table)")
    table = []
    for n, row in lines[1:]:
        if len(row) != len(header):
            raise ValueError(f"line {n} has {len(row)} fields, the header {len(header)}")
        table.append(
            {k: v if k in TEXT_COLUMNS else number(v, f"line {n}: {k}") for k, v in zip(header, row, strict=True)}
        )
    return table


def number(text: str, where: str) -> float | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where} is '{text[:20]}', not a number") from None


def read_metrics_into(run: RunInfo) -> None:
    file = run.path / "metrics.csv"
    if not file.exists():  # no epoch finished yet
        run.epochs_done = 0
        return
    try:
        run.metrics = read_metrics(file)
    except (OSError, ValueError) as e:
        run.problems.append(f"metrics.csv: {getattr(e, 'strerror', None) or e}")
        return
    run.epochs_done = len(run.metrics)


def read_status(run: RunInfo) -> None:
    try:
        data = json.loads((run.path / "status.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        run.reason = "no status.json: training has not started"
        return
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        run.problems.append("status.json: not valid JSON")
        return
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        run.problems.append("status.json: no status in it")
        return
    run.status = data["status"]
    run.reason = text(data.get("reason")) or text(data.get("message"))
    run.started = parse_time(data.get("started"))
    seconds = data.get("seconds")
    run.seconds = float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else None
    run.device = text(data.get("device"))
    if run.status == "running" and not held(run.path):
        run.status, run.reason = "interrupted", "killed"  # by kill -9, a lost machine: resumable


def held(path: Path) -> bool:
    try:
        return in_use(path)
    except OSError:  # a folder we cannot write the lock of: trust status.json
        return True


def text(value, most: int = 80) -> str | None:
    """A short one-line string from status.json (a failure's message can be long)."""
    if not isinstance(value, str) or not value.strip():
        return None
    line = value.strip().splitlines()[0]
    return line if len(line) <= most else line[: most - 3] + "..."


def parse_time(value) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def fill_in(run: RunInfo) -> None:
    """What old runs' status.json does not say, from the other files."""
    run.best = best(run.metrics, run.monitor, run.mode)
    spent = [r["seconds"] for r in run.metrics if finite(r.get("seconds"))]
    if spent:  # a running or killed run's status.json is older than its last epoch
        run.seconds = max(run.seconds or 0.0, round(sum(spent), 2))
    run.started = run.started or stamp_time(run.path.name) or first_file_time(run.path)
    run.device = run.device or log_device(run.path / "log.txt")


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def best(rows: list[dict], column: str, mode: str) -> float | None:
    values = [r[column] for r in rows if finite(r.get(column))]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def stamp_time(name: str) -> datetime | None:
    match = STAMP.fullmatch(name)
    return datetime.strptime(match.group(1), "%Y%m%d-%H%M%S") if match else None


def first_file_time(path: Path) -> datetime | None:
    """The earliest file time of the folder, moved back to the time of log.txt's first line (a
    resume rewrites most files; log.txt keeps the first start's time of day)."""
    times = []
    for p in path.iterdir():
        with contextlib.suppress(OSError):  # a running fit's temporary file, gone a moment later
            times += [p.stat().st_mtime] if p.is_file() else []
    if not times:
        return None
    earliest = datetime.fromtimestamp(min(times))
    try:
        with open(path / "log.txt", encoding="utf-8", errors="replace") as f:
            clock = datetime.strptime(f.readline()[:8], "%H:%M:%S").time()
    except (OSError, ValueError):
        return earliest
    started = datetime.combine(earliest.date(), clock)
    # config.yaml is written a moment before log.txt's first line; an hour later is the day before
    return started - timedelta(days=1) if started > earliest + timedelta(hours=1) else started


def log_device(path: Path) -> str | None:
    try:
        found = LOG_DEVICE.findall(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return found[-1] if found else None


def wall(seconds: float | None) -> str:
    """1m12s, 2h03m: a duration at a glance."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def row(run: RunInfo) -> list[str]:
    """The run as `trainer runs` shows it, one string per COLUMNS."""
    done = "-" if run.epochs_done is None else str(run.epochs_done)
    planned = "-" if run.epochs_planned is None else str(run.epochs_planned)
    return [
        run.name or "-",
        run.started.strftime("%Y-%m-%d %H:%M") if run.started else "-",
        f"{run.status} ({run.reason})" if run.reason else run.status,
        f"{done}/{planned}",
        f"{run.monitor} {run.best:.4g}" if run.best is not None else "-",
        wall(run.seconds),
        run.device or "-",
        str(run.path),
    ]

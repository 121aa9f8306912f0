"""The run directory: everything needed to understand and repeat a run.

runs/<name>/<timestamp>/ holds config.yaml (resolved, with the seed), metrics.csv, schedule.csv,
classes.json, log.txt, plots and checkpoints/. Tables are rewritten atomically, so a crash
never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from trainer.storage import atomic_write_text

METRIC_COLUMNS = ["stage", "epoch", "train_loss", "valid_loss", "accuracy", "lr", "seconds"]


def new_run_dir(name: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    if out is not None:
        path = Path(out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(root) / name / stamp
        n = 1
        while path.exists():
            path = Path(root) / name / f"{stamp}-{n}"
            n += 1
    path.mkdir(parents=True, exist_ok=True)  # checkpoints/ is made by the first checkpoint
    return path


def write_table(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or _columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


@dataclass
class RunDir:
    path: Path
    metrics: list[dict] = field(default_factory=list)
    writes: bool = True  # False on ranks other than 0 of a multi-process run: rank 0 writes everything

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_text(self, name: str, text: str) -> Path:
        if not self.writes:
            return self.path / name
        atomic_write_text(self.path / name, text)
        return self.path / name

    def write_json(self, name: str, data) -> Path:
        return self.write_text(name, json.dumps(data, indent=1))

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())

    def log(self, line: str) -> None:
        if not self.writes:
            return
        with open(self.path / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def add_metrics(self, row: dict) -> None:
        self.metrics.append(row)
        self.rewrite_metrics()

    def rewrite_metrics(self) -> None:
        if not self.writes:
            return
        extra = [k for k in _columns(self.metrics) if k not in METRIC_COLUMNS]
        write_table(self.path / "metrics.csv", self.metrics, METRIC_COLUMNS + extra)

"""The k best states of a run by the monitored metric: checkpoints/top-1.pt (the best) to
top-k.pt, listed with their values in checkpoints/index.json (Lightning's save_top_k).

A better state shifts the worse ones down a rank by renaming files from the bottom up, then
writes its own file and the index. A crash in between leaves every kept state in some
top-<r>.pt (each file says which epoch it holds); the resume puts each back at its rank in the
checkpoint's list (`repair`) and redoes the epoch, which makes the same change again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer import storage

INDEX = "index.json"


def improves(value: float, best: float, mode: str, min_delta: float = 0.0) -> bool:
    """A finite value better than `best` by more than min_delta, lower or higher as `mode` says."""
    if not math.isfinite(value):
        return False
    return value < best - min_delta if mode == "min" else value > best + min_delta


def top_name(rank: int) -> str:
    return f"top-{rank}.pt"


@dataclass
class TopK:
    keep: int
    monitor: str
    mode: str
    entries: list[dict] = field(default_factory=list)  # best first: {"value", "row", "stage"}

    def entry(self, value: float, row: int, stage: str = "") -> dict | None:
        """This epoch's entry (row: its line of metrics.csv) when its value makes the top k."""
        if not math.isfinite(value):
            return None
        if len(self.entries) < self.keep or improves(value, self.entries[-1]["value"], self.mode):
            return {"value": value, "row": row, "stage": stage}
        return None

    def admit(self, entry: dict) -> None:
        """Into the list at its rank (after equal values: the earlier state keeps its place)."""
        rank = next((i for i, e in enumerate(self.entries) if improves(entry["value"], e["value"], self.mode)), None)
        self.entries.insert(len(self.entries) if rank is None else rank, entry)
        del self.entries[self.keep :]

    def write(self, folder: Path, state: dict, entry: dict) -> None:
        """The files after `admit(entry)`: the worse ones a rank down, the new one, the index."""
        rank = self.entries.index(entry) + 1
        for r in range(len(self.entries), rank, -1):  # bottom up: the last one falls off
            with contextlib.suppress(FileNotFoundError):
                os.replace(folder / top_name(r - 1), folder / top_name(r))
        kept = {k: state[k] for k in ("version", "model", "stage", "epoch", "batch") if k in state}
        storage.save({**kept, "top": {**entry, "monitor": self.monitor}}, folder / top_name(rank))
        self.write_index(folder)

    def write_index(self, folder: Path) -> None:
        index = {
            "monitor": self.monitor,
            "mode": self.mode,
            "top": [{"rank": i + 1, "file": top_name(i + 1), **e} for i, e in enumerate(self.entries)],
        }
        storage.atomic_write_text(folder / INDEX, json.dumps(index, indent=1))

    def state_dict(self) -> dict:
        return {"entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [dict(e) for e in state.get("entries", [])]

    def repair(self, folder: Path) -> list[dict]:
        """After a resume: every file at the rank the checkpoint's list gives it, files of states
        the list does not hold removed. Returns the entries whose file is gone (dropped)."""
        held = {}
        for path in sorted(folder.glob("top-*.pt")):
            row = _row_of(path)
            if row is None or row not in {e["row"] for e in self.entries}:
                path.unlink(missing_ok=True)  # a state from after the checkpoint: redone, rewritten
            else:
                held[row] = path
        lost = [e for e in self.entries if e["row"] not in held]
        self.entries = [e for e in self.entries if e["row"] in held]
        for rank, e in enumerate(self.entries, 1):  # files only ever moved down: move each back up
            if held[e["row"]] != folder / top_name(rank):
                os.replace(held[e["row"]], folder / top_name(rank))
        if self.entries or (folder / INDEX).exists():
            self.write_index(folder)
        return lost


def _row_of(path: Path) -> int | None:
    try:
        state = storage.load(path)
        return int(state["top"]["row"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_index(run_dir: Path) -> dict | None:
    """checkpoints/index.json of a run, or None (no top-k kept, or unreadable)."""
    try:
        index = json.loads((Path(run_dir) / "checkpoints" / INDEX).read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None

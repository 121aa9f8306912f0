"""Plots of a run: schedule.csv/png (lr and momentum per step), losses.png, lr_find.png.

matplotlib's object API with the Agg canvas: no pyplot global state, no display needed, safe on
a headless CI box. Files are written atomically like every other file of a run directory.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from trainer.run.rundir import RunDir, write_table
from trainer.storage import PNG_MARK, atomic_write_bytes
from trainer.train.loop import Callback, Learner

SCHEDULE_COLUMNS = ["stage", "step", "lr", "mom", "loss"]


def smoothed(values: list[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average (the curve lr_find and fastai plot)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _figure(rows: int = 1, height: float = 3.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, height * rows), layout="tight")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": PNG_MARK})  # marked: ours to replace later
    atomic_write_bytes(Path(path), lambda f: f.write(buf.getvalue()))
    return Path(path)


def _stage_lines(ax, steps: list[dict]) -> None:
    """A dotted line where each stage after the first begins."""
    for prev, row in pairwise(steps):
        if row["stage"] != prev["stage"]:
            ax.axvline(row["step"], color="grey", linestyle=":", linewidth=1)


def plot_schedule(steps: list[dict], path: Path) -> Path:
    fig, (ax_lr, ax_mom) = _figure(2, 2.6)
    x = [r["step"] for r in steps]
    ax_lr.plot(x, [r["lr"] for r in steps])
    ax_lr.set_ylabel("learning rate (last group)")
    ax_mom.plot(x, [r["mom"] for r in steps], color="tab:orange")
    ax_mom.set_ylabel("momentum / beta1")
    ax_mom.set_xlabel("step")
    for ax in (ax_lr, ax_mom):
        _stage_lines(ax, steps)
    return _save(fig, path)


def plot_losses(steps: list[dict], valid: list[tuple[int, float]], path: Path) -> Path:
    fig, (ax,) = _figure(1)
    x = [r["step"] for r in steps]
    loss = [r["loss"] for r in steps]
    ax.plot(x, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    finite = [v if math.isfinite(v) else math.nan for v in loss]
    ax.plot(x, smoothed(finite), color="tab:blue", label="train (smoothed)")
    if valid:
        ax.plot([s for s, _ in valid], [v for _, v in valid], "o-", color="tab:orange", label="valid (per epoch)")
    _stage_lines(ax, steps)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return _save(fig, path)


def useful_part(smoothed: list[float]) -> int:
    """How many points of an lr_find curve to show: up to where the loss, past its lowest point,
    rises above where it started (the diverging tail, which would squash the dip flat)."""
    finite = [v if math.isfinite(v) else math.inf for v in smoothed]
    low = min(range(len(finite)), key=finite.__getitem__)
    start = finite[0]
    for i in range(low + 1, len(finite)):
        if finite[i] > start:
            return i
    return len(finite)


def plot_lr_find(result, path: Path) -> Path:
    """Smoothed loss against lr on a log axis, the raw loss faintly, each suggestion marked with its
    value; the diverging tail left out and the y-limits set by the rest, so the dip is visible."""
    n = useful_part(result.smoothed)
    lrs, losses, smooth = result.lrs[:n], result.losses[:n], result.smoothed[:n]
    fig, (ax,) = _figure(1)
    ax.plot(lrs, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
    ax.plot(lrs, smooth, color="tab:blue", label="smoothed loss")
    ax.set_xscale("log")
    low, high = min(smooth), max(smooth)
    margin = 0.1 * (high - low) or 0.1 * abs(high) or 0.1
    ax.set_ylim(low - margin, high + margin)
    markers = {"valley": ("o", "tab:red"), "steep": ("^", "tab:green"), "minimum": ("s", "tab:purple")}
    for name, lr in result.suggestions.items():
        i = min(range(len(result.lrs)), key=lambda j: abs(math.log(result.lrs[j]) - math.log(lr)))
        marker, colour = markers.get(name, ("x", "black"))
        label = f"{name} {lr:.2g}" + (" (recommended)" if name == result.recommended else "")
        ax.plot([lr], [result.smoothed[i]], marker, color=colour, markersize=9, label=label, clip_on=True)
    ax.set_xlabel("learning rate (last layer group), log scale")
    ax.set_ylabel("loss")
    ax.legend()
    return _save(fig, path)


@dataclass
class History:
    """What the plots show across all stages of a run: every step and every validation."""

    steps: list[dict] = field(default_factory=list)  # both filled by the Recorder, both in its checkpoint state
    valid: list[tuple[int, float]] = field(default_factory=list)
    drawn_at: float = field(default_factory=time.perf_counter)  # when the plots were last written


def write_plots(run: RunDir, history: History) -> None:
    """schedule.csv, schedule.png and losses.png from the run's history so far."""
    history.drawn_at = time.perf_counter()
    write_table(run.path / "schedule.csv", history.steps, SCHEDULE_COLUMNS)
    if history.steps:
        plot_schedule(history.steps, run.path / "schedule.png")
        plot_losses(history.steps, history.valid, run.path / "losses.png")


class RunPlots(Callback):
    """Refreshes the plots after an epoch when the last drawing is at least `every` seconds old
    (cheap on long epochs, nothing on short ones); the spine draws them once more at the end of the
    run, however it ends."""

    def __init__(self, run: RunDir, history: History, every: float = 30.0):
        self.run, self.history, self.every = run, history, every

    def after_epoch(self, learn: Learner) -> None:
        if time.perf_counter() - self.history.drawn_at >= self.every:
            write_plots(self.run, self.history)

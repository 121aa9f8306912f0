"""Progress: a rich bar per epoch and an epoch table on a terminal; plain lines otherwise,
so CI logs stay readable."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from trainer.train.callbacks import Recorder
from trainer.train.loop import Callback, Learner

LOSS_EVERY = 20  # batches between updates of the bar's loss
SHOWN = ["stage", "epoch", "train_loss", "valid_loss", "accuracy", "fbeta", "bpc", "lr", "seconds"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.4f}"
    return str(v)


def _width(col: str) -> int:
    return max(len(col), 10 if col != "stage" else 12)


class ProgressReport(Callback):
    """The bar, the epoch table, and one line per epoch in log.txt (the Recorder's row)."""

    def __init__(self, recorder: Recorder, console: Console | None = None, log=None, interactive: bool | None = None):
        self.recorder = recorder
        self.console = console or Console(stderr=False)
        self.interactive = self.console.is_terminal if interactive is None else interactive
        self.log = log
        self.bar: Progress | None = None
        self.header: list[str] | None = None

    def before_epoch(self, learn: Learner) -> None:
        if not self.interactive:
            return
        s = learn.state
        self.bar = Progress(
            TextColumn(f"epoch {s.epoch + 1}/{s.n_epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=s.n_batches, completed=s.batch, loss="-")

    def after_batch(self, learn: Learner) -> None:
        if self.bar is None:
            return
        if learn.state.batch % LOSS_EVERY == 0:  # reading the loss syncs a GPU: not every batch
            self.bar.update(self.task, advance=1, loss=f"{learn.state.loss:.4f}")
        else:
            self.bar.update(self.task, advance=1)

    def before_validate(self, learn: Learner) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def after_epoch(self, learn: Learner) -> None:
        row = self.recorder.last_row
        cols = [c for c in SHOWN if c in row]
        if self.log:
            self.log("  ".join(f"{c} {_fmt(row[c])}" for c in cols))
        if not self.interactive:  # CI logs: one self-describing line per epoch
            print("  ".join(f"{c} {_fmt(row[c])}" for c in cols), flush=True)
            return
        if cols != self.header:  # the epoch table's header, again only when the columns change
            self.header = cols
            self.console.print(" ".join(f"[bold]{c:>{_width(c)}}[/bold]" for c in cols), highlight=False)
        self.console.print(" ".join(f"{_fmt(row[c]):>{_width(c)}}" for c in cols), highlight=False)

    def after_fit(self, learn: Learner) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

"""lr_find inside a run: `lr: auto` (the stage's lr found at its start) and `trainer lr-find
CONFIG` (the range test for one stage, into a folder of its own). The test itself is
trainer/train/lr_find.py; here its result is saved and logged."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from rich.console import Console

from trainer.config import Config
from trainer.run import distributed
from trainer.run.learner import step_learner
from trainer.run.plots import plot_lr_find
from trainer.run.resume import check_fresh_out
from trainer.run.rundir import write_table
from trainer.run.runtime import pick_device
from trainer.run.session import Session, open_session
from trainer.storage import atomic_write_text
from trainer.train.loop import Learner
from trainer.train.lr_find import LrFindResult, check_range, lr_find
from trainer.train.plan import StagePlan

SMOKE_LR = 1e-3  # lr: auto in a smoke run: a few batches cannot find a rate, so a safe one is used


def find_lr(sess: Session, learner: Learner, stage: StagePlan) -> float:
    """lr: auto: lr_find at the start of the stage (on the weights as the previous stages left
    them); its recommendation becomes the stage's peak lr. Recorded in the run directory as
    lr_find-<stage>.csv/.json/.png, a line of log.txt and a peak_lr column in metrics.csv."""
    if sess.smoke:
        sess.log(
            f"stage '{stage.name}': lr: auto uses {SMOKE_LR:g} in a smoke run (lr_find needs more than a few batches)"
        )
        return SMOKE_LR
    result = lr_find(learner, seed=sess.cfg.seed or 0)
    if sess.world.is_main:  # every rank found the same lr (the losses are averaged over ranks)
        save_result(result, sess.run.path, f"lr_find-{stage.name}")
    sess.log(f"stage '{stage.name}': {result.summary()}; using lr {result.lr:.3g}")
    return result.lr


def lr_find_stage(
    cfg: Config,
    stage: str | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    out: str | Path | None = None,
    console: Console | None = None,
) -> tuple[LrFindResult, Path]:
    """`trainer lr-find`: the range test with a stage's freeze state, image size, batch size and
    lr shape (differential lrs keep their ratios), on the model as built. Writes lr_find.csv,
    lr_find.json and lr_find.png into a run directory (runs/<name>/lr_find-<time>/ by default)."""
    check_range(start_lr, end_lr, num_it)
    out = out or Path("runs") / cfg.name / f"lr_find-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    world, device = distributed.start(cfg.distributed.backend, pick_device(cfg.device))
    done = False
    try:
        world.from_main(lambda: check_fresh_out(Path(out), marker="lr_find.json"))  # a user's folder stays theirs
        sess = open_session(cfg, out, world, device, console=console)
        chosen = sess.plan.find(stage)
        learner, _ = step_learner(sess, chosen)
        result = lr_find(learner, start_lr, end_lr, num_it, seed=sess.cfg.seed or 0)
        if world.is_main:
            save_result(result, sess.run.path, "lr_find")
        done = True
    finally:
        distributed.stop(wait=done)
    sess.log(f"stage '{chosen.name}' (first trainable group {chosen.freeze_to}): {result.summary()}")
    return result, sess.run.path


def save_result(result: LrFindResult, folder: str | Path, name: str = "lr_find") -> list[Path]:
    """<name>.csv (step, lr, loss, smoothed_loss), <name>.json (suggestions) and <name>.png."""
    folder = Path(folder)
    paths = [folder / f"{name}.csv", folder / f"{name}.json", folder / f"{name}.png"]
    write_table(paths[0], result.rows(), ["step", "lr", "loss", "smoothed_loss"])
    atomic_write_text(
        paths[1],
        json.dumps(
            {
                "suggestions": result.suggestions,
                "recommended": result.recommended,
                "lr": result.lr,
                "stopped": result.stopped,
            },
            indent=1,
        ),
    )
    plot_lr_find(result, paths[2])
    return paths

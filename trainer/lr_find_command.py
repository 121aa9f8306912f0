"""`trainer lr-find CONFIG`: the range test for one stage of a config, on the model as built,
into a run directory of its own. The test itself is trainer/lr_find.py; `lr: auto` inside a fit
is pipeline.use_found_lr."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from trainer import distributed
from trainer.config import Config
from trainer.lr_find import LrFindResult, check_range, lr_find, save_result
from trainer.pipeline import make_learner, prepare
from trainer.stages import StageError, expand_stages, freeze_points


def find_stage(stages: list, name: str | None) -> int:
    if name is None:
        return 0
    names = [st.name for st in stages]
    if name not in names:
        raise StageError(f"no stage named '{name}' (stages: {', '.join(names)})")
    return names.index(name)


def lr_find_stage(cfg: Config, stage: str | None = None, start_lr: float = 1e-7, end_lr: float = 10.0,
                  num_it: int = 100, out: str | Path | None = None, console=None) -> tuple[LrFindResult, Path]:
    """`trainer lr-find`: the range test with a stage's freeze state, image size, batch size and
    lr shape (differential lrs keep their ratios), on the model as built. Writes lr_find.csv,
    lr_find.json and lr_find.png into a run directory (runs/<name>/lr_find-<time>/ by default)."""
    check_range(start_lr, end_lr, num_it)
    out = out or Path("runs") / cfg.name / f"lr_find-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    sess = prepare(cfg, out, console=console)
    done = False
    try:
        stages = expand_stages(sess.cfg.train.stages)
        k = find_stage(stages, stage)
        freeze_to = freeze_points(stages, len(sess.built.groups))[k]
        learner = make_learner(sess, stages[k], k, freeze_to)
        result = lr_find(learner, start_lr, end_lr, num_it, seed=sess.cfg.seed or 0)
        if sess.world.is_main:
            save_result(result, sess.run.path, "lr_find")
        done = True
    finally:
        distributed.stop(wait=done)
    sess.log(f"stage '{stages[k].name}' (first trainable group {freeze_to}): {result.summary()}")
    return result, sess.run.path

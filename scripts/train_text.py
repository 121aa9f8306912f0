"""Train a language-model config for a bounded time and report its validation curve.

Runs `trainer fit` (trainer.run.fit.fit, the real thing) with two extra callbacks: one validates every
`--every` seconds of training (besides the loop's own validation at each epoch end), keeping
the training streams' hidden state across the pause; the other stops at `--target` validation
loss (nats/char) or when `--minutes` run out, validating once more at a mid-epoch stop. Prints
the curve and the time to the target, and writes them to curve.csv in the run directory.
Times are wall-clock and include validation.

    flock /tmp/cpu.lock python scripts/train_text.py configs/nietzsche_gru.yaml --target 1.37 --minutes 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's trainer, not an installed one

import torch  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.run import fit as spine  # noqa: E402
from trainer.run.rundir import write_table  # noqa: E402
from trainer.train.loop import Callback, CancelFit  # noqa: E402
from trainer.train.plan import CONFIG_CHECKS  # noqa: E402


class Curve(Callback):
    order = 40  # after the recorder and the checkpointer

    def __init__(self, minutes: float, every: float, target: float | None):
        self.budget, self.every, self.target = minutes * 60, every, target
        self.start = self.last = None
        self.chars, self.stage, self.rows, self.reached, self.done = 0, 0, [], None, False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def before_fit(self, learn) -> None:
        if self.start is None:
            self.start = self.last = time.perf_counter()
        self.stage += 1
        if self.done:
            raise CancelFit()  # the budget or the target ended the run: skip the remaining stages

    def _record(self, learn, valid: dict, where: str) -> None:
        s = learn.state
        row = {
            "seconds": round(self.elapsed(), 1),
            "stage": self.stage,
            "epoch": round(s.epoch + (s.batch + 1) / s.n_batches, 3) if where == "mid" else s.epoch + 1,
            "chars": self.chars,
            "train_loss": s.train_loss,
            **valid,
        }
        self.rows.append(row)
        print(
            "  curve: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            flush=True,
        )
        if self.target is not None and self.reached is None and valid["valid_loss"] <= self.target:
            self.reached = row["seconds"]
            self.done = True

    def _validate_mid_epoch(self, learn) -> None:
        model = getattr(learn.model, "module", learn.model)
        state = model.h
        self._record(learn, learn.validate(), "mid")  # validate() resets the state; put it back after
        model.h = state
        learn.model.train()
        self.last = time.perf_counter()

    def after_batch(self, learn) -> None:
        self.chars += learn.xb.numel()
        s = learn.state
        last_batch = s.batch + 1 == s.n_batches  # the loop validates the epoch's end itself
        if not last_batch and (self.elapsed() >= self.budget or time.perf_counter() - self.last >= self.every):
            self._validate_mid_epoch(learn)
        if self.elapsed() >= self.budget:
            self.done = True
        if self.done and not last_batch:
            raise CancelFit()

    def after_epoch(self, learn) -> None:
        self._record(learn, learn.state.valid, "end")
        self.last = time.perf_counter()
        if self.elapsed() >= self.budget:
            self.done = True
        if self.done:
            raise CancelFit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget")
    ap.add_argument("--every", type=float, default=120.0, help="validate every this many seconds")
    ap.add_argument("--target", type=float, default=None, help="stop at this validation loss (nats/char)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<name>/<time>)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.sets, checks=CONFIG_CHECKS)
    curve = Curve(args.minutes, args.every, args.target)
    result = spine.fit(cfg, args.out, callbacks=[curve])
    write_table(result.run_dir / "curve.csv", curve.rows)
    best = min(curve.rows, key=lambda r: r["valid_loss"]) if curve.rows else {}
    print(
        f"config {args.config} {' '.join('--set ' + s for s in args.sets)}; torch threads "
        f"{torch.get_num_threads()}; run {result.run_dir}"
    )
    print(
        f"best valid_loss {best.get('valid_loss', float('nan')):.4f} nats/char "
        f"(bpc {best.get('bpc', float('nan')):.4f}, accuracy {best.get('accuracy', float('nan')):.4f}) "
        f"at {best.get('seconds')} s, epoch {best.get('epoch')}"
    )
    if args.target is not None:
        print(
            f"target {args.target}: "
            + (
                f"reached after {curve.reached} s"
                if curve.reached is not None
                else f"NOT reached within {args.minutes} minutes"
            )
        )


if __name__ == "__main__":
    main()

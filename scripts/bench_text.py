"""Training throughput of the char models: trainer's loop vs a raw PyTorch loop, same run.

Both train the same model (same factory, same seed) on the same batches (the training loader's
streams and its variable-length boundaries for epoch 0), with AdamW and gradient clipping as
the config says. The trainer side is the real thing: open_session + stage_learner with every
default callback (schedule, recorder, non-finite guard, state reset, progress, clipping,
checkpointer). Rounds alternate raw/trainer so a busy machine hurts both alike; the first
`--warmup` batches of each measurement are not timed.

    flock /tmp/cpu.lock python scripts/bench_text.py configs/nietzsche_gru.yaml configs/nietzsche_lstm.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's trainer, not an installed one

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.models import create_model  # noqa: E402
from trainer.run.learner import stage_learner  # noqa: E402
from trainer.run.session import open_session  # noqa: E402
from trainer.train.loop import Callback  # noqa: E402
from trainer.train.plan import CONFIG_CHECKS  # noqa: E402


class Timer(Callback):
    """Times batches warmup.. to the end (after every other callback has run)."""

    order = 100

    def __init__(self, warmup: int):
        self.warmup, self.chars, self.t0, self.t1 = warmup, 0, None, None

    def after_batch(self, learn) -> None:
        i = learn.state.batch
        if i == self.warmup - 1:
            self.t0 = time.perf_counter()
        elif i >= self.warmup:
            self.chars += learn.xb.numel()
            self.t1 = time.perf_counter()


def trainer_speed(sess, stage, warmup: int, n: int) -> float:
    learner, _ = stage_learner(sess, stage)
    learner.train_dl.limit, learner.valid_dl.limit = warmup + n, 1
    timer = Timer(warmup)
    learner.add(timer)
    learner.fit(1)
    return timer.chars / (timer.t1 - timer.t0)


def raw_speed(sess, stage, warmup: int, n: int) -> float:
    cfg = sess.cfg
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, sess.bundle.n_out, 0, 0).model.to(sess.device).train()
    lr = stage.lrs[-1] if not stage.find_lr else 1e-3
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=cfg.train.betas, eps=cfg.train.eps, weight_decay=cfg.train.wd
    )
    train, _ = sess.bundle.loaders(stage.bs)
    data, bounds = train.data, train.bounds().tolist()
    chars, t0 = 0, None
    for i in range(warmup + n):
        if i == warmup:
            t0 = time.perf_counter()
        x, y = data[bounds[i] : bounds[i + 1]], data[bounds[i] + 1 : bounds[i + 1] + 1]
        out = model(x)
        loss = F.cross_entropy(out.view(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip)
        opt.step()
        if i >= warmup:
            chars += x.numel()
    return chars / (time.perf_counter() - t0)


def bench(config: str, sets: list[str], warmup: int, n: int, rounds: int) -> dict:
    cfg = load_config(config, sets, checks=CONFIG_CHECKS)
    with tempfile.TemporaryDirectory() as tmp:
        sess = open_session(cfg, tmp)
        sess.log = lambda m: None
        stage = sess.plan.stages[0]
        raw, ours = [], []
        for r in range(rounds):
            order = [("raw", raw_speed, raw), ("trainer", trainer_speed, ours)]
            for name, fn, sink in order if r % 2 == 0 else order[::-1]:
                sink.append(fn(sess, stage, warmup, n))
                print(f"  {Path(config).stem} round {r + 1} {name}: {sink[-1]:,.0f} chars/s", flush=True)
    return {
        "config": Path(config).stem,
        "raw": statistics.median(raw),
        "trainer": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(raw),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=["configs/nietzsche_gru.yaml", "configs/nietzsche_lstm.yaml"])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    results = [bench(c, args.sets, args.warmup, args.batches, args.rounds) for c in args.configs]
    print(f"{'config':<20} {'raw chars/s':>12} {'trainer chars/s':>16} {'trainer/raw':>12}")
    for r in results:
        print(f"{r['config']:<20} {r['raw']:>12,.0f} {r['trainer']:>16,.0f} {r['ratio']:>12.3f}")


if __name__ == "__main__":
    main()

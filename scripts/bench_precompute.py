"""Precomputed activations vs full images for a frozen-body stage: seconds per epoch.

    flock /tmp/cpu.lock python scripts/bench_precompute.py configs/cifar10_lite0_finetune.yaml --epochs 2

Runs the config's first precompute stage twice on the same session: once on full images (the
body runs forward every batch, with augmentation) and once on activations computed once
(timed separately, never read from the cache). Prints seconds per epoch (training + validation)
and the one-time cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_config  # noqa: E402
from trainer.run.learner import stage_learner  # noqa: E402
from trainer.run.session import open_session  # noqa: E402
from trainer.train import precompute  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(Path(args.config), args.set)
    sess = open_session(cfg, tempfile.mkdtemp(prefix="bench-precompute-"))
    stage = next((s for s in sess.plan.stages if s.precompute), None)
    if stage is None:
        sys.exit("the config has no stage with precompute: true")
    stage = dataclasses.replace(stage, epochs=args.epochs)

    results = {}
    for mode in ("full images", "precomputed"):
        st = dataclasses.replace(stage, precompute=mode == "precomputed")
        real = precompute.cached_activations
        timing = {}

        def uncached(features, dl, arch, precision, cache_dir, log=print, timing=timing):
            t = time.perf_counter()
            x = precompute.compute_activations(features, dl, precision)
            timing["once"] = timing.get("once", 0.0) + time.perf_counter() - t
            return x

        precompute.cached_activations = uncached
        try:
            learner, _ = stage_learner(sess, st)
        finally:
            precompute.cached_activations = real
        start = len(sess.run.metrics)
        learner.fit(args.epochs)
        secs = [r["seconds"] for r in sess.run.metrics[start:]]
        results[mode] = (secs, timing.get("once", 0.0), sess.run.metrics[-1])

    n_train = len(sess.bundle.images.train_y)
    n_valid = len(sess.bundle.images.valid_y)
    size = stage.size or sess.bundle.images.size
    print(
        f"{cfg.model.arch}, stage '{stage.name}' at {size}px, {n_train} train + {n_valid} valid images, "
        f"{args.epochs} epochs"
    )
    for mode, (secs, once, last) in results.items():
        per = sum(secs) / len(secs)
        extra = f", once {once:.1f} s to compute the activations" if once else ""
        print(f"  {mode:12s}: {per:7.2f} s/epoch{extra}  (last valid_loss {last['valid_loss']:.4f})")
    full, pre = (sum(r[0]) / len(r[0]) for r in results.values())
    once = results["precomputed"][1]
    print(f"  speed-up per epoch: {full / pre:.1f}x; break-even after {once / max(full - pre, 1e-9):.1f} epoch(s)")


if __name__ == "__main__":
    main()

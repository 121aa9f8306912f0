"""What tracking costs: seconds per epoch of the same run without trackers, with TensorBoard,
with MLflow (a SQLite store) and with both, side by side in one process.

    python scripts/bench_tracking.py configs/quickstart.yaml --epochs 2 --subset 10000 --rounds 2

Each round runs the variants one after another (the order rotates between rounds, so a noisy
neighbour does not hit one variant only); the table gives the median wall seconds per epoch of a
whole `fit` (start, epochs, artifacts at the end) and the ratio to no tracking. compile is off:
the point is the trackers, not the compiler. Needs the track extra (pip install -e '.[track]').
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_config  # noqa: E402
from trainer.run.fit import fit  # noqa: E402

VARIANTS = {
    "none": {},
    "tensorboard": {"tensorboard": True},
    "mlflow (sqlite)": {"mlflow": "sqlite"},
    "both": {"tensorboard": True, "mlflow": "sqlite"},
}


def run_once(cfg, track: dict, folder: Path) -> float:
    update = {"tensorboard": track.get("tensorboard", False), "mlflow": None}
    if track.get("mlflow"):
        update["mlflow"] = {"uri": f"sqlite:///{folder.parent / 'mlruns.db'}", "experiment": "bench"}
    cfg = cfg.model_validate({**cfg.model_dump(), "track": {**cfg.track.model_dump(), **update}})
    t = time.perf_counter()
    fit(cfg, folder)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--subset", type=int, default=10000, help="training images (0: all)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    sets = ["compile=false", f"train.stages.0.epochs={args.epochs}"]
    if args.subset:
        sets.append(f"data.subset.train={args.subset}")
    cfg = load_config(Path(args.config), sets)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(Path(cfg.data.path).resolve())})})
    work = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    import os

    os.chdir(work)  # MLflow's artifacts (./mlruns) land here, not in the project
    run_once(cfg, VARIANTS["both"], work / "warm-up")  # the image cache and the MLflow tables, made once
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(run_once(cfg, VARIANTS[name], work / f"{name.split()[0]}-{r}") / args.epochs)
    base = statistics.median(times["none"])
    print(
        f"{args.config}: {args.epochs} epoch(s) on {args.subset or 'all'} images, {args.rounds} round(s), wall s/epoch"
    )
    print(f"{'trackers':<18}{'s/epoch':>10}{'ratio':>8}")
    for name, ts in times.items():
        print(f"{name:<18}{statistics.median(ts):>10.2f}{statistics.median(ts) / base:>8.3f}")


if __name__ == "__main__":
    main()

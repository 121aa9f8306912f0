"""What DDP itself costs: the same config trained by one plain process and by torchrun with one
process (a process group, the DDP wrapper, the per-step loss and signal all-reduces, gathered
validation), optionally also with N processes.

    python scripts/ddp_overhead.py configs/cifar10_convnet.yaml --set train.stages.0.epochs=2
    python scripts/ddp_overhead.py configs/quickstart.yaml --nproc 2 --threads 1

Each run is a real `trainer fit` in a fresh process with the same OMP_NUM_THREADS (torchrun
would set 1 otherwise); the table gives the wall time and the median `seconds` column of
metrics.csv (training + validation per epoch, without start-up), and the overhead against the
plain process. Run directories go to a temporary folder and are removed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.run.rundir import read_table  # noqa: E402


def command(kind: str, nproc: int, config: str, sets: list[str], out: Path) -> list[str]:
    fit = ["fit", config, *[a for s in sets for a in ("--set", s)], "--out", str(out)]
    if kind == "plain":
        return [sys.executable, "-m", "trainer", *fit]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "trainer",
        *fit,
    ]


def time_run(kind: str, nproc: int, args, folder: Path) -> dict:
    out = folder / f"{kind}-{nproc}-{time.monotonic_ns()}"
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # keep the caller's packages
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    start = time.perf_counter()
    res = subprocess.run(command(kind, nproc, args.config, args.set, out), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{kind} x{nproc} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    epochs = [float(r["seconds"]) for r in read_table(out / "metrics.csv")]
    return {"run": f"{kind} x{nproc}", "wall_s": wall, "epoch_s": statistics.median(epochs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], help="as trainer fit --set (repeatable)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of every process")
    p.add_argument("--nproc", type=int, default=0, help="also time torchrun with this many processes")
    p.add_argument("--repeat", type=int, default=1, help="runs of each kind (the fastest counts)")
    args = p.parse_args()
    plans = [("plain", 1), ("torchrun", 1)] + ([("torchrun", args.nproc)] if args.nproc > 1 else [])
    with tempfile.TemporaryDirectory(prefix="ddp-overhead-") as tmp:
        rows = []
        for kind, n in plans:
            runs = [time_run(kind, n, args, Path(tmp)) for _ in range(args.repeat)]
            rows.append(min(runs, key=lambda r: r["epoch_s"]))
    base = rows[0]["epoch_s"]
    print(f"{'run':<14}{'wall s':>10}{'epoch s':>10}{'vs plain':>10}")
    for r in rows:
        print(f"{r['run']:<14}{r['wall_s']:>10.2f}{r['epoch_s']:>10.3f}{(r['epoch_s'] / base - 1) * 100:>+9.1f}%")


if __name__ == "__main__":
    main()

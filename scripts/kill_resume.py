"""Kill -9 a real training run at a random moment, resume it, and compare with an uninterrupted
run: prints whether metrics.csv and the final weights are identical, the time lost, and what a
checkpoint costs (size, seconds per atomic save).

    python scripts/kill_resume.py configs/quickstart.yaml --set train.stages.0.epochs=1 --every 50
"""

from __future__ import annotations

import argparse
import csv
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import storage as checkpoint  # noqa: E402


def trainer(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "fit", *args], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--every", default="50", help="train.checkpoint_every for all three runs")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random kill moment")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    sets = [x for s in [*a.sets, f"train.checkpoint_every={a.every}"] for x in ("--set", s)]

    t0 = time.perf_counter()
    ref = trainer([a.config, *sets, "--out", str(tmp / "ref")], tmp / "ref.log")
    assert ref.wait() == 0, (tmp / "ref.log").read_text()
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    victim = trainer([a.config, *sets, "--out", str(tmp / "run")], tmp / "run.log")
    last = tmp / "run" / "checkpoints" / "last.pt"
    while not last.exists():
        assert victim.poll() is None, "the run ended before its first checkpoint: lower --every"
        time.sleep(0.01)
    t_first = time.perf_counter() - t0
    wait = random.Random(a.seed).uniform(0, 0.8 * max(0.0, t_ref - t_first))
    time.sleep(wait)
    victim.send_signal(signal.SIGKILL)
    code = victim.wait()
    t_killed = time.perf_counter() - t0
    state = checkpoint.load(last)
    where = f"stage {state['stage'] + 1}, epoch {state['epoch'] + 1}, batch {state['batch']}"

    t0 = time.perf_counter()
    resumed = trainer([a.config, *sets, "--resume", str(tmp / "run")], tmp / "resume.log")
    assert resumed.wait() == 0, (tmp / "resume.log").read_text()
    t_resume = time.perf_counter() - t0

    a_w = checkpoint.load(tmp / "ref" / "checkpoints" / "last.pt")["model"]
    b_w = checkpoint.load(last)["model"]
    same_w = a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    n = 5
    t0 = time.perf_counter()
    for _ in range(n):
        checkpoint.save(state, tmp / "probe.pt")
    t_save = (time.perf_counter() - t0) / n

    print(f"uninterrupted run: {t_ref:.1f} s")
    print(f"killed run: exit {code} after {t_killed:.1f} s (first checkpoint at {t_first:.1f} s); last.pt at {where}")
    print(f"resumed run: {t_resume:.1f} s (killed + resumed = {t_killed + t_resume:.1f} s)")
    print(
        f"identical metrics.csv (but seconds): {metrics(tmp / 'ref') == metrics(tmp / 'run')}; "
        f"bitwise-identical final weights: {same_w} ({len(a_w)} tensors)"
    )
    print(f"checkpoint: {last.stat().st_size / 1e6:.2f} MB, {t_save * 1000:.0f} ms per atomic save (fsync)")
    print(f"files in {tmp}")


if __name__ == "__main__":
    main()

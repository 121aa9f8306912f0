"""Variants of the CIFAR-10 speedrun, one after another on the same GPU, in one table.

    python scripts/speedrun_sweep.py                       # the shipped config and the tricks, 10 epochs
    python scripts/speedrun_sweep.py --epochs 24 --only shipped,all
    python scripts/speedrun_sweep.py --variant 'wd2e-3=train.wd=2.0e-3' --only shipped

Each variant is a real `trainer fit` (the config plus `--set` overrides) in its own process,
then `trainer evaluate RUN --tta`. Columns: test accuracy, with flip TTA, the training seconds
of epochs 2..n (epoch 1 pays for torch.compile; the README's speedrun figure is these, validation
included), epoch 1's seconds and the wall time. Run directories stay under --out for a look.
On the CPU it runs too, slowly; `--set data.subset.train=2048` makes a quick check of the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.run.rundir import read_table  # noqa: E402

# the tricks of the DAWNBench ResNet-9 line (Page, "How to train your ResNet"), one at a time, then together
VARIANTS = {
    "shipped": [],
    "nesterov": ["train.nesterov=true"],
    "cutout8": ["transforms.cutout=8"],
    "ema": ["train.ema=0.99"],
    "all": ["train.nesterov=true", "transforms.cutout=8", "train.ema=0.99"],
}


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with log.open("a") as f:
        res = subprocess.run([sys.executable, "-m", "trainer", *cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise SystemExit(f"`trainer {' '.join(cmd)}` failed (exit {res.returncode}); see {log}")


def one(name: str, sets: list[str], args) -> dict:
    out = Path(args.out) / name
    if out.exists():
        raise SystemExit(f"{out}: exists already (pick another --out)")
    sets = [f"train.stages.0.epochs={args.epochs}", f"name=speedrun_{name}", *args.set, *sets]
    log = Path(args.out) / f"{name}.log"
    start = time.perf_counter()
    run(["fit", args.config, *[a for s in sets for a in ("--set", s)], "--out", str(out)], log)
    wall = time.perf_counter() - start
    run(["evaluate", str(out), "--tta"], log)
    report = json.loads((out / "evaluation.json").read_text())
    seconds = [float(r["seconds"]) for r in read_table(out / "metrics.csv")]
    return {
        "variant": name,
        "sets": sets[2:],
        "epochs": len(seconds),
        "accuracy": report["metrics"]["accuracy"],
        "accuracy_tta": (report.get("metrics_tta") or {}).get("accuracy"),
        "train_s_after_first": sum(seconds[1:]),
        "first_epoch_s": seconds[0],
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/cifar10_speedrun.yaml")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--only", default=",".join(VARIANTS), help="variants to run, comma-separated, in order")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[;KEY=VALUE]",
        help="an extra variant (repeatable); name it in --only too, or it runs last",
    )
    p.add_argument("--set", action="append", default=[], help="applied to every variant (repeatable)")
    p.add_argument("--out", default=f"runs/speedrun_sweep/{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    variants = dict(VARIANTS)
    for v in args.variant:
        name, _, sets = v.partition("=")
        variants[name] = [s for s in sets.split(";") if s]
    names = [n for n in args.only.split(",") if n] + [
        v.partition("=")[0] for v in args.variant if v.partition("=")[0] not in args.only.split(",")
    ]
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(variants)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'variant':<12}{'epochs':>7}{'acc':>8}{'acc TTA':>9}{'train s':>9}{'epoch 1':>9}{'wall s':>8}  overrides")
    for name in names:
        r = one(name, variants[name], args)
        rows.append(r)
        tta = f"{r['accuracy_tta']:.4f}" if r["accuracy_tta"] is not None else "-"
        print(
            f"{name:<12}{r['epochs']:>7}{r['accuracy']:>8.4f}{tta:>9}{r['train_s_after_first']:>9.1f}"
            f"{r['first_epoch_s']:>9.1f}{r['wall_s']:>8.1f}  {' '.join(r['sets']) or '-'}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

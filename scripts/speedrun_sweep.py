"""Variants of the CIFAR-10 speedrun, one after another on the same machine, in one table.

    python scripts/speedrun_sweep.py                       # the shipped config and the tricks, 10 epochs
    python scripts/speedrun_sweep.py --epochs 24 --only shipped,all
    python scripts/speedrun_sweep.py --variant 'wd2e-3=train.wd=2.0e-3' --only shipped
    python scripts/speedrun_sweep.py --group augment --seeds 0,1   # MixUp, CutMix, TrivialAugment, all
    python scripts/speedrun_sweep.py --group models --config configs/cifar10_timm_resnet18d.yaml  # timm vs torchvision
    python scripts/speedrun_sweep.py --group augment --seeds 0,1 --jobs 2   # two 1-thread runs at once (a 2-core CPU)

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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.run.rundir import read_table  # noqa: E402
from trainer.run.runtime import cpu_budget  # noqa: E402

# the tricks of the DAWNBench ResNet-9 line (Page, "How to train your ResNet"), one at a time, then together
VARIANTS = {
    "shipped": [],
    "nesterov": ["train.nesterov=true"],
    "cutout8": ["transforms.cutout=8"],
    "ema": ["train.ema=0.99"],
    "all": ["train.nesterov=true", "transforms.cutout=8", "train.ema=0.99"],
}
# the augmentations of a 2020s recipe, on top of the config's pad+crop+flip: MixUp at the alpha of its
# ImageNet runs (0.2), CutMix at its paper's 1.0 (with both, half the batches each), TrivialAugment
MIXES = ["transforms.mixup=0.2", "transforms.cutmix=1.0"]
GROUPS = {
    "tricks": VARIANTS,
    "augment": {
        "baseline": [],
        "mixup": MIXES[:1],
        "cutmix": MIXES[1:],
        "trivialaugment": ["transforms.auto=trivialaugment"],
        "all": [*MIXES, "transforms.auto=trivialaugment"],
    },
    # from random weights, the same recipe: the config's own model, torchvision's and timm's ResNet-18
    "models": {
        "config-model": [],
        "tv-resnet18": ["model.arch=resnet18", "model.layers=null"],
        "timm-resnet18d": ["model.arch=timm/resnet18d", "model.layers=null"],
    },
}


def run(cmd: list[str], log: Path, threads: int | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with log.open("a") as f:
        res = subprocess.run([sys.executable, "-m", "trainer", *cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise SystemExit(f"`trainer {' '.join(cmd)}` failed (exit {res.returncode}); see {log}")


def one(name: str, sets: list[str], args, seed: int | None = None) -> dict:
    folder = name if seed is None else f"{name}-seed{seed}"
    out = Path(args.out) / folder
    if out.exists():
        raise SystemExit(f"{out}: exists already (pick another --out)")
    overrides = [*args.set, *sets]  # what the table shows; the epochs, name and seed are columns or fixed
    seeded = [] if seed is None else [f"seed={seed}"]
    sets = [f"train.stages.0.epochs={args.epochs}", f"name=speedrun_{name}", *seeded, *overrides]
    log = Path(args.out) / f"{folder}.log"
    start = time.perf_counter()
    run(["fit", args.config, *[a for s in sets for a in ("--set", s)], "--out", str(out)], log, args.threads)
    wall = time.perf_counter() - start
    run(["evaluate", str(out), "--tta"], log, args.threads)
    report = json.loads((out / "evaluation.json").read_text())
    seconds = [float(r["seconds"]) for r in read_table(out / "metrics.csv")]
    return {
        "variant": name,
        "seed": seed,
        "sets": overrides,
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
    p.add_argument("--group", choices=list(GROUPS), default="tricks", help="the built-in variants to pick from")
    p.add_argument("--only", help="variants to run, comma-separated, in order (default: the group's all)")
    p.add_argument("--seeds", help="run each variant once per seed, e.g. 0,1 (default: the config's seed)")
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
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, the CPU threads shared out (on 2 cores two 1-thread runs did 1.32x the work of one "
        "2-thread run: small convolutions scale badly across threads); seconds columns then measure a shared machine",
    )
    args = p.parse_args()
    if args.jobs < 1:
        p.error("--jobs: at least 1")
    args.threads = max(1, cpu_budget() // args.jobs) if args.jobs > 1 else None
    variants = dict(GROUPS[args.group])
    args.only = args.only if args.only is not None else ",".join(variants)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [None]
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
    print(
        f"{'variant':<16}{'seed':>5}{'epochs':>7}{'acc':>8}{'acc TTA':>9}{'train s':>9}{'epoch 1':>9}{'wall s':>8}"
        "  overrides"
    )
    todo = [(name, seed) for name in names for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own process; threads only wait on them
        runs = [pool.submit(one, name, variants[name], args, seed) for name, seed in todo]
        for r in (f.result() for f in as_completed(runs)):  # as each ends: a killed sweep keeps it in --json
            rows.append(r)
            tta = f"{r['accuracy_tta']:.4f}" if r["accuracy_tta"] is not None else "-"
            seed = r["seed"]
            print(
                f"{r['variant']:<16}{'-' if seed is None else seed:>5}{r['epochs']:>7}{r['accuracy']:>8.4f}{tta:>9}"
                f"{r['train_s_after_first']:>9.1f}{r['first_epoch_s']:>9.1f}{r['wall_s']:>8.1f}"
                f"  {' '.join(r['sets']) or '-'}",
                flush=True,
            )
            if args.json:  # after every run: a long sweep killed late keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=1))
    if len(seeds) > 1:
        print_spread(rows, names)


def print_spread(rows: list[dict], names: list[str]) -> None:
    """A variant over its seeds: the mean accuracy and the spread (the largest minus the smallest)."""
    print(f"\n{'variant':<16}{'seeds':>6}{'mean acc':>10}{'spread':>8}{'mean TTA':>10}")
    for name in names:
        accs = [r["accuracy"] for r in rows if r["variant"] == name]
        ttas = [r["accuracy_tta"] for r in rows if r["variant"] == name and r["accuracy_tta"] is not None]
        tta = f"{sum(ttas) / len(ttas):.4f}" if ttas else "-"
        print(f"{name:<16}{len(accs):>6}{sum(accs) / len(accs):>10.4f}{max(accs) - min(accs):>8.4f}{tta:>10}")


if __name__ == "__main__":
    main()

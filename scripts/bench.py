"""CIFAR-10 epoch time, side by side: the compute floor, trainer, a raw PyTorch loop, fastai.

    python scripts/bench.py                          # 1 epoch on all 50,000 images (the real number)
    python scripts/bench.py --limit 5000 --only floor,trainer   # a quick check on a slice

Every contender trains the same net (the course's BN ResNet [10, 20, 40, 80, 160] with
nn.BatchNorm2d: arch bnresnet2d) with AdamW, 1cycle and the same batch size, on the same files,
each in its own subprocess so that peak memory is its own:

  floor    the train step alone on normalised float tensors already in memory (no augmentation)
  trainer  `trainer fit` on the image folders (decoded-uint8 cache, batch pad+crop+flip)
  raw      torchvision ImageFolder, per-image PIL RandomCrop(pad 4)+flip, DataLoader(2 workers)
  fastai   fastai's DataBlock with the same augmentation (skipped when fastai is not installed)

`trainer_compile` (opt-in: --only ...,trainer_compile) is trainer with compile: true.
`trainer-trivialaugment` and `trainer-mixup` (opt-in) are trainer with pad+crop+flip and also
`auto: trivialaugment`, or `mixup: 0.8, cutmix: 1.0` (timm's recipe: half the batches each way).
`bnresnet` (opt-in: --only trainer,bnresnet) is trainer on arch bnresnet, the same net with the
course's BnLayer in place of nn.BatchNorm2d, whatever --arch says: the two norms side by side.

Columns: training seconds per epoch (validation excluded; with --epochs 2 or more, the mean
after the first), the first epoch's seconds, images/s, peak resident memory of
the process (in brackets, when larger: the sampled peak of the process and its DataLoader
workers together), accuracy on the test folder after the last epoch, and
seconds per epoch over the floor's. The one-time JPEG decode of the cache is done first and
reported on its own line. Numbers, never assertions: the tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_contenders import load, run_fastai, run_floor, run_raw, run_trainer  # noqa: E402

CONTENDERS = [
    "floor",
    "trainer",
    "raw",
    "fastai",
    "trainer_compile",
    "bnresnet",
    "trainer-trivialaugment",
    "trainer-mixup",
]
TRANSFORMS = {"trainer-trivialaugment": {"auto": "trivialaugment"}, "trainer-mixup": {"mixup": 0.8, "cutmix": 1.0}}
DEFAULT = "floor,trainer,raw,fastai"
MARK = "BENCH_RESULT "


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started (VmHWM). Not ru_maxrss: Linux carries
    the forking parent's peak over an exec, so every child would report at least the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants now (DataLoader workers included;
    pages they share are counted once per process, so this overstates a little)."""
    parent, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(d.name)], rss[int(d.name)] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(rss.get(p, 0) for p in tree) / 2**20


def worker(name: str, args) -> None:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "trainer_compile":
        name, args.compile = "trainer", True
    if name == "bnresnet":
        name, args.arch = "trainer", "bnresnet"
    if name in TRANSFORMS:
        name = with_transforms(TRANSFORMS[name])
    out = {"floor": run_floor, "trainer": run_trainer, "raw": run_raw, "fastai": run_fastai}[name](args)
    out["rss_mib"] = peak_rss_mib()
    out["threads"] = torch.get_num_threads()
    print(MARK + json.dumps(out), flush=True)


def with_transforms(extra: dict) -> str:
    """The trainer contender with these transforms added to its pad_crop: the config run_trainer
    builds is amended (validated again) on its way into fit, in this worker process only."""
    from trainer.run import fit as spine

    plain = spine.fit

    def fit(cfg, *args, **kwargs):
        transforms = cfg.transforms.model_validate({**cfg.transforms.model_dump(), **extra})
        return plain(cfg.model_copy(update={"transforms": transforms}), *args, **kwargs)

    spine.fit = fit
    return "trainer"


# ---- the parent: warm the cache, run each contender, print the table -----------------------


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/cifar10", help="folders train/<class>/ and test/<class>/")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="train on a seeded slice of N images (quick check)")
    ap.add_argument("--only", default=DEFAULT, help="comma-separated, of: " + ",".join(CONTENDERS))
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--arch", default="bnresnet2d")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", help="trainer's amp setting")
    ap.add_argument("--compile", action="store_true", help="trainer with compile: true")
    ap.add_argument("--channels-last", action="store_true", help="trainer with channels_last: true")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of raw and fastai")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child_args(args) -> list[str]:
    out = [
        "--data",
        args.data,
        "--epochs",
        str(args.epochs),
        "--bs",
        str(args.bs),
        "--lr",
        str(args.lr),
        "--wd",
        str(args.wd),
        "--arch",
        args.arch,
        "--device",
        args.device,
        "--amp",
        args.amp,
        "--workers",
        str(args.workers),
        "--seed",
        str(args.seed),
    ]
    out += ["--limit", str(args.limit)] if args.limit else []
    out += ["--compile"] if args.compile else []
    return out + (["--channels-last"] if args.channels_last else [])


def run_child(name: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *child_args(args)]
    t, peak = time.perf_counter(), 0.0
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen(cmd, env=env, stdout=so, stderr=se, text=True)
        while proc.poll() is None:  # sample the process tree: the workers' memory counts too
            if sys.platform.startswith("linux"):
                peak = max(peak, tree_rss_mib(proc.pid))
            time.sleep(0.25)
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    out = json.loads(lines[-1][len(MARK) :])
    out["wall"], out["tree_rss_mib"] = time.perf_counter() - t, peak
    return out


def import_rss_mib() -> float:
    code = "import torch; print([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1])"
    try:
        return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout) / 1024
    except ValueError:
        return float("nan")


def fastai_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("fastai") is None


def steady(seconds: list[float]) -> float:
    """Seconds per epoch: the mean after the first epoch when there are several (the first pays
    for warm-up, and for compilation with compile: true), else the one epoch."""
    rest = seconds[1:] or seconds
    return sum(rest) / len(rest)


def table(results: dict, floor: float | None) -> str:
    head = f"{'':<24}{'s/epoch':>9}{'1st epoch':>10}{'images/s':>10}{'peak RSS MiB':>20}{'accuracy':>10}{'x floor':>9}"
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        if "skipped" in r or "error" in r:
            rows.append(f"{name:<24}{r.get('skipped') or r.get('error')}")
            continue
        sec = steady(r["seconds"])
        rss = f"{r['rss_mib']:.0f}" + (f" ({r['tree_rss_mib']:.0f})" if r["tree_rss_mib"] > r["rss_mib"] * 1.05 else "")
        ratio = f"{sec / floor:.2f}" if floor else "-"
        acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "-"
        rows.append(
            f"{name:<24}{sec:>9.1f}{r['seconds'][0]:>10.1f}{r['images'] / sec:>10.0f}{rss:>20}{acc:>10}{ratio:>9}"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return worker(args.worker, args)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in CONTENDERS]
    if bad:
        sys.exit(f"--only: unknown {', '.join(bad)} (choose from {', '.join(CONTENDERS)})")
    t = time.perf_counter()
    images, _ = load(args)  # the one-time decode, outside every timing
    n_train, n_valid = len(images.train_y), len(images.valid_y)
    del images
    print(
        f"{n_train} train / {n_valid} test images, bs {args.bs}, {args.epochs} epoch(s), {args.arch}; "
        f"cache ready in {time.perf_counter() - t:.1f} s (JPEG decode, first time only)",
        flush=True,
    )
    results = {}
    for name in names:
        if name == "fastai" and fastai_missing():
            results[name] = {"skipped": "skipped: fastai is not installed (pip install fastai to compare)"}
            continue
        print(f"running {name} ...", flush=True)
        results[name] = run_child(name, args)
    floor = results.get("floor", {}).get("seconds")
    print(table(results, steady(floor) if floor else None))
    for name, r in results.items():
        if r.get("note"):
            print(f"{name}: {r['note']}")
    print(f"(python + import torch alone: {import_rss_mib():.0f} MiB resident)")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (others' work inflates every row)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""One CPU train step, four ways: fp32 or bf16 autocast, contiguous (NCHW) or channels_last.

    python scripts/bench_cpu_step.py                 # bnresnet2d, bs 256, 32px
    python scripts/bench_cpu_step.py --arch resnet9 --bs 64 --steps 3

Prints the best wall-clock milliseconds per step (forward, backward, AdamW) over interleaved
rounds, with the CPU time of that step (less disturbed by other processes). Why amp: auto is
fp32 on the CPU and channels_last defaults to off: on CPUs without AMX, bf16 autocast converts
every activation and runs slower kernels, and channels_last only pays for wide convolutions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.config.schema import ModelConfig  # noqa: E402
from trainer.models import create_model  # noqa: E402
from trainer.train.optim import create_optimizer  # noqa: E402


def make_step(arch: str, bs: int, size: int, bf16: bool, channels_last: bool):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch), 10, 3, size).model
    x, y = torch.randn(bs, 3, size, size), torch.randint(0, 10, (bs,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = create_optimizer("adamw", [{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 0.01}])

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="bnresnet2d")
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"{args.arch}, bs {args.bs}, {args.size}px, {torch.get_num_threads()} threads, CPU capability {cap}")
    ways = {
        (bf16, cl): make_step(args.arch, args.bs, args.size, bf16, cl) for bf16 in (False, True) for cl in (False, True)
    }
    for step in ways.values():
        for _ in range(args.warmup):
            step()
    best = {k: (float("inf"), float("inf")) for k in ways}
    for _ in range(args.steps):  # interleaved rounds, best of each: robust to a busy machine
        for k, step in ways.items():
            t, c = time.perf_counter(), time.process_time()
            step()
            wall, cpu = (time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    base = best[(False, False)][0]
    for (bf16, cl), (wall, cpu) in best.items():
        print(
            f"  {'bf16' if bf16 else 'fp32'} {'channels_last' if cl else 'contiguous':<14}"
            f"{wall:8.0f} ms/step (CPU time {cpu:6.0f} ms)  x{wall / base:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

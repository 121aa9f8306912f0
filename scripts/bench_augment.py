"""What automatic augmentation and MixUp/CutMix cost per training step, and the libraries compared.

    python scripts/bench_augment.py                  # the step, 5 ways, interleaved (CIFAR size)
    python scripts/bench_augment.py --libraries      # ours vs torchvision v2 vs kornia, 32 and 224 px

Step: one bnresnet2d step at bs 256 on 32 px images (forward, backward, AdamW) with its batch made
as `trainer fit` makes it (index the uint8 images, float, pad+crop+flip, normalise), then the extra:
auto: trivialaugment, auto: randaugment, mixup + cutmix. Interleaved rounds, best of each (wall
and CPU time): robust to a busy machine. Libraries: ms per 256-image batch, best of --repeat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.config.schema import ModelConfig  # noqa: E402
from trainer.data.augment import preset  # noqa: E402
from trainer.data.auto_augment import auto_augment  # noqa: E402
from trainer.data.loaders import ImageBatches, epoch_generator  # noqa: E402
from trainer.models import create_model  # noqa: E402
from trainer.train.mixing import MixSpec, draw, mix, mix_generator  # noqa: E402
from trainer.train.optim import create_optimizer  # noqa: E402
from trainer.train.tasks import soft_targets  # noqa: E402

MEAN = torch.tensor([0.49, 0.48, 0.45])


def make_step(bs: int, images: torch.Tensor, labels: torch.Tensor, auto: str = "none", mixing: MixSpec | None = None):
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="bnresnet2d", layers=[10, 20, 40, 80, 160]), 10, 3, 32).model
    opt = create_optimizer("adamw", [{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 0.01}])
    spec = preset("pad_crop", size=32, auto=auto)
    dl = ImageBatches(images, labels, bs, 32, MEAN, torch.full((3,), 0.25), True, spec, 0)
    order, n = dl.order(), len(dl)
    count = [0]

    def batch():
        i = count[0] % n
        count[0] += 1
        x, y = dl.batch(order[i * bs : (i + 1) * bs], epoch_generator(0, 0, salt=i + 1))
        if mixing is not None:
            d = draw(mixing, len(x), 32, 32, mix_generator(0, 0, i))
            x, y = mix(x, soft_targets("single_label", y, 10), d)
        return x, y

    def step():
        x, y = batch()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch, step


def steps(args) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.bs * 8, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.bs * 8,), generator=g)
    ways = {
        "pad_crop (trainer)": make_step(args.bs, images, labels),
        "+ auto: trivialaugment": make_step(args.bs, images, labels, auto="trivialaugment"),
        "+ auto: randaugment": make_step(args.bs, images, labels, auto="randaugment"),
        "+ mixup 0.8, cutmix 1.0": make_step(args.bs, images, labels, mixing=MixSpec(0.8, 1.0)),
    }
    print(
        f"bnresnet2d, bs {args.bs}, 32px, {torch.get_num_threads()} threads; best of {args.rounds} interleaved rounds"
    )
    for _, step in ways.values():
        step()
    best = {k: [float("inf")] * 3 for k in ways}
    for _ in range(args.rounds):
        for k, (batch, step) in ways.items():
            t = time.perf_counter()
            batch()
            data = time.perf_counter() - t
            t, c = time.perf_counter(), time.process_time()
            step()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            best[k] = [min(a, b * 1000) for a, b in zip(best[k], (data, wall, cpu), strict=True)]
    base = best["pad_crop (trainer)"][1]
    for k, (data, wall, cpu) in best.items():
        print(f"  {k:<26} batch {data:6.1f} ms   step {wall:6.0f} ms (CPU time {cpu:6.0f} ms)  x{wall / base:.2f}")


def libraries(args) -> None:
    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment, TrivialAugment
    from torchvision.transforms import v2

    def best(fn):
        fn(0)
        ts = []
        for i in range(args.repeat):
            t = time.perf_counter()
            fn(i + 1)
            ts.append(time.perf_counter() - t)
        return min(ts) * 1000

    print(f"{torch.get_num_threads()} threads, {args.bs} images a batch, ms, best of {args.repeat}")
    print("  tv-loop: torchvision v2 per image (uint8); tv-batch: on the whole batch, ONE op for all;")
    print("  kornia: ops chosen once per batch")
    for size in (32, 224):
        u8 = torch.randint(0, 256, (args.bs, 3, size, size), dtype=torch.uint8)
        x = u8.float() / 255
        for policy, tv, ko in (
            ("trivialaugment", v2.TrivialAugmentWide(), TrivialAugment()),
            ("randaugment", v2.RandAugment(2, 9), RandAugment(n=2, m=9)),
        ):
            ka = K.AugmentationSequential(ko)
            rows = {
                "ours": lambda i: auto_augment(x, policy, 9, 2, torch.Generator().manual_seed(i), MEAN),  # noqa: B023
                "tv-loop": lambda i: torch.stack([tv(img) for img in u8]),  # noqa: B023
                "tv-batch": lambda i: tv(u8),  # noqa: B023
                "kornia": lambda i: ka(x),  # noqa: B023
            }
            cells = "".join(f"{k} {best(f):8.1f}   " for k, f in rows.items())
            print(f"  {size:>3} px {policy:<15}{cells}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bs", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--libraries", action="store_true", help="compare ours, torchvision v2 and kornia instead")
    args = ap.parse_args()
    libraries(args) if args.libraries else steps(args)


if __name__ == "__main__":
    main()

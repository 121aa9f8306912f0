"""The contenders of scripts/bench.py, one function each; each runs in its own process and
returns {"seconds": [per epoch], "images": per epoch, "accuracy": after the last epoch}."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def data_config(args):
    from trainer.config.data_schema import FolderData, Subset

    subset = Subset(train=args.limit, valid=valid_limit(args.limit)) if args.limit else None
    return FolderData(layout="folder", path=args.data, valid="test", bs=args.bs, subset=subset)


def valid_limit(limit: int | None) -> int | None:
    return None if not limit else min(10_000, max(1_000, limit // 5))


def load(args):
    """The decoded images of the benchmark's files (from the cache) and their channel stats."""
    from trainer.data.images import channel_stats, load_images

    images = load_images(data_config(args), args.seed, [32], log=lambda m: print(m, file=sys.stderr))
    return images, channel_stats(images.train_x)


def build(args, n_out: int):
    import torch

    from trainer.config.schema import ModelConfig
    from trainer.models import create_model
    from trainer.train.optim import create_optimizer, param_groups

    torch.manual_seed(args.seed)
    built = create_model(ModelConfig(arch=args.arch, layers=[10, 20, 40, 80, 160]), n_out, 3, 32)
    # trainer's optimizer (AdamW, foreach, no decay on norms and biases): the same step everywhere
    groups = param_groups(built.groups, [args.lr] * len(built.groups), [args.wd] * len(built.groups))
    return built.model, create_optimizer("adamw", groups, betas=(0.9, 0.99), eps=1e-5)


def one_cycle(opt, args, steps: int):
    import torch

    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        args.lr,
        total_steps=steps,
        pct_start=0.25,
        div_factor=25,
        final_div_factor=1e4,
        base_momentum=0.85,
        max_momentum=0.95,
    )


def accuracy(model, batches, device) -> float:
    import torch

    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in batches:
            right += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
            total += len(y)
    return right / max(1, total)


# ---- the contenders (each runs in its own process) ----------------------------------------


def run_floor(args) -> dict:
    import torch

    images, (mean, std) = load(args)
    device = torch.device(args.device)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = ((images.train_x.float() / 255 - m) / s).to(device)  # the whole set, ready to go
    y = images.train_y.to(device)
    vx, vy = ((images.valid_x.float() / 255 - m) / s), images.valid_y
    model, opt = build(args, len(images.classes))
    model.to(device)
    n_batches = len(x) // args.bs
    sched, loss_fn = one_cycle(opt, args, args.epochs * n_batches), torch.nn.CrossEntropyLoss()
    times = []
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.train()
        t = time.perf_counter()
        order = torch.randperm(len(x), generator=g).to(device)
        for i in range(n_batches):
            idx = order[i * args.bs : (i + 1) * args.bs]
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        sync(device)
        times.append(time.perf_counter() - t)
    acc = accuracy(model, zip(vx.split(args.bs * 2), vy.split(args.bs * 2), strict=True), device)
    return {"seconds": times, "images": n_batches * args.bs, "accuracy": acc}


def run_trainer(args) -> dict:
    from trainer.config.schema import Config
    from trainer.run import fit as spine
    from trainer.train.loop import Callback

    class EpochTimer(Callback):
        """Training time of each epoch (before_epoch to before_validate)."""

        order = -100

        def __init__(self):
            self.times, self.n = [], 0

        def before_epoch(self, learn):
            self.t = time.perf_counter()

        def before_validate(self, learn):
            sync(learn.device)
            self.times.append(time.perf_counter() - self.t)
            self.n = len(learn.train_dl) * learn.train_dl.bs

    data = data_config(args).model_dump(exclude_none=True)
    cfg = Config.model_validate(
        {
            "name": "bench",
            "seed": args.seed,
            "device": args.device,
            "amp": args.amp,
            "compile": args.compile,
            "channels_last": args.channels_last,
            "data": data,
            "model": {"arch": args.arch, "layers": [10, 20, 40, 80, 160]},
            "transforms": {"preset": "pad_crop"},
            "train": {"wd": args.wd, "stages": [{"name": "all", "epochs": args.epochs, "lr": args.lr}]},
        }
    )
    timer = EpochTimer()
    result = spine.fit(cfg, out=tempfile.mkdtemp(prefix="bench-trainer-"), callbacks=[timer])
    return {"seconds": timer.times, "images": timer.n, "accuracy": result.final.get("accuracy")}


def run_raw(args) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    images, (mean, std) = load(args)  # only for the file list (same slice) and the stats
    device = torch.device(args.device)
    norm = T.Normalize(mean, std)
    train_tf = T.Compose(
        [T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(), T.ToTensor(), norm]
    )
    root = Path(args.data)
    train_ds = same_files(datasets.ImageFolder(root / "train", train_tf), images.items.train_files)
    valid_ds = same_files(datasets.ImageFolder(root / "test", T.Compose([T.ToTensor(), norm])), images.valid_files)
    pin = device.type == "cuda"
    train_dl = DataLoader(
        train_ds,
        args.bs,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(args.seed),
    )
    valid_dl = DataLoader(valid_ds, args.bs * 2, num_workers=args.workers, pin_memory=pin)
    model, opt = build(args, len(images.classes))
    model.to(device)
    del images
    sched, loss_fn = one_cycle(opt, args, args.epochs * len(train_dl)), torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(args.epochs):
        model.train()
        t = time.perf_counter()
        for x, y in train_dl:
            x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        sync(device)
        times.append(time.perf_counter() - t)
    acc = accuracy(model, valid_dl, device)
    return {"seconds": times, "images": len(train_dl) * args.bs, "accuracy": acc}


def same_files(ds, files):
    """The ImageFolder restricted to the benchmark's files (all of them without --limit)."""
    from torch.utils.data import Subset

    index = {str(Path(p).resolve()): i for i, (p, _) in enumerate(ds.samples)}
    return Subset(ds, [index[str(Path(f).resolve())] for f in files])


def run_fastai(args) -> dict:
    """fastai 2.8 (pip install fastai; run here with 2.8.12 on torch 2.14.1): its own DataBlock
    pipeline, per-image PIL crop-pad and random crop, batch flips, fit_one_cycle."""
    import torch
    from fastai.vision.all import (
        CategoryBlock,
        CropPad,
        DataBlock,
        Flip,
        ImageBlock,
        Normalize,
        RandomCrop,
        parent_label,
    )
    from fastai.vision.all import Learner as FastLearner

    images, (mean, std) = load(args)
    valid = {str(f) for f in images.valid_files}
    files = [*images.items.train_files, *images.valid_files]
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=lambda _: files,
        get_y=parent_label,
        splitter=lambda items: (
            [i for i, f in enumerate(items) if str(f) not in valid],
            [i for i, f in enumerate(items) if str(f) in valid],
        ),
        item_tfms=[CropPad(40, pad_mode="reflection"), RandomCrop(32)],
        batch_tfms=[Flip(), Normalize.from_stats(mean, std)],
    )
    dls = block.dataloaders(args.data, bs=args.bs, num_workers=args.workers, device=torch.device(args.device))
    model, _ = build(args, len(images.classes))
    learn = FastLearner(dls, model, loss_func=torch.nn.CrossEntropyLoss(), metrics=[])
    t = time.perf_counter()
    learn.fit_one_cycle(args.epochs, args.lr, wd=args.wd)
    total = time.perf_counter() - t
    t = time.perf_counter()
    learn.validate()  # fit validates after every epoch: time one pass and take it out, as for the others
    valid = time.perf_counter() - t
    times = [(total - args.epochs * valid) / args.epochs] * args.epochs
    acc = accuracy(learn.model, dls.valid, torch.device(args.device))
    return {
        "seconds": times,
        "images": len(dls.train) * args.bs,
        "accuracy": acc,
        "note": f"validation ({valid:.1f} s a pass, timed after fit) taken out; epochs averaged",
    }


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()

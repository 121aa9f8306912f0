"""Pictures of images: grids with titles (show-batch, top losses, Grad-CAM overlays) and the
confusion matrix. matplotlib's object API with the Agg canvas: no window, no global backend."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainer.storage import PNG_MARK, writable_picture, write_output


def to_display(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (N, C, H, W) -> (N, H, W, C) pixels in [0, 1] (C is 1 or 3)."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.detach().float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _save(fig: Figure, path: Path) -> Path:
    """A PNG, written whole or not at all (the format is PNG whatever the file's name says)."""
    path = Path(path)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": PNG_MARK})  # marked: ours to replace later
    write_output(path, lambda f: f.write(buf.getvalue()))
    return path


def image_grid(
    images: np.ndarray,
    titles: list[str],
    path: Path,
    overlays: np.ndarray | None = None,
    ncols: int | None = None,
    suptitle: str | None = None,
) -> Path:
    """images: (N, H, W, C) in [0, 1]; overlays: (N, H, W) in [0, 1], drawn as a heat map."""
    n = len(images)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(2.6 * ncols, 2.8 * nrows))
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        ax.imshow(
            img[..., 0] if img.shape[-1] == 1 else img,
            cmap="gray" if img.shape[-1] == 1 else None,
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        if overlays is not None:
            ax.imshow(overlays[i], cmap="magma", alpha=0.55, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def confusion_plot(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    """Rows: actual class; columns: predicted class; counts written in every cell."""
    n = len(classes)
    side = max(4.0, 0.55 * n + 2)
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion matrix")
    top = cm.max() if cm.size else 0
    if n <= 40:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if cm[i, j] > top / 2 else "black",
                )
    fig.tight_layout()
    return _save(fig, path)


def label_text(y: torch.Tensor, classes: list[str], most: int | None = None) -> str:
    """A class name, or the space-separated tags of a multi-hot row (at most `most`, then +N)."""
    if y.dim() == 0:
        return classes[int(y)]
    tags = [classes[i] for i in torch.nonzero(y > 0.5).flatten().tolist()]
    if most is not None and len(tags) > most:
        tags = [*tags[:most], f"+{len(tags) - most}"]
    return " ".join(tags) or "-"


def show_batch(cfg, path: Path, n: int = 16, log=print) -> Path:
    """A grid of the first n augmented training images of epoch 0, as the first stage sees them,
    into a PNG (a path without a suffix gets .png; see writable_picture for what is refused)."""
    from trainer.data.bundle import build_bundle
    from trainer.models import input_stats
    from trainer.train.plan import outline

    if cfg.data.layout == "text":
        raise ValueError("show-batch shows images; this config trains a language model")
    path = writable_picture(path)
    stages = outline(cfg)
    bundle = build_bundle(
        cfg, cfg.seed or 0, torch.device("cpu"), stages.image_sizes, log=log, model_stats=input_stats(cfg.model)
    )
    train_dl, _ = bundle.loaders(n, stages.sizes[0])
    _, x, y = next(train_dl.iterate())
    titles = [label_text(t, bundle.images.classes) for t in y]
    preset = cfg.transforms.preset
    return image_grid(
        to_display(x, bundle.mean, bundle.std),
        titles,
        path,
        suptitle=f"{cfg.name}: transforms {preset}, {train_dl.size}px",
    )

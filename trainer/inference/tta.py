"""Test-time augmentation: predict n augmented views of each image, average them, and blend the
average with the plain prediction (fastai's TTA: beta * plain + (1 - beta) * mean of views).

Views are deterministic, so TTA gives the same numbers every time. Small images (auto mode, up to
SMALL px) get fixed flips (the 8 symmetries for top_down data) and, with pad_crop, fixed shifts:
random rotations and zooms destroy too much of a 32 px image. Larger images get seeded random
views from the training augmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from trainer.data.augment import AugmentSpec, dihedral_theta, fixed_view, resize, shift_theta
from trainer.data.loaders import ImageBatches, epoch_generator
from trainer.train.loop import outputs

SMALL = 64


@dataclass(frozen=True)
class View:
    """A fixed map (pixels in [0, 1], size) -> pixels, or the training augmentation, seeded."""

    name: str
    fn: Callable | None = None
    spec: AugmentSpec | None = None
    seed: int = 0


def identity_view(x: torch.Tensor, size: int) -> torch.Tensor:
    return resize(x, size)


def fixed(theta: torch.Tensor):
    return lambda x, size: fixed_view(x, theta, size)


def flip_views(spec: AugmentSpec, n: int, size: int) -> list[View]:
    """Deterministic views: the symmetries the training augmentation allows, then (pad_crop)
    shifts by half the padding to the four corners, alternately flipped."""
    if spec.dihedral:
        return [View(f"dihedral{k}", fixed(dihedral_theta(k))) for k in range(1, 8)][:n]
    views = [View("flip", fixed(shift_theta(0, 0, size, flip=True)))] if spec.flip else []
    if spec.pad:
        d = max(1, spec.pad // 2)  # spec.pad is in pixels of the output size
        for i, (dx, dy) in enumerate([(d, d), (-d, d), (-d, -d), (d, -d)]):
            flip = spec.flip and i % 2 == 1
            views.append(
                View(f"shift{dx:+d}{dy:+d}" + ("-flip" if flip else ""), fixed(shift_theta(dx, dy, size, flip)))
            )
    return views[:n]


def tta_views(spec: AugmentSpec | None, n: int, size: int, mode: str = "auto", seed: int = 0) -> list[View]:
    if spec is None or n == 0:
        return []
    if mode == "flips" or (mode == "auto" and size <= SMALL):
        return flip_views(spec, n, size)
    # blanking or distorting helps training, never a prediction
    spec = replace(spec, cutout=0, erasing=0.0, auto="none")
    if spec.is_identity:
        return []
    return [View(f"random{k}", spec=spec, seed=seed + k) for k in range(n)]


def view_batches(dl: ImageBatches, view: View | None = None):
    """The batches of dl, in order, under one view (None: the plain view)."""
    order = dl.with_(shuffle=False).order()
    for i in range(len(dl)):
        rows = order[i * dl.bs : (i + 1) * dl.bs]
        if view is None:
            yield dl.batch(rows)
        elif view.fn is not None:
            yield dl.batch(rows, view=view.fn)
        else:
            yield dl.batch(rows, epoch_generator(view.seed, 0, salt=i + 1), view.spec)


def predict_view(model, dl: ImageBatches, activation, view: View | None = None, precision=None) -> torch.Tensor:
    """Probabilities for every item of dl, in order, under one view (None: the plain view)."""
    return outputs(model, view_batches(dl, view), precision, activation)[0]


def blend(plain: torch.Tensor, views: list[torch.Tensor], beta: float) -> torch.Tensor:
    """beta * plain + (1 - beta) * mean(views); with no views, the plain prediction."""
    if not views:
        return plain
    return beta * plain + (1 - beta) * torch.stack(views).mean(0)


def tta_predict(
    model, dl: ImageBatches, activation, views: list[View], beta: float = 0.25, precision=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TTA probabilities, plain probabilities)."""
    run = partial(predict_view, model, dl, activation, precision=precision)
    plain = run()
    return blend(plain, [run(view=v) for v in views], beta), plain

"""Augmentation on whole batches: one random affine matrix per image, one grid_sample per batch.

Flips, the 8 dihedral symmetries, rotation, zoom and pad+crop are all affine maps, so a batch is
augmented by composing matrices and sampling once (on the GPU when the batch is there), with no
per-image Python. With align_corners=False, identity, flips and integer shifts sample exact pixel
centres, so those views reproduce the input exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data.auto_augment import auto_augment


@dataclass(frozen=True)
class AugmentSpec:
    flip: bool = False  # horizontal flips (side-on photos)
    dihedral: bool = False  # all 8 flips/rotations by 90 degrees (top-down images)
    max_rotate: float = 0.0  # degrees
    max_zoom: float = 1.0
    pad: int = 0  # pixels of reflection padding for random crops (CIFAR)
    max_lighting: float = 0.0
    p_flip: float = 0.5
    p_affine: float = 0.75
    p_lighting: float = 0.75
    cutout: int = 0  # side in pixels of one square blanked per image (DeVries & Taylor)
    auto: str = "none"  # randaugment | trivialaugment | autoaugment (trainer/data/auto_augment.py)
    magnitude: int = 9  # RandAugment's magnitude bin, 0..30
    ops: int = 2  # RandAugment's ops per image
    erasing: float = 0.0  # probability of one random rectangle erased per image (timm's --reprob)

    @property
    def has_geometry(self) -> bool:
        return bool(self.flip or self.dihedral or self.max_rotate or self.max_zoom > 1 or self.pad)

    @property
    def is_identity(self) -> bool:
        return not (
            self.flip
            or self.dihedral
            or self.max_rotate
            or self.max_zoom > 1
            or self.pad
            or self.max_lighting
            or self.cutout
            or self.auto != "none"
            or self.erasing
        )


def preset(
    name: str,
    max_zoom: float = 1.0,
    max_rotate: float = 10.0,
    max_lighting: float = 0.2,
    p_flip: float = 0.5,
    p_affine: float = 0.75,
    p_lighting: float = 0.75,
    pad: int | None = None,
    size: int = 32,
    cutout: int = 0,
    auto: str = "none",
    magnitude: int = 9,
    ops: int = 2,
    erasing: float = 0.0,
) -> AugmentSpec:
    common = dict(
        max_zoom=max_zoom,
        p_flip=p_flip,
        p_affine=p_affine,
        p_lighting=p_lighting,
        cutout=cutout,
        auto=auto,
        magnitude=magnitude,
        ops=ops,
        erasing=erasing,
    )
    if name == "side_on":
        return AugmentSpec(flip=True, max_rotate=max_rotate, max_lighting=max_lighting, **common)
    if name == "top_down":
        return AugmentSpec(dihedral=True, max_rotate=max_rotate, max_lighting=max_lighting, **common)
    if name == "pad_crop":
        return AugmentSpec(flip=True, pad=pad if pad is not None else max(1, size // 8), **common)
    return AugmentSpec(**{k: v for k, v in common.items() if k not in ("p_flip", "p_lighting")})


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _coin(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def random_affine(spec: AugmentSpec, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates in [-1, 1]; `size` is the output
    size, so pad_crop shifts are whole output pixels."""
    theta = torch.eye(3).repeat(n, 1, 1)
    if spec.dihedral:
        k = torch.randint(0, 8, (n,), generator=g)
        angle = (k % 4).float() * (math.pi / 2)
        rot = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], 1).view(n, 2, 2)
        theta[:, :2, :2] = rot.round()
        theta[k >= 4, :, 0] *= -1
    if spec.flip:
        theta[_coin(n, spec.p_flip, g), :, 0] *= -1
    affine = _coin(n, spec.p_affine, g)
    if spec.max_rotate:
        a = _uniform(n, -spec.max_rotate, spec.max_rotate, g) * math.pi / 180 * affine
        rot = torch.eye(3).repeat(n, 1, 1)
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        theta = rot @ theta
    if spec.max_zoom > 1:
        zoom = torch.where(affine, _uniform(n, 1.0, spec.max_zoom, g), torch.ones(n))
        room = 1 - 1 / zoom  # stay inside the image when zoomed in
        shift = torch.stack([_uniform(n, -1, 1, g) * room, _uniform(n, -1, 1, g) * room], 1)
        z = torch.eye(3).repeat(n, 1, 1)
        z[:, 0, 0], z[:, 1, 1], z[:, :2, 2] = 1 / zoom, 1 / zoom, shift
        theta = z @ theta
    if spec.pad:
        pix = torch.randint(-spec.pad, spec.pad + 1, (n, 2), generator=g).float()
        t = torch.eye(3).repeat(n, 1, 1)
        t[:, :2, 2] = pix * 2 / size
        theta = t @ theta
    return theta[:, :2, :]


def dihedral_theta(k: int, flip_first: bool = False) -> torch.Tensor:
    """The (2, 3) matrix of symmetry k of the square: k % 4 quarter turns, mirrored when k >= 4.
    Entries are exactly 0 and +-1, so sampling with it moves whole pixels."""
    a = (k % 4) * math.pi / 2
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]).round()
    if k >= 4:
        theta[:, 0] *= -1
    return theta


def shift_theta(dx: int, dy: int, size: int, flip: bool = False) -> torch.Tensor:
    """A (2, 3) matrix: optional horizontal flip, then a shift by whole pixels (of `size`)."""
    theta = torch.tensor([[-1.0 if flip else 1.0, 0.0, dx * 2 / size], [0.0, 1.0, dy * 2 / size]])
    return theta


def fixed_view(x: torch.Tensor, theta: torch.Tensor, out_size: int) -> torch.Tensor:
    """The same affine map on every image of the batch (a deterministic TTA view)."""
    if x.shape[-1] > 2 * out_size:
        x = resize(x, out_size)
    return apply_affine(x, theta.expand(x.shape[0], 2, 3), out_size)


def lighting(x: torch.Tensor, spec: AugmentSpec, g: torch.Generator) -> torch.Tensor:
    """Random brightness and contrast per image, on [0, 1] pixels."""
    n = x.shape[0]
    on = _coin(n, spec.p_lighting, g).float()
    b = _uniform(n, -spec.max_lighting, spec.max_lighting, g) * on
    c = 1 + _uniform(n, -spec.max_lighting, spec.max_lighting, g) * on
    shape = (n,) + (1,) * (x.dim() - 1)
    lit = ((x - 0.5) * c.view(shape).to(x) + 0.5 + b.view(shape).to(x)).clamp_(0, 1)
    return torch.where(on.view(shape).to(x.device) > 0, lit, x)  # untouched images stay exact


def apply_affine(x: torch.Tensor, theta: torch.Tensor, out_size: int) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x), [x.shape[0], x.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def cutout(x: torch.Tensor, side: int, g: torch.Generator, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """One side x side square per image set to `fill` (the data's mean colour, so it is zero after
    normalising, as in Cutout), placed uniformly with the whole square inside the image. The
    mask is built from coordinate comparisons for the whole batch at once."""
    n, _, h, w = x.shape
    side = min(side, h, w)
    top = torch.randint(0, h - side + 1, (n, 1), generator=g)
    left = torch.randint(0, w - side + 1, (n, 1), generator=g)
    return fill_boxes(x, top, left, torch.tensor(side), torch.tensor(side), fill)


def fill_boxes(x, top, left, height, width, fill) -> torch.Tensor:
    """Per image, the box [top, top + height) x [left, left + width) set to `fill` ((n, 1) or
    scalar bounds; an empty box leaves the image as it was)."""
    _, _, h, w = x.shape
    top, left, height, width = (torch.as_tensor(t).to(x.device) for t in (top, left, height, width))
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    inside_rows = (rows >= top) & (rows < top + height)  # (n, h)
    inside_cols = (cols >= left) & (cols < left + width)  # (n, w)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :]).unsqueeze(1)  # (n, 1, h, w)
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return torch.where(mask, fill, x)


def random_erasing(
    x: torch.Tensor, p: float, g: torch.Generator, fill: torch.Tensor | float = 0.0, attempts: int = 10
) -> torch.Tensor:
    """timm's RandomErasing (Zhong et al.), drawn for the whole batch at once: with probability p an
    image gets one rectangle of 2%..1/3 of its area, aspect ratio 0.3..3.3 (log-uniform), the first
    of `attempts` draws that fits, filled with `fill` (the mean colour: zero once normalised, as
    timm's 'const' mode)."""
    n, _, h, w = x.shape
    on = torch.rand(n, generator=g) < p
    area = h * w * (0.02 + (1 / 3 - 0.02) * torch.rand(n, attempts, generator=g))
    ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand(n, attempts, generator=g))
    eh, ew = (area * ratio).sqrt().round().long(), (area / ratio).sqrt().round().long()
    fits = (eh < h) & (ew < w)
    first = fits.float().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    eh, ew = eh.gather(1, first), ew.gather(1, first)
    on = on & fits.any(1)
    top = (torch.rand(n, 1, generator=g) * (h - eh + 1)).floor().long()
    left = (torch.rand(n, 1, generator=g) * (w - ew + 1)).floor().long()
    return fill_boxes(x, top, left, eh * on[:, None], ew * on[:, None], fill)


def augment_batch(
    x: torch.Tensor, spec: AugmentSpec, out_size: int, g: torch.Generator, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """x: float pixels in [0, 1], (N, C, H, W). The generator makes the batch reproducible.
    `fill`: the colour of cutout squares (per channel or one value)."""
    if x.shape[-1] > 2 * out_size:
        x = resize(x, out_size)  # antialias big reductions before sampling
    if spec.is_identity:
        return resize(x, out_size)
    if spec.has_geometry:
        x = apply_affine(x, random_affine(spec, x.shape[0], out_size, g), out_size)
    else:
        x = resize(x, out_size)
    if spec.max_lighting:
        x = lighting(x, spec, g)
    if spec.auto != "none":
        x = auto_augment(x, spec.auto, spec.magnitude, spec.ops, g, fill)
    if spec.cutout:
        x = cutout(x, spec.cutout, g, fill)
    if spec.erasing:
        x = random_erasing(x, spec.erasing, g, fill)
    return x

"""RandAugment, TrivialAugment and AutoAugment on whole batches, with per-image random choices.

torchvision's v2 transforms pick one op for a whole tensor, so a batch would get one op; here every
image draws its own op, magnitude and sign (from torchvision's own tables: the same op set and
magnitude bins), and each op runs once on the images that drew it: a loop over the ~14 kinds of op,
never over the images. Geometric ops (shear, translate, rotate) are one affine matrix per image and
one grid_sample (nearest, as torchvision's default); empty corners get `fill` (the data's mean colour, zero once normalised). Every draw
comes from the batch's generator, so a batch is a function of (seed, epoch, batch index).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F

POLICIES = ("randaugment", "trivialaugment", "autoaugment")
# torchvision's op names: the first 14 are RandAugment's and TrivialAugment's, AutoAugment adds Invert
OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")  # adjacent in OPS, after Identity
assert OPS[1:6] == GEOMETRIC
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SMALL = 2**22  # pixels in a batch (256 x 3 x 64 x 64 is 3.1M) below which one CPU thread does the work


@lru_cache(maxsize=32)
def op_table(policy: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ops of the policy as indices into OPS, magnitudes (len(OPS), bins), signed (len(OPS),))
    for square images of `size` px (translations are in pixels)."""
    from torchvision.transforms import v2  # on demand: torchvision costs seconds at start-up

    # torchvision's (magnitude bins, op space): RandAugment and TrivialAugmentWide with 31 bins, AutoAugment with 10
    bins, space = {
        "randaugment": (31, v2.RandAugment._AUGMENTATION_SPACE),
        "trivialaugment": (31, v2.TrivialAugmentWide._AUGMENTATION_SPACE),
        "autoaugment": (10, v2.AutoAugment._AUGMENTATION_SPACE),
    }[policy]
    mags, signed = torch.zeros(len(OPS), bins), torch.zeros(len(OPS), dtype=torch.bool)
    for name, (fn, sign) in space.items():
        m = fn(bins, size, size)
        if m is not None:
            mags[OPS.index(name)] = m.float()
        signed[OPS.index(name)] = sign
    return torch.tensor([OPS.index(name) for name in space]), mags, signed


@lru_cache(maxsize=1)
def autoaugment_policy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's ImageNet AutoAugment policy: 25 sub-policies of 2 (op, probability, magnitude bin)."""
    from torchvision.transforms import v2

    subs = v2.AutoAugment()._policies
    ops = torch.tensor([[OPS.index(name) for name, _, _ in sub] for sub in subs])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in subs])
    bins = torch.tensor([[b or 0 for _, _, b in sub] for sub in subs])
    return ops, probs, bins


def draw_layers(policy: str, n: int, size: int, magnitude: int, n_ops: int, g: torch.Generator):
    """Per image and layer, the op (index into OPS) and its signed magnitude: a list of (op, mag),
    each (n,). The same number of draws whatever the images hold."""
    ops, mags, signed = op_table(policy, size)

    def signs(op: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(len(op), generator=g) < 0.5
        return torch.where(signed[op] & flip, -1.0, 1.0)

    layers = []
    if policy == "autoaugment":
        sub_ops, probs, bins = autoaugment_policy()
        sub = torch.randint(0, len(sub_ops), (n,), generator=g)
        for j in range(sub_ops.shape[1]):
            on = torch.rand(n, generator=g) <= probs[sub, j]
            op = sub_ops[sub, j]
            mag = mags[op, bins[sub, j]] * signs(op)
            layers.append((torch.where(on, op, 0), mag))
        return layers
    for _ in range(1 if policy == "trivialaugment" else n_ops):
        op = ops[torch.randint(0, len(ops), (n,), generator=g)]
        if policy == "trivialaugment":  # a magnitude bin per image
            level = torch.randint(0, mags.shape[1], (n,), generator=g)
        else:
            level = torch.full((n,), magnitude)
        layers.append((op, mags[op, level] * signs(op)))
    return layers


def auto_augment(
    x: torch.Tensor, policy: str, magnitude: int, n_ops: int, g: torch.Generator, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """x: float pixels in [0, 1], (N, C, S, S); returns a new tensor of the same shape and range.
    Each layer sorts the batch by op, so every op works in place on one contiguous run of images;
    the images go back to their order at the end."""
    n, size = x.shape[0], x.shape[-1]
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    where = torch.arange(n)  # where[p]: the batch index of the image now at position p
    with one_thread_if_small(x):
        for op, mag in draw_layers(policy, n, size, magnitude, n_ops, g):
            order = torch.argsort(op[where], stable=True)
            where = where[order]
            x = x[order.to(x.device)]  # indexing, not index_select: 6x faster on a 224 px batch here
            apply_sorted(x, op[where], mag[where], fill)
        return x[torch.argsort(where).to(x.device)]


@contextmanager
def one_thread_if_small(x: torch.Tensor):
    """A small batch on the CPU is augmented on one thread: its ~100 short ops gain nothing from a
    second one, and on a busy machine each parallel op waits for it (TrivialAugment on 256 CIFAR
    images: 114-254 ms on 2 threads, 11 ms on 1, on this shared 2-core machine)."""
    threads = torch.get_num_threads()
    if x.device.type != "cpu" or x.numel() >= SMALL or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def apply_sorted(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor, fill: torch.Tensor) -> None:
    """In place: image p gets op[p] at magnitude mag[p]; op is sorted, so each kind of op runs once
    on a slice of the batch (the geometric ops, adjacent in OPS, together in one grid_sample)."""
    ends = torch.bincount(op, minlength=len(OPS)).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    geo = slice(starts[OPS.index(GEOMETRIC[0])], ends[OPS.index(GEOMETRIC[-1])])
    if geo.stop > geo.start:
        part = x[geo].sub(fill)
        theta = affine(op[geo], mag[geo], x.shape[-1]).to(x)
        grid = F.affine_grid(theta, list(part.shape), align_corners=False)
        # nearest, torchvision's default for these policies (and 3.5x faster than bilinear here)
        moved = F.grid_sample(part, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        x[geo] = moved.add_(fill).clamp_(0, 1)  # the clamp: rounding may leave fill +- 1e-7
    for name, fn in COLOUR.items():
        k = OPS.index(name)
        if ends[k] > starts[k]:
            part = x[starts[k] : ends[k]]
            part.copy_(fn(part, mag[starts[k] : ends[k]].to(x.device, x.dtype).view(-1, 1, 1, 1)))


def affine(op: torch.Tensor, mag: torch.Tensor, size: int) -> torch.Tensor:
    """(k, 2, 3) output-to-input maps in [-1, 1] coordinates, as torchvision's ops: shears about the
    top-left corner (x -> x + m * y), translations by whole pixels, rotations in degrees about the centre."""
    theta = torch.eye(3)[:2].repeat(len(op), 1, 1)
    is_op = {name: op == OPS.index(name) for name in GEOMETRIC}
    theta[:, 0, 1] = torch.where(is_op["ShearX"], -mag, 0.0)
    theta[:, 1, 0] = torch.where(is_op["ShearY"], -mag, 0.0)
    shift = -2 * mag.trunc() / size  # torchvision translates by int(magnitude) pixels
    theta[:, 0, 2] = torch.where(is_op["ShearX"], -mag, torch.where(is_op["TranslateX"], shift, 0.0))
    theta[:, 1, 2] = torch.where(is_op["ShearY"], -mag, torch.where(is_op["TranslateY"], shift, 0.0))
    a = torch.where(is_op["Rotate"], torch.deg2rad(mag), 0.0)
    rot = is_op["Rotate"]
    theta[rot, 0, 0], theta[rot, 0, 1] = a[rot].cos(), -a[rot].sin()
    theta[rot, 1, 0], theta[rot, 1, 1] = a[rot].sin(), a[rot].cos()
    return theta


def gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * x + (1 - f) * other).clamp_(0, 1)


def sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """torchvision's: blend with a smoothed copy (3x3 kernel, centre weight 5; borders kept)."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]  # the 3x3 sum, separably: 8x faster than a grouped conv
    smooth = x.clone()  # the kernel: the 3x3 sum plus 4 x the centre, over 13
    smooth[..., 1:-1, 1:-1] = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + x[..., 1:-1, 1:-1] * 4) / 13
    return blend(x, smooth, 1 + m)


def tv_functional():
    import torchvision.transforms.v2.functional as TF

    return TF


def posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    levels = 2.0 ** m.round()  # bits
    return (x * levels).floor_().clamp_(min=torch.zeros_like(levels), max=levels - 1) / levels


# The colour ops: (pixels (k, C, H, W), magnitudes (k, 1, 1, 1)) -> pixels
COLOUR = {
    "Brightness": lambda x, m: (x * (1 + m)).clamp_(0, 1),
    "Color": lambda x, m: blend(x, gray(x), 1 + m) if x.shape[1] == 3 else x,
    "Contrast": lambda x, m: blend(x, gray(x).mean((1, 2, 3), keepdim=True), 1 + m),
    "Sharpness": sharpness,
    "Posterize": posterize,
    "Solarize": lambda x, m: torch.where(x >= m, 1 - x, x),
    "AutoContrast": lambda x, m: tv_functional().autocontrast(x),  # per image and channel on a batch already
    "Equalize": lambda x, m: tv_functional().equalize(x),
    "Invert": lambda x, m: 1 - x,
}

"""Batch augmentation: exact identity, the 8 dihedral symmetries, whole-pixel reflection-padded
crops, probabilities honoured, reproducible from the generator; show-batch draws a batch."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import tiny_config
from trainer.cli import app
from trainer.data.augment import AugmentSpec, augment_batch, dihedral_theta, fixed_view, preset, random_affine

runner = CliRunner()


def pixels(n=6, size=16, seed=0):
    """uint8-valued pixels in [0, 1], like a decoded batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def symmetries(x):
    """The 8 symmetries of the square, by torch's exact index operations."""
    out = []
    for flip in (False, True):
        y = x.flip(-1) if flip else x
        out += [torch.rot90(y, k, (-2, -1)) for k in range(4)]
    return out


def test_identity_spec_reproduces_input_exactly():
    x = pixels()
    spec = preset("none")
    assert spec.is_identity
    assert torch.equal(augment_batch(x, spec, 16, torch.Generator().manual_seed(0)), x)


def test_identity_matrix_samples_exact_pixel_centres():
    x = pixels()
    out = fixed_view(x, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), 16)
    assert torch.allclose(out, x, atol=1e-6)


def test_dihedral_thetas_are_the_8_symmetries():
    x = pixels(n=1)
    views = [fixed_view(x, dihedral_theta(k), 16) for k in range(8)]
    expected = symmetries(x)
    for v in views:  # each view is one exact symmetry ...
        assert sum(torch.allclose(v, e, atol=1e-6) for e in expected) == 1
    matched = {next(i for i, e in enumerate(expected) if torch.allclose(v, e, atol=1e-6)) for v in views}
    assert matched == set(range(8))  # ... and together they are all eight


def test_top_down_draws_all_8_symmetries_and_nothing_else():
    spec = AugmentSpec(dihedral=True)  # no rotation/zoom: only the symmetries
    x = pixels(n=1).expand(200, -1, -1, -1).contiguous()
    out = augment_batch(x, spec, 16, torch.Generator().manual_seed(1))
    expected = symmetries(x[:1])
    seen = set()
    for img in out:
        hits = [i for i, e in enumerate(expected) if torch.allclose(img[None], e, atol=1e-5)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == set(range(8))


@pytest.mark.parametrize("size", [16, 32])
def test_pad_crop_shifts_whole_pixels_with_reflection_padding(size):
    pad = size // 8
    spec = AugmentSpec(pad=pad)  # pad_crop without the flip, to see the crop alone
    x = pixels(n=40, size=size, seed=3)
    out = augment_batch(x, spec, size, torch.Generator().manual_seed(2))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="symmetric")
    offsets = set()
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.allclose(out[i].numpy(), padded[i, :, dy : dy + size, dx : dx + size], atol=1e-5)
        ]
        assert len(found) >= 1, f"image {i} is not a whole-pixel crop of the reflection-padded image"
        offsets.add(found[0])
    assert len(offsets) > 5  # the crops really move around


def test_pad_crop_preset_pads_an_eighth_of_the_stage_size():
    assert preset("pad_crop", size=32).pad == 4
    assert preset("pad_crop", size=128).pad == 16
    assert preset("pad_crop", size=32, pad=2).pad == 2


def test_pad_crop_shift_is_in_output_pixels_when_resizing():
    """From a 16 px cache to a 32 px stage, pad 4 means whole 32 px pixels, at most 4."""
    spec = AugmentSpec(pad=4)
    theta = random_affine(spec, 500, 32, torch.Generator().manual_seed(0))
    shift_px = theta[:, :, 2] * 32 / 2
    assert torch.allclose(shift_px, shift_px.round(), atol=1e-5)
    assert shift_px.abs().max() == 4


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_flip_probability_is_respected(p):
    theta = random_affine(AugmentSpec(flip=True, p_flip=p), 4000, 16, torch.Generator().manual_seed(0))
    flipped = (theta[:, 0, 0] < 0).float().mean().item()
    assert flipped == pytest.approx(p, abs=0.03)


def test_affine_probability_is_respected():
    spec = AugmentSpec(max_rotate=10, max_zoom=1.2, p_affine=0.25)
    theta = random_affine(spec, 4000, 16, torch.Generator().manual_seed(0))
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    untouched = (theta - eye).abs().flatten(1).max(1).values < 1e-6
    assert untouched.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert torch.equal(
        random_affine(spec.__class__(max_rotate=10, p_affine=0.0), 50, 16, torch.Generator().manual_seed(0)),
        eye.expand(50, 2, 3),
    )


def test_lighting_probability_and_range():
    spec = AugmentSpec(max_lighting=0.2, p_lighting=0.0)
    x = pixels()
    assert torch.equal(augment_batch(x, spec, 16, torch.Generator()), x)
    spec = AugmentSpec(max_lighting=0.2, p_lighting=1.0)
    out = augment_batch(x, spec, 16, torch.Generator().manual_seed(0))
    assert not torch.equal(out, x) and out.min() >= 0 and out.max() <= 1


def test_same_generator_same_batch_and_rotation_bounded():
    spec = preset("side_on", max_zoom=1.1, max_rotate=10)
    x = pixels()
    a = augment_batch(x, spec, 16, torch.Generator().manual_seed(5))
    b = augment_batch(x, spec, 16, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    theta = random_affine(spec, 2000, 16, torch.Generator().manual_seed(0))
    # |det| of the linear part is 1/zoom^2: zoom within [1, 1.1]
    det = torch.linalg.det(theta[:, :, :2]).abs()
    assert det.min() >= 1 / 1.1**2 - 1e-5 and det.max() <= 1 + 1e-5


def test_show_batch_writes_a_png_grid(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data) + "transforms: {preset: side_on, max_zoom: 1.1}\n")
    out = tmp_path / "batch.png"
    res = runner.invoke(app, ["show-batch", str(cfg), "--out", str(out), "--n", "9"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 300


def test_cutout_blanks_exactly_one_square_per_image_inside_the_image():
    x = pixels(n=200, size=16) * 0.5 + 0.25  # no pixel equals the fill
    fill = torch.tensor([0.1, 0.2, 0.3])
    out = augment_batch(x, AugmentSpec(cutout=5), 16, torch.Generator().manual_seed(0), fill=fill)
    blanked = (out == fill.view(1, 3, 1, 1)).all(1)  # (n, h, w): every channel at the fill
    changed = (out != x).any(1)
    assert torch.equal(blanked, changed)  # nothing else moved
    for mask in blanked:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert len(rows) == len(cols) == 5 and mask.sum() == 25  # one whole 5x5 square
        assert rows.max() - rows.min() == 4 and cols.max() - cols.min() == 4
    # every placement is possible: top-left corners cover 0..11 on both axes
    tops = blanked.any(2).float().argmax(1)
    assert set(tops.tolist()) == set(range(12))


def test_cutout_is_reproducible_and_comes_after_the_geometry():
    x = pixels()
    spec = preset("pad_crop", cutout=4, size=16)
    a = augment_batch(x, spec, 16, torch.Generator().manual_seed(3), fill=0.5)
    b = augment_batch(x, spec, 16, torch.Generator().manual_seed(3), fill=0.5)
    assert torch.equal(a, b)
    plain = augment_batch(x, preset("pad_crop", size=16), 16, torch.Generator().manual_seed(3))
    # the same crops and flips (cutout draws after them), with one 4x4 square at the fill
    differs = (a != plain).any(1)
    assert ((a == 0.5).all(1) | ~differs).all() and (differs.sum((1, 2)) <= 16).all()


def test_cutout_is_off_for_tta_views():
    from trainer.inference.tta import tta_views

    spec = preset("side_on", max_zoom=1.1, cutout=8, size=128)
    views = tta_views(spec, 3, 128, mode="random")
    assert len(views) == 3 and all(v.spec.cutout == 0 for v in views)
    assert tta_views(AugmentSpec(cutout=8), 3, 128, mode="random") == []


def test_cutout_squares_are_zero_after_normalising(tmp_path, folder_data):
    from tests.playbook_util import learner_for, prepare
    from trainer.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        tiny_config(folder_data, data_extra=", stats: [[0.3, 0.4, 0.5], [0.2, 0.2, 0.2]]")
        + "transforms: {preset: pad_crop, cutout: 3}\n"
    )
    dl = learner_for(prepare(load_config(path), tmp_path / "run")).train_dl
    assert dl.augment.cutout == 3
    _, x, _ = next(iter(dl.iterate()))
    zero = (x == 0).all(1)  # (n, h, w)
    assert (zero.sum((1, 2)) >= 9).all()  # each image has its 3x3 square at the mean colour

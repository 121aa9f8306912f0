"""Automatic augmentation (RandAugment, TrivialAugment, AutoAugment) and random erasing on whole
batches: shape, dtype and range kept, every image its own op, torchvision's ops and magnitudes,
reproducible from (seed, epoch, batch), composed with the presets and the stage's size."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from typer.testing import CliRunner

from tests.conftest import tiny_config
from trainer.cli import app
from trainer.config import load_config
from trainer.config.data_schema import Transforms
from trainer.data.augment import AugmentSpec, augment_batch, preset, random_erasing
from trainer.data.auto_augment import (
    OPS,
    POLICIES,
    apply_sorted,
    auto_augment,
    autoaugment_policy,
    draw_layers,
    op_table,
)
from trainer.data.bundle import build_bundle
from trainer.data.loaders import ImageBatches, epoch_generator

runner = CliRunner()
FILL = torch.tensor([0.49, 0.48, 0.45])


def pixels(n=32, size=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g).float() / 255


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("size,channels", [(32, 3), (20, 3), (16, 1)])
def test_keeps_shape_dtype_and_range(policy, size, channels):
    x = pixels(64, size, channels)
    fill = FILL[:channels]
    for seed in range(3):
        out = auto_augment(x, policy, 9, 2, torch.Generator().manual_seed(seed), fill)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
        assert not torch.equal(out, x)
    spec = AugmentSpec(auto=policy, erasing=0.5)
    out = augment_batch(x, spec, size, torch.Generator().manual_seed(0), fill)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1


def test_the_input_batch_is_left_as_it_was():
    x = pixels()
    before = x.clone()
    auto_augment(x, "randaugment", 9, 2, torch.Generator().manual_seed(0), FILL)
    assert torch.equal(x, before)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_image_draws_its_own_op(policy):
    x = pixels(1).expand(128, -1, -1, -1).contiguous()  # 128 copies of one image
    out = auto_augment(x, policy, 9, 2, torch.Generator().manual_seed(0), FILL)
    distinct = {tuple(img.flatten()[:64].tolist()) for img in out}
    assert len(distinct) > 12  # one op for the whole batch would give 1
    ops = draw_layers(policy, 1000, 32, 9, 2, torch.Generator().manual_seed(0))[0][0]
    drawn = {OPS[k] for k in ops.unique().tolist()}
    policy_ops = autoaugment_policy()[0][:, 0] if policy == "autoaugment" else op_table(policy, 32)[0]
    assert drawn == {"Identity", *(OPS[k] for k in policy_ops.tolist())}  # each of the policy's ops, somewhere


def test_reproducible_from_seed_epoch_and_batch():
    images = torch.randint(0, 256, (40, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    spec = preset("side_on", auto="randaugment", erasing=0.5)

    def batches(seed=0, epoch=0, start=0):
        dl = ImageBatches(
            images, torch.zeros(40, dtype=torch.long), 8, 16, FILL, torch.ones(3), True, spec, seed, epoch=epoch
        )
        return [x for _, x, _ in dl.iterate(start)]

    first = batches()
    assert all(torch.equal(a, b) for a, b in zip(first, batches(), strict=True))  # same seed, epoch, batch
    assert torch.equal(batches(start=3)[0], first[3])  # a resumed epoch continues with the same batch
    assert not torch.equal(first[0], first[1])
    x = pixels(8)
    g = lambda salt: epoch_generator(0, 0, salt=salt)  # noqa: E731
    same = [auto_augment(x, "trivialaugment", 9, 2, g(5), FILL) for _ in range(2)]
    assert torch.equal(*same)
    assert not torch.equal(same[0], auto_augment(x, "trivialaugment", 9, 2, g(6), FILL))  # another batch
    assert not torch.equal(batches(epoch=1)[0], first[0]) and not torch.equal(batches(seed=1)[0], first[0])


def one_op(x, name, m):
    out = x.clone()
    apply_sorted(out, torch.full((len(x),), OPS.index(name)), torch.full((len(x),), float(m)), FILL.view(1, 3, 1, 1))
    return out


COLOUR = [
    ("Brightness", 0.4, lambda x, m: TF.adjust_brightness(x, 1 + m)),
    ("Brightness", -0.4, lambda x, m: TF.adjust_brightness(x, 1 + m)),
    ("Color", 0.6, lambda x, m: TF.adjust_saturation(x, 1 + m)),
    ("Contrast", -0.5, lambda x, m: TF.adjust_contrast(x, 1 + m)),
    ("Sharpness", 0.7, lambda x, m: TF.adjust_sharpness(x, 1 + m)),
    ("Posterize", 3, lambda x, m: TF.posterize(x, int(m))),
    ("Solarize", 0.6, lambda x, m: TF.solarize(x, m)),
    ("AutoContrast", 0, lambda x, m: TF.autocontrast(x)),
    ("Equalize", 0, lambda x, m: TF.equalize(x)),
    ("Invert", 0, lambda x, m: TF.invert(x)),
]


@pytest.mark.parametrize("name,m,reference", COLOUR, ids=[f"{c[0]}{c[1]}" for c in COLOUR])
def test_colour_ops_are_torchvisions_per_image(name, m, reference):
    x = pixels(12) * 0.8 + 0.1  # not at full range, so autocontrast and equalize change it
    out = one_op(x, name, m)
    want = torch.stack([reference(img, m) for img in x])  # torchvision, one image at a time
    assert torch.allclose(out, want, atol=1e-5), (out - want).abs().max()


def test_translations_move_whole_pixels_and_fill_with_the_mean():
    x = pixels(4)
    out = one_op(x, "TranslateX", 3.7)  # torchvision translates by int(magnitude)
    assert torch.allclose(out[..., 3:], x[..., :-3], atol=1e-6)
    assert torch.allclose(out[..., :3], FILL.view(1, 3, 1, 1).expand(4, 3, 16, 3), atol=1e-6)
    out = one_op(x, "TranslateY", -2)
    assert torch.allclose(out[..., :-2, :], x[..., 2:, :], atol=1e-6)


def test_a_rotation_by_90_degrees_is_a_quarter_turn():
    x = pixels(4)
    out = one_op(x, "Rotate", 90.0)
    assert any(torch.allclose(out, torch.rot90(x, k, (-2, -1)), atol=1e-5) for k in (1, 3))


def test_magnitudes_are_torchvisions_bins():
    ops, mags, signed = op_table("randaugment", 32)
    assert mags[OPS.index("Rotate"), 9] == pytest.approx(9.0)  # 30 degrees over 31 bins
    assert mags[OPS.index("TranslateX"), 30] == pytest.approx(150 / 331 * 32)
    assert signed[OPS.index("Brightness")] and not signed[OPS.index("Posterize")]
    _, ta, _ = op_table("trivialaugment", 32)
    assert ta[OPS.index("Rotate"), 30] == pytest.approx(135.0) and ta[OPS.index("Posterize"), 30] == 2
    assert "Invert" not in [OPS[k] for k in ops.tolist()] and len(ops) == 14
    layer = draw_layers("randaugment", 500, 32, 9, 2, torch.Generator().manual_seed(0))
    assert len(layer) == 2  # ops: 2
    op, mag = layer[0]
    rot = op == OPS.index("Rotate")
    assert set(mag[rot].abs().tolist()) == {9.0} and (mag[rot] < 0).any() and (mag[rot] > 0).any()


def test_random_erasing_draws_one_rectangle_per_chosen_image():
    x = pixels(400, 32) * 0.5 + 0.3  # no pixel equals the fill
    fill = torch.tensor([0.1, 0.2, 0.15])
    assert torch.equal(random_erasing(x, 0.0, torch.Generator().manual_seed(0), fill), x)
    out = random_erasing(x, 0.5, torch.Generator().manual_seed(0), fill)
    erased = (out == fill.view(1, 3, 1, 1)).all(1)  # (n, h, w)
    hit = erased.flatten(1).any(1)
    assert 0.4 < hit.float().mean() < 0.6
    assert torch.equal(out[~hit], x[~hit])
    for mask in erased[hit]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert mask.sum() == h * w  # one filled rectangle
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        assert 0.02 * 1024 - 2 * math.sqrt(1024) < h * w < 1024 / 3 + 2 * math.sqrt(1024)
        assert 0.3 / 1.6 < h / w < 3.3 * 1.6  # log-uniform aspect, rounded to whole pixels
    areas = erased[hit].flatten(1).float().mean(1)
    assert 0.12 < areas.mean() < 0.22  # uniform in [0.02, 1/3]: mean 0.18


def test_composes_with_presets_and_the_stage_size():
    t = Transforms(preset="pad_crop", auto="trivialaugment", erasing=0.25, mixup=0.2, cutmix=1.0, mix_prob=0.5)
    spec = preset(t.preset, size=16, **t.per_image())  # mixing is the loop's, not the per-image spec's
    assert (spec.pad, spec.flip, spec.auto, spec.erasing) == (2, True, "trivialaugment", 0.25)
    assert not preset("none", auto="autoaugment").is_identity and not preset("none", erasing=0.1).is_identity
    x = pixels(8, 32)
    out = augment_batch(x, spec, 16, torch.Generator().manual_seed(0), FILL)  # progressive resizing: 32 -> 16
    assert out.shape == (8, 3, 16, 16) and 0 <= out.min() and out.max() <= 1


def test_the_training_loader_and_show_batch_use_it(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        tiny_config(folder_data, stages="[{epochs: 1, lr: 0.01, size: 12}, {epochs: 1, lr: 0.01, size: 16}]")
        + "transforms: {preset: side_on, auto: randaugment, magnitude: 12, ops: 3, erasing: 0.5}\n"
    )
    bundle = build_bundle(load_config(cfg), 0, torch.device("cpu"), (12, 16))
    for size in (12, 16):
        train, valid = bundle.loaders(8, size)
        assert (train.augment.auto, train.augment.magnitude, train.augment.ops, train.augment.erasing) == (
            "randaugment",
            12,
            3,
            0.5,
        )
        assert valid.augment is None
        assert next(iter(train))[0].shape[-1] == size
    out = tmp_path / "batch.png"
    res = runner.invoke(app, ["show-batch", str(cfg), "--out", str(out), "--n", "9"])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 1000


def test_a_small_batch_runs_on_one_thread_and_the_count_comes_back(monkeypatch):
    threads, seen, real = torch.get_num_threads(), [], TF.equalize
    monkeypatch.setattr(TF, "equalize", lambda img: seen.append(torch.get_num_threads()) or real(img))
    auto_augment(pixels(64), "autoaugment", 9, 2, torch.Generator().manual_seed(0), FILL)
    assert seen and set(seen) == {1} and torch.get_num_threads() == threads

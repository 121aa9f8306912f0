"""data.resize: how a non-square image becomes the square a batch holds (crop, squish, pad), and the
line a run logs when its images are not square."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import CLASSES, shape_image, tiny_config
from trainer.cli import app
from trainer.data.decode import Fit, decode_all, read_image

runner = CliRunner()
GREEN, RED = (0, 255, 0), (255, 0, 0)


def wide(path, width=64, height=32):
    """A red image twice as wide as high whose 4 leftmost columns are green."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, :] = RED
    a[:, :4] = GREEN
    Image.fromarray(a).save(path)
    return path


@pytest.mark.parametrize("mode", ["crop", "squish", "pad-reflection", "pad-zeros"])
def test_each_mode_gives_a_square_and_keeps_what_it_promises(tmp_path, mode):
    fit = Fit(*mode.split("-"))
    x = read_image(wide(tmp_path / "w.png"), 32, 3, fit)
    assert x.shape == (3, 32, 32)
    green_left = (x[:, :, 0] == np.array(GREEN)[:, None]).all(0)  # rows where the left edge is green
    if fit.mode == "crop":  # the centre 32 of 64 columns: the green edge is cut off
        assert not green_left.any() and (x == np.array(RED)[:, None, None]).all()
    elif fit.mode == "squish":  # all of it, squeezed: green at the left edge in every row
        assert green_left.all()
    else:  # shrunk to 32 x 16 in the middle, the rest filled
        assert green_left[8:24].all()
        top, bottom = x[:, :8], x[:, 24:]
        if fit.pad == "zeros":
            assert (top == 0).all() and (bottom == 0).all()
        else:  # the image's reflection: the same colours, not black
            assert (top[:, :, 16] == np.array(RED)[:, None]).all() and (
                bottom[:, :, 0] == np.array(GREEN)[:, None]
            ).all()


def test_square_images_are_untouched_by_every_mode(tmp_path):
    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(tmp_path / "s.png")
    outs = [read_image(tmp_path / "s.png", 16, 3, Fit(m)) for m in ("crop", "squish", "pad")]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_the_image_cache_is_keyed_by_the_mode(tmp_path):
    files = [wide(tmp_path / f"w{i}.png") for i in range(2)]
    crop, _, n = decode_all(files, 16, 3, cache_dir=str(tmp_path / "c"), log=lambda m: None, fit=Fit("crop"))
    squish, _, _ = decode_all(files, 16, 3, cache_dir=str(tmp_path / "c"), log=lambda m: None, fit=Fit("squish"))
    assert n == 2 and not np.array_equal(crop, squish)
    again, _, n2 = decode_all(files, 16, 3, cache_dir=str(tmp_path / "c"), log=lambda m: None, fit=Fit("crop"))
    assert np.array_equal(again, crop) and n2 == 2  # the count comes back with the cache


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_a_run_of_non_square_images_says_what_is_done_to_them(tmp_path, mode):
    rng = np.random.default_rng(0)
    root = tmp_path / "planet"
    (root / "train-jpg").mkdir(parents=True)
    rows = ["image_name,tags"]
    for i in range(24):
        img = np.asarray(shape_image(CLASSES[i % 3], 32, rng))
        Image.fromarray(np.concatenate([img, img[:, :16]], 1)).save(root / "train-jpg" / f"p{i}.jpg")  # 48 x 32
        rows.append(f"p{i},{CLASSES[i % 3]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    extra = f", labels: train.csv, train: train-jpg, suffix: .jpg, id_column: image_name, resize: {mode}"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(root, layout="csv", data_extra=extra, stages="[{epochs: 1, lr: 1.0e-2}]"))
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    log = (tmp_path / "run" / "log.txt").read_text()
    said = "centre-crops them to squares" if mode == "crop" else "pads them to squares with their reflection"
    assert log.count("24 of 24 images are not square") == 1 and said in log
    stats = (tmp_path / "run" / "stats.json").read_text()
    assert '"size": 32' in stats if mode == "crop" else '"size": 48' in stats  # crop: the short side, pad: the long
    res = runner.invoke(app, ["show-batch", str(cfg), "--out", str(tmp_path / "b.png")])
    assert res.exit_code == 0 and (tmp_path / "b.png").is_file()

"""A corpus of bad input, each case through the CLI: exit code 2 (or 0 where the input is usable),
the message a user needs, and never a traceback.

Each case builds what it needs in a fresh folder and returns the command line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli.cases import check, config, csv, fake_run, first, fit, fit_csv, folder, registry, runner, text_fit
from tests.conftest import CLASSES, shape_image, tiny_config
from trainer.cli import app

CASES, case = registry()

# ---- image files -------------------------------------------------------------------------


@case(2, "circle_0.png: cannot read image")
def corrupt_bytes(tmp):
    d = folder(tmp)
    first(d).write_bytes(os.urandom(300))
    return fit(tmp, d)


@case(2, "circle_0.png: cannot read image")
def truncated_png(tmp):
    d = folder(tmp)
    f = first(d)
    f.write_bytes(f.read_bytes()[:120])
    return fit(tmp, d)


@case(2, "circle_0.jpg: cannot read image", "truncated")
def truncated_jpeg(tmp):
    d = folder(tmp)
    f = first(d)
    jpg = f.with_suffix(".jpg")
    shape_image("circle", 64, np.random.default_rng(0)).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[:600])
    f.unlink()
    return fit(tmp, d, data_extra=", size: 16")


@case(2, "circle_0.png: cannot read image")
def empty_image_file(tmp):
    d = folder(tmp)
    first(d).write_bytes(b"")
    return fit(tmp, d)


@case(2, "notes.jpg: cannot read image")
def text_file_named_jpg(tmp):
    d = folder(tmp)
    (d / "train" / "square" / "notes.jpg").write_text("not a picture\n")
    return fit(tmp, d)


@case(2, "valid/square/square_0.png: cannot read image")
def corrupt_validation_image(tmp):
    d = folder(tmp)
    first(d, "valid", "square").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return fit(tmp, d)


@case(0, "skipped 2 unreadable image(s)")
def bad_images_skipped_when_asked(tmp):
    d = folder(tmp)
    first(d).write_bytes(b"")  # the very first file: the image size must come from another one
    first(d, "valid", "stripe").write_bytes(b"junk")
    return fit(tmp, d, data_extra=", on_bad_image: skip")


@case(2, "no readable images in the training set")
def every_image_bad(tmp):
    d = folder(tmp)
    for f in (d / "train").rglob("*.png"):
        f.write_bytes(b"junk")
    return fit(tmp, d, data_extra=", on_bad_image: skip")


# ---- folder layout ------------------------------------------------------------------------


@case(2, "train: folder not found (expected train/<class>/<image files>)")
def missing_train_folder(tmp):
    d = folder(tmp)
    shutil.rmtree(d / "train")
    return fit(tmp, d)


@case(2, "no class folders inside")
def no_class_folders(tmp):
    d = folder(tmp)
    shutil.rmtree(d / "train")
    (d / "train").mkdir()
    (d / "train" / "a.png").write_bytes(b"")
    return fit(tmp, d)


@case(2, "class folder(s) with no images: square")
def empty_class_folder(tmp):
    d = folder(tmp)
    for f in (d / "train" / "square").iterdir():
        f.unlink()
    return fit(tmp, d)


@case(2, "class folder(s) with no images: stripe")
def class_folder_without_image_files(tmp):
    d = folder(tmp)
    for f in (d / "train" / "stripe").iterdir():
        f.rename(f.with_suffix(".txt"))
    return fit(tmp, d)


@case(2, "class(es) not in train/: triangle")
def class_only_in_validation_folder(tmp):
    d = folder(tmp)
    (d / "valid" / "triangle").mkdir()
    shutil.copy(first(d), d / "valid" / "triangle" / "t.png")
    return fit(tmp, d)


@case(2, "valid: no validation images")
def no_validation_images(tmp):
    d = folder(tmp)
    for f in (d / "valid").rglob("*.png"):
        f.unlink()
    return fit(tmp, d)


@case(2, "data.path: ", "data.png' is a file; the folder layout needs the dataset's folder")
def data_path_is_a_file(tmp):
    f = tmp / "data.png"
    shape_image("circle", 16, np.random.default_rng(0)).save(f)
    return fit(tmp, f)


# ---- labels CSV ---------------------------------------------------------------------------


@case(2, "labels.csv: labels file not found")
def csv_missing(tmp):
    d = csv(tmp)
    (d / "labels.csv").unlink()
    return fit_csv(tmp, d)


@case(2, "1 listed file(s) not found, e.g.", "ghost.jpg")
def csv_lists_missing_file(tmp):
    d = csv(tmp)
    with open(d / "labels.csv", "a") as f:
        f.write("ghost,circle\n")
    return fit_csv(tmp, d)


@case(2, "duplicate id(s): img1")
def csv_duplicate_ids(tmp):
    return fit_csv(tmp, csv(tmp, [f"img{i},{CLASSES[i % 3]}" for i in range(12)] + ["img1,square"]))


@case(2, "class(es) only in the validation split: hexagon")
def csv_class_only_in_validation(tmp):
    d = csv(tmp, [f"img{i},{CLASSES[i % 3] if i else 'hexagon'}" for i in range(12)])
    (d / "valid.txt").write_text("img0 img1 img2\n")
    return fit_csv(tmp, d, ", valid_ids: valid.txt")


@case(2, "empty label for id(s): img3")
def csv_empty_class(tmp):
    return fit_csv(tmp, csv(tmp, [f"img{i},{CLASSES[i % 3] if i != 3 else ''}" for i in range(12)]))


@case(2, "refused id '../secret'", "plain names inside the image folder")
def csv_id_with_dotdot(tmp):
    return fit_csv(tmp, csv(tmp, [f"img{i},{CLASSES[i % 3]}" for i in range(12)] + ["../secret,circle"]))


@case(2, "refused id '/etc/passwd'")
def csv_absolute_id(tmp):
    return fit_csv(tmp, csv(tmp, [f"img{i},{CLASSES[i % 3]}" for i in range(12)] + ["/etc/passwd,circle"]))


@case(2, "refused id 'C:\\\\temp\\\\x'")
def csv_windows_drive_id(tmp):
    return fit_csv(tmp, csv(tmp, [f"img{i},{CLASSES[i % 3]}" for i in range(12)] + ["C:\\temp\\x,circle"]))


@case(2, "labels.csv: cannot read the labels CSV: No columns to parse")
def csv_empty_file(tmp):
    d = csv(tmp)
    (d / "labels.csv").write_bytes(b"")
    return fit_csv(tmp, d)


@case(2, "expected a header `id,label` and at least one row")
def csv_header_only(tmp):
    return fit_csv(tmp, csv(tmp, []))


@case(2, "expected a header `id,label` and at least one row")
def csv_one_column(tmp):
    d = csv(tmp)
    (d / "labels.csv").write_text("id\nimg0\nimg1\n")
    return fit_csv(tmp, d)


@case(2, "labels.csv: cannot read the labels CSV", "utf-8")
def csv_not_utf8(tmp):
    d = csv(tmp)
    (d / "labels.csv").write_bytes("id,label\nimg0,caf\u00e9\n".encode("latin-1"))
    return fit_csv(tmp, d)


@case(2, "nope.txt: cannot read data.valid_ids")
def csv_valid_ids_file_missing(tmp):
    return fit_csv(tmp, csv(tmp), ", valid_ids: nope.txt")


@case(2, "none of its ids appear in the labels CSV")
def csv_valid_ids_match_nothing(tmp):
    d = csv(tmp)
    (d / "valid.txt").write_text("x y z\n")
    return fit_csv(tmp, d, ", valid_ids: valid.txt")


# ---- text corpus (checked before the text layout loads it) --------------------------------


@case(2, "corpus.txt: the text corpus is empty")
def text_empty(tmp):
    (tmp / "corpus.txt").write_text("")
    return text_fit(tmp, tmp / "corpus.txt")


@case(2, "corpus.txt: the text corpus is empty")
def text_only_whitespace(tmp):
    (tmp / "corpus.txt").write_text(" \n\t\n\n")
    return text_fit(tmp, tmp / "corpus.txt")


@case(2, "corpus.txt: not UTF-8 text (byte 0xe9 at offset 16)", "iconv -f latin1 -t utf-8")
def text_not_utf8(tmp):
    (tmp / "corpus.txt").write_bytes(b"Beyond good and \xe9vil, the will to power")
    return text_fit(tmp, tmp / "corpus.txt")


@case(2, "corpus.txt: looks binary (NUL bytes at offset 5)")
def text_binary(tmp):
    (tmp / "corpus.txt").write_bytes(b"hello\x00\x00\x00 world, and more text after it")
    return text_fit(tmp, tmp / "corpus.txt")


@case(2, "corpus.txt: the text corpus has 5 characters; it needs at least 9")
def text_too_short(tmp):
    (tmp / "corpus.txt").write_text("abcde")
    return text_fit(tmp, tmp / "corpus.txt")


@case(2, "valid.txt: the text corpus is empty")
def text_empty_validation_file(tmp):
    (tmp / "corpus.txt").write_text("the will to power " * 20)
    (tmp / "valid.txt").write_text("")
    return text_fit(tmp, tmp / "corpus.txt", f", valid_path: '{tmp / 'valid.txt'}'")


@case(2, "data.path: ", "does not exist")
def text_missing(tmp):
    return text_fit(tmp, tmp / "nope.txt")


# ---- configs --------------------------------------------------------------------------------


def cfg_case(tmp, edit, *extra):
    d = tmp / "d"
    d.mkdir()
    return ["check", str(config(tmp, d, text=edit(tiny_config(d)))), *extra]


@case(2, "c.yaml:3: data.bsz: unknown key; did you mean 'bs'?")
def config_unknown_key(tmp):
    return cfg_case(tmp, lambda t: t.replace("bs: 8", "bsz: 8"))


@case(2, "data.bs: Input should be a valid integer")
def config_wrong_type(tmp):
    return cfg_case(tmp, lambda t: t.replace("bs: 8", "bs: big"))


@case(2, "c.yaml:6: train.stages.0.lr: Input should be greater than 0")
def config_negative_lr(tmp):
    return cfg_case(tmp, lambda t: t.replace("lr: 1.0e-2", "lr: -1.0e-2"))


@case(2, "train.stages.0.lr: Input should be greater than 0")
def config_zero_lr(tmp):
    return cfg_case(tmp, lambda t: t.replace("lr: 1.0e-2", "lr: 0"))


@case(2, "train.stages.0.lr.1: Input should be greater than 0")
def config_negative_lr_in_a_list(tmp):
    return cfg_case(tmp, lambda t: t.replace("lr: 1.0e-2", "lr: [1.0e-3, -1.0e-2]"))


@case(2, "train.stages.0.lr.max: Input should be greater than 0")
def config_zero_lr_spread(tmp):
    return cfg_case(tmp, lambda t: t.replace("lr: 1.0e-2", "lr: {max: 0, ratio: 3}"))


@case(2, "train.stages.0.lr: Input should be a finite number")
def config_infinite_lr(tmp):
    return cfg_case(tmp, lambda t: t.replace("lr: 1.0e-2", "lr: .inf"))


@case(2, "train.stages: List should have at least 1 item")
def config_empty_stage_list(tmp):
    return cfg_case(tmp, lambda t: t.replace("[{name: all, epochs: 2, lr: 1.0e-2}]", "[]"))


@case(2, "train.stages.0.epochs: Input should be greater than or equal to 1")
def config_zero_epochs(tmp):
    return cfg_case(tmp, lambda t: t.replace("epochs: 2", "epochs: 0"))


@case(2, "train: nesterov needs optimizer: sgd with momentum > 0")
def config_nesterov_with_adamw(tmp):
    return cfg_case(tmp, lambda t: t.replace("train:\n", "train:\n  nesterov: true\n"))


@case(2, "train.ema: Input should be less than 1")
def config_ema_of_one(tmp):
    return cfg_case(tmp, lambda t: t.replace("train:\n", "train:\n  ema: 1.0\n"))


@case(2, "transforms.cutout: Input should be greater than or equal to 0")
def config_negative_cutout(tmp):
    return cfg_case(tmp, lambda t: t + "transforms: {preset: pad_crop, cutout: -8}\n")


@case(2, "transforms.mixup: takes a number, not true")
def config_true_for_a_number(tmp):
    # pydantic alone reads true as 1.0: MixUp at alpha 1 that the user never wrote
    return cfg_case(tmp, lambda t: t + "transforms: {mixup: true}\n")


@case(2, "train.stages.0.lr: takes a number, not [true, 0.1]")
def config_true_in_a_list_of_numbers(tmp):
    return cfg_case(tmp, lambda t: t.replace("lr: 1.0e-2", "lr: [true, 0.1]"))


@case(2, "data.stats: takes a number, not [[true, 0.5, 0.5], [0.2, 0.2, 0.2]]")
def config_true_in_a_nested_list(tmp):
    return cfg_case(tmp, lambda t: t.replace("bs: 8", "bs: 8, stats: [[true, 0.5, 0.5], [0.2, 0.2, 0.2]]"))


@case(2, "transforms: magnitude is RandAugment's (auto: randaugment); with auto: trivialaugment it does nothing")
def config_magnitude_without_randaugment(tmp):
    return cfg_case(tmp, lambda t: t + "transforms: {auto: trivialaugment, magnitude: 5}\n")


@case(2, "model: required key is missing")
def config_missing_section(tmp):
    return cfg_case(tmp, lambda t: "\n".join(l for l in t.splitlines() if not l.startswith("model")))


@case(2, "not valid YAML")
def config_not_yaml(tmp):
    return cfg_case(tmp, lambda t: t + "oops: [1, 2\n")


@case(2, "the config must be a mapping")
def config_not_a_mapping(tmp):
    return cfg_case(tmp, lambda t: "- 1\n- 2\n")


@case(2, "data: required key is missing")
def config_empty_file(tmp):
    return cfg_case(tmp, lambda t: "")


@case(2, "nope.yaml: config file not found")
def config_file_missing(tmp):
    return ["fit", str(tmp / "nope.yaml")]


@case(2, "cannot read the config")
def config_not_utf8(tmp):
    path = tmp / "c.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    return ["fit", str(path)]


@case(2, "c.yaml:6: duplicate key 'lr' (first on line 6)")
def config_duplicate_key(tmp):
    return cfg_case(tmp, lambda t: t.replace("lr: 1.0e-2", "lr: 1.0e-2, lr: 1.0"))


@case(2, "name: name must be a plain word")
def config_name_with_a_path(tmp):
    return cfg_case(tmp, lambda t: t.replace("name: tiny", "name: ../../etc"))


@case(2, "c.yaml:3: data.stats: give [mean per channel] and [std per channel] of the same length, every std > 0")
def config_zero_std(tmp):
    return cfg_case(tmp, lambda t: t.replace("bs: 8", "bs: 8, stats: [[0.5], [0]]"))


@case(2, "data.valid_pct: Input should be less than 1")
def config_valid_pct_out_of_range(tmp):
    return cfg_case(tmp, lambda t: t.replace("layout: folder", "layout: csv").replace("bs: 8", "bs: 8, valid_pct: 1.5"))


@case(2, "model.arch: unknown architecture 'resnet1000'")
def config_unknown_arch(tmp):
    return cfg_case(tmp, lambda t: t.replace("convnet2", "resnet1000"))


@case(2, "--set data.bs: expected KEY=VALUE")
def config_set_without_value(tmp):
    return cfg_case(tmp, lambda t: t, "--set", "data.bs")


@case(2, "freeze_to 7 but the model has 3 layer groups")
def config_stage_that_does_not_fit_the_model(tmp):
    return fit(tmp, folder(tmp), stages="[{epochs: 1, lr: 1.0e-2, freeze_to: 7}]")


@case(2, "model 'convnet' cannot take 3x8x8 inputs", "change the stage's size")
def config_image_too_small_for_the_model(tmp):
    return fit(tmp, folder(tmp), arch="convnet", stages="[{epochs: 1, lr: 1.0e-2, size: 8}]")


@case(2, "train.stages: 'simplenet' is built for one input size, but the stages use sizes 8, 16")
def config_simplenet_with_two_sizes(tmp):
    return fit(
        tmp,
        folder(tmp),
        arch="simplenet",
        stages="[{epochs: 1, lr: 1.0e-2, size: 8}, {epochs: 1, lr: 1.0e-3, size: 16}]",
    )


@case(2, "train.loss: bce needs multi-label data")
def config_loss_that_does_not_fit_the_labels(tmp):
    return fit(tmp, folder(tmp), stages="[{epochs: 1, lr: 1.0e-2}]\n  loss: bce")


@case(2, "seed: Input should be less than 9223372036854775808")
def config_seed_out_of_range(tmp):
    return cfg_case(tmp, lambda t: t.replace("seed: 0", "seed: 99999999999999999999"))


@case(2, "device: cuda was asked for, but no CUDA GPU is available")
def config_cuda_on_a_machine_without_one(tmp):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    return fit(tmp, folder(tmp), "--set", "device=cuda")


@case(2, "could not determine a constructor for the tag", "python/object/apply:os.system")
def config_python_tag(tmp):
    marker = tmp / "pwned"
    return cfg_case(tmp, lambda t: t.replace("name: tiny", f"name: !!python/object/apply:os.system ['touch {marker}']"))


# ---- runs and checkpoints -------------------------------------------------------------------


@case(2, "is not a run directory (no config.yaml)")
def resume_not_a_run(tmp):
    return ["fit", str(config(tmp, folder(tmp))), "--resume", str(tmp)]


@case(2, "--resume auto: no unfinished run of 'tiny'")
def resume_auto_with_nothing_to_resume(tmp):
    return ["fit", str(config(tmp, folder(tmp))), "--resume", "auto"]


@case(2, "last.pt: refused to load the checkpoint")
def resume_corrupt_checkpoint(tmp):
    cfg, run = fake_run(tmp, b"PK\x03\x04 not a checkpoint")
    return ["fit", str(cfg), "--resume", str(run)]


@case(2, "has no checkpoints/last.pt yet")
def resume_before_the_first_checkpoint(tmp):
    cfg, run = fake_run(tmp)
    return ["fit", str(cfg), "--resume", str(run)]


@case(2, "not a run directory")
def export_not_a_run(tmp):
    return ["export", str(tmp), "--format", "onnx"]


@case(2, "--format pickle: expected one of safetensors, onnx, torchscript")
def export_unknown_format(tmp):
    return ["export", str(tmp), "--format", "pickle"]


@case(2, "no image files found to predict on")
def predict_empty_folder(tmp):
    _, run = fake_run(tmp)
    from trainer.config import ModelConfig
    from trainer.models import create_model

    torch.save(
        {"model": create_model(ModelConfig(arch="convnet2"), 3, 3, 16).model.state_dict()},
        run / "checkpoints" / "best.pt",
    )
    (tmp / "empty").mkdir()
    return ["predict", str(run), "--data", str(tmp / "empty")]


@case(2, "--data", "nowhere: no such file or folder")
def predict_data_that_does_not_exist(tmp):
    _, run = fake_run(tmp)
    return ["predict", str(run), "--data", str(tmp / "nowhere")]


def test_the_corpus_is_large():
    assert sum(code == 2 for _, code, _ in CASES.values()) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, monkeypatch):
    check(CASES[name], name, tmp_path, monkeypatch)


# ---- converted, never an error --------------------------------------------------------------


def _modes(tmp: Path) -> dict[str, Path]:
    """One 16x16 image in each mode a dataset may hold."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (255, 0, 0)
    files = {}
    for name, img in {
        "gray": Image.fromarray(rgb[..., 0], "L"),
        "gray_alpha": Image.fromarray(rgb[..., 0], "L").convert("LA"),
        "rgba": Image.fromarray(np.dstack([rgb, np.full((16, 16), 255, np.uint8)]), "RGBA"),
        "palette": Image.fromarray(rgb).convert("P"),
        "cmyk": Image.fromarray(rgb).convert("CMYK"),
        "gray16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),  # mode I;16
        "bilevel": Image.fromarray(rgb[..., 0]).convert("1"),
    }.items():
        path = tmp / f"{name}.{'jpg' if name == 'cmyk' else 'tif' if name == 'gray16' else 'png'}"
        img.save(path)
        files[name] = path
    return files


@pytest.mark.parametrize("name", ["gray", "gray_alpha", "rgba", "palette", "cmyk", "gray16", "bilevel"])
def test_image_modes_are_converted(tmp_path, name):
    from trainer.data.decode import read_image

    path = _modes(tmp_path)[name]
    x = read_image(path, 16, 3)
    assert x.shape == (3, 16, 16) and x.dtype == np.uint8
    left, right = x[:, :, :4].astype(int), x[:, :, 12:].astype(int)
    if name in ("gray", "gray_alpha", "gray16", "bilevel"):
        assert (left == 255).all() and (right == 0).all()
    else:
        assert (abs(left - np.array([255, 0, 0])[:, None, None]) < 8).all() and (right < 8).all()
    assert read_image(path, 16, 1).shape == (1, 16, 16)


def test_transparent_pixels_become_white(tmp_path):
    from trainer.data.decode import read_image

    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (read_image(tmp_path / "clear.png", 8, 3) == 255).all()


def test_a_dataset_of_mixed_modes_trains(tmp_path):
    d = folder(tmp_path)
    modes = list(_modes(tmp_path).values())
    for i, f in enumerate(sorted((d / "train").rglob("*.png"))[: len(modes)]):
        shutil.copy(modes[i], f.with_name(f.stem + "_m" + modes[i].suffix))
    res = runner.invoke(app, fit(tmp_path, d))
    assert res.exit_code == 0, res.output

"""Hostile but fair input, through the CLI: damaged run directories, outputs that must not be
replaced, hostile images and configs, prediction tables that would corrupt themselves. Each case:
exit 2 (0 where the input is usable) and one line naming the cause and the file; never a
traceback; nothing of the user's touched."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import torch

from tests.cli.cases import check, config, csv, fake_run, fit, folder, registry, runner
from tests.runs import Crash, CrashAt
from trainer.cli import app, main

CASES, case = registry()


def weights(arch: str = "convnet2", **kw) -> dict:
    from trainer.config import ModelConfig
    from trainer.models import create_model

    return create_model(ModelConfig(arch=arch, **kw), 3, 3, 16).model.state_dict()


def finished_run(tmp: Path) -> tuple[Path, Path]:
    """A run directory with a best.pt of the right model (no training: fast)."""
    cfg, run = fake_run(tmp)
    torch.save({"model": weights()}, run / "checkpoints" / "best.pt")
    return cfg, run


def predict(run: Path, tmp: Path, *extra: str) -> list[str]:
    return ["predict", str(run), "--data", str(tmp / "data" / "valid"), *extra]


def crashed_run(tmp: Path) -> tuple[Path, Path]:
    """A real run stopped mid-way (a checkpoint to resume), config at tmp/c.yaml."""
    from trainer.config import load_config
    from trainer.run import fit as spine

    cfg = config(tmp, folder(tmp), stages="[{epochs: 2, lr: 1.0e-2}]")
    cfg.write_text(cfg.read_text() + "  checkpoint_every: 1\n")
    with pytest.raises(Crash):
        spine.fit(load_config(cfg), tmp / "run", callbacks=[CrashAt(2)])
    return cfg, tmp / "run"


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height pixels (its data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")
    )
    return path


# ---- damaged run directories ------------------------------------------------------------------


@case(2, "best.pt: the checkpoint is an empty file")
def predict_with_an_empty_checkpoint(tmp):
    _, run = fake_run(tmp)
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    return predict(run, tmp)


@case(2, "best.pt: not a checkpoint of trainer (it holds a dict without model weights")
def predict_with_a_checkpoint_without_a_model(tmp):
    _, run = fake_run(tmp)
    torch.save({"weights": 1}, run / "checkpoints" / "best.pt")
    return predict(run, tmp)


@case(2, "best.pt: not a checkpoint of trainer (it holds a Tensor)")
def export_a_bare_tensor(tmp):
    _, run = fake_run(tmp)
    torch.save(torch.zeros(3), run / "checkpoints" / "best.pt")
    return ["export", str(run)]


@case(2, "last.pt: not a checkpoint of trainer (it holds a int)")
def evaluate_a_checkpoint_of_a_number(tmp):
    _, run = fake_run(tmp)
    torch.save(5, run / "checkpoints" / "last.pt")
    return ["evaluate", str(run), "--checkpoint", "last"]


@case(2, "best.pt: its weights do not fit this run's model", "of another shape", "another run or architecture")
def predict_with_a_checkpoint_of_another_architecture(tmp):
    _, run = fake_run(tmp)
    torch.save({"model": weights("bnresnet")}, run / "checkpoints" / "best.pt")
    return predict(run, tmp)


@case(2, "config.yaml:2: not valid YAML")
def predict_with_a_run_config_that_is_not_yaml(tmp):
    _, run = finished_run(tmp)
    (run / "config.yaml").write_text("name: [tiny\n")
    return predict(run, tmp)


@case(2, "config.yaml:1: not a run's config")
def evaluate_a_run_config_that_is_a_list(tmp):
    _, run = finished_run(tmp)
    (run / "config.yaml").write_text("- 1\n- 2\n")
    return ["evaluate", str(run)]


@case(2, "config.yaml:1: not valid YAML: could not determine a constructor for the tag")
def export_a_run_config_with_a_python_tag(tmp):
    _, run = finished_run(tmp)
    (run / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {tmp / 'pwned'}']\n")
    return ["export", str(run)]


@case(2, "classes.json: not what trainer writes there (a JSON object, not a list)")
def predict_with_classes_json_of_the_wrong_shape(tmp):
    _, run = finished_run(tmp)
    (run / "classes.json").write_text('["circle", "square"]')
    return predict(run, tmp)


@case(2, "stats.json: not valid JSON")
def predict_with_garbage_stats_json(tmp):
    _, run = finished_run(tmp)
    (run / "stats.json").write_text("garbage")
    return predict(run, tmp)


@case(2, "stats.json: not what trainer writes there (std.1:")
def predict_with_a_negative_std(tmp):
    _, run = finished_run(tmp)
    (run / "stats.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.2, -1, 0.2], "size": 16, "channels": 3}')
    return predict(run, tmp)


@case(2, "vocab.json: not what trainer writes there")
def generate_with_a_damaged_vocabulary(tmp):
    corpus = tmp / "corpus.txt"
    corpus.write_text("the will to power " * 20)
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"name: lm\ndata: {{layout: text, path: '{corpus}', bptt: 8}}\n"
        "model: {arch: gru}\ntrain: {stages: [{epochs: 1}]}\n"
    )
    (run / "vocab.json").write_text('{"itos": "abc"}')
    return ["generate", str(run), "--prime", "the"]


@case(2, "last.pt: the checkpoint is an empty file")
def resume_an_empty_checkpoint(tmp):
    cfg, run = fake_run(tmp, b"")
    return ["fit", str(cfg), "--resume", str(run)]


@case(2, "last.pt: its weights do not fit this run's model")
def resume_a_checkpoint_of_another_architecture(tmp):
    cfg, run = crashed_run(tmp)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "model": weights("bnresnet")}, run / "checkpoints" / "last.pt")
    return ["fit", str(cfg), "--resume", str(run)]


@case(2, "cannot resume:", "config.yaml:1: not valid YAML")
def resume_a_run_whose_config_has_a_python_tag(tmp):
    cfg, run = fake_run(tmp, b"x")
    (run / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {tmp / 'pwned'}']\n")
    return ["fit", str(cfg), "--resume", str(run)]


# ---- outputs: nothing of the user's replaced, nothing computed for an unwritable place --------


@case(2, "the folder holds files that are not a run of trainer (config.yaml, metrics.csv)")
def fit_into_a_folder_of_the_users(tmp):
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own\n")
    (mine / "metrics.csv").write_text("my own\n")
    return ["fit", str(config(tmp, folder(tmp))), "--out", str(mine)]


@case(2, "is a file; give a folder for the run")
def fit_out_is_a_file(tmp):
    cfg = config(tmp, folder(tmp))
    return ["fit", str(cfg), "--out", str(cfg)]


@case(2, "the folder holds files that are not a run of trainer")
def lr_find_into_a_folder_of_the_users(tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine\n")
    return ["lr-find", str(config(tmp, folder(tmp))), "--out", str(tmp / "mine")]


@case(2, "is a folder; give the path of a file to write (nothing was replaced)")
def predict_out_is_a_folder(tmp):
    _, run = finished_run(tmp)
    return predict(run, tmp, "--out", str(tmp))


@case(2, "is a link; give the path of a file to write (nothing was replaced)")
def predict_out_is_a_symlink(tmp):
    _, run = finished_run(tmp)
    (tmp / "target.csv").write_text("mine\n")
    (tmp / "link.csv").symlink_to(tmp / "target.csv")
    return predict(run, tmp, "--out", str(tmp / "link.csv"))


@case(2, "is a link; give the path of a file to write")
def export_out_is_a_symlink(tmp):
    _, run = finished_run(tmp)
    (tmp / "link.onnx").symlink_to("/dev/null")
    return ["export", str(run), "--out", str(tmp / "link.onnx")]


@case(0, "wrote 6 predictions to")
def predict_into_a_folder_that_does_not_exist_yet(tmp):
    _, run = finished_run(tmp)
    return predict(run, tmp, "--out", str(tmp / "new" / "folder" / "p.csv"))


@case(2, "is a file (or below one), not a folder to write into")
def evaluate_out_is_a_file(tmp):
    _, run = finished_run(tmp)
    (tmp / "report").write_text("mine\n")
    return ["evaluate", str(run), "--out", str(tmp / "report")]


@case(0, "show.png")
def show_batch_out_without_a_suffix_says_the_real_name(tmp):
    return ["show-batch", str(config(tmp, folder(tmp))), "--out", str(tmp / "show")]


def users_png(path: Path) -> Path:
    """A picture of the user's own (a real PNG, from another program)."""
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(path)
    return path


@case(2, "adir: is a folder; give the path of a file to write (nothing was replaced)")
def show_batch_out_is_a_folder_without_a_suffix(tmp):
    (tmp / "adir").mkdir()
    return ["show-batch", str(config(tmp, folder(tmp))), "--out", str(tmp / "adir")]


@case(2, "mine.png: exists and was not written by trainer; give another path or remove it")
def show_batch_out_is_a_picture_of_the_users(tmp):
    return ["show-batch", str(config(tmp, folder(tmp))), "--out", str(users_png(tmp / "mine.png"))]


@case(2, "b.txt: the picture is a PNG; give a path ending in .png")
def show_batch_out_with_another_suffix(tmp):
    return ["show-batch", str(config(tmp, folder(tmp))), "--out", str(tmp / "b.txt")]


@case(2, "mine.png: exists and was not written by trainer")
def compare_out_is_a_picture_of_the_users(tmp):
    _, run = fake_run(tmp)
    return ["compare", str(run), str(run), "--out", str(users_png(tmp / "mine.png"))]


@case(2, "mine.safetensors: exists and is not an export of trainer; give another path or remove it")
def export_out_is_a_file_of_the_users(tmp):
    _, run = finished_run(tmp)
    (tmp / "mine.safetensors").write_text("mine\n")
    return ["export", str(run), "--out", str(tmp / "mine.safetensors")]


# ---- hostile images ---------------------------------------------------------------------------


@case(2, "huge.png: cannot read image (it declares too many pixels")
def fit_with_a_decompression_bomb(tmp):
    d = folder(tmp)
    bomb_png(d / "train" / "circle" / "huge.png", 30_000, 30_000)  # 900M pixels, PIL refuses at 179M
    return fit(tmp, d)


@case(2, "big.png: cannot read image (it declares 10000x10000 pixels, more than")
def fit_with_an_image_past_the_pixel_limit(tmp):
    d = folder(tmp)
    bomb_png(d / "valid" / "square" / "big.png", 10_000, 10_000)  # 100M pixels: PIL only warns
    return fit(tmp, d)


@case(0, "skipped 1 unreadable image(s)")
def fit_skips_a_decompression_bomb_when_asked(tmp):
    d = folder(tmp)
    bomb_png(d / "train" / "circle" / "huge.png", 30_000, 30_000)
    return fit(tmp, d, data_extra=", on_bad_image: skip")


@case(2, "huge.png: cannot read image (it declares too many pixels")
def predict_a_decompression_bomb(tmp):
    _, run = finished_run(tmp)
    bomb_png(tmp / "data" / "valid" / "circle" / "huge.png", 30_000, 30_000)
    return predict(run, tmp)


# ---- hostile configs --------------------------------------------------------------------------


@case(2, "the YAML expands to more than 100,000 values")
def config_with_aliases_that_multiply(tmp):
    cfg = config(tmp, folder(tmp))
    lines = ["x0: &x0 [a, a, a, a, a, a, a, a, a, a]"]
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = cfg.read_text().replace("model: {arch: convnet2}", "model: {arch: convnet2, layers: *x8}")
    cfg.write_text("\n".join(lines) + "\n" + text)
    return ["check", str(cfg)]


@case(2, "name: name is 300 bytes long; at most 100")
def config_name_too_long_for_the_file_system(tmp):
    cfg = config(tmp, folder(tmp))
    cfg.write_text(cfg.read_text().replace("name: tiny", "name: " + "n" * 300))
    return ["fit", str(cfg)]


@case(2, "lr {max: 1e+300, ratio: 1e-300} over 3 layer groups gives rates that are not finite")
def config_lr_spread_that_overflows(tmp):
    return fit(tmp, folder(tmp), arch="resnet18", stages="[{epochs: 1, lr: {max: 1.0e+300, ratio: 1.0e-300}}]")


@case(2, "train.stages.0.size: Input should be less than or equal to 8192")
def config_stage_size_that_cannot_be_allocated(tmp):
    return ["check", str(config(tmp, folder(tmp), stages="[{epochs: 1, size: 1000000}]"))]


@case(2, "--temperature inf: must be 0 (greedy) or a finite positive number")
def generate_at_an_infinite_temperature(tmp):
    return ["generate", str(tmp), "--prime", "a", "--temperature", "inf"]


@case(2, "Invalid value for '--seed'")
def generate_with_a_seed_past_64_bits(tmp):
    return ["generate", str(tmp), "--prime", "a", "--seed", str(10**23)]


@case(2, "lr_find: need 0 < start lr < end lr, both finite")
def lr_find_to_an_infinite_lr(tmp):
    return ["lr-find", str(config(tmp, folder(tmp))), "--end-lr", "inf"]


@case(2, "--set train.nesterov=true: train: nesterov needs optimizer: sgd")
def set_error_names_the_set_option(tmp):
    return ["check", str(config(tmp, folder(tmp))), "--set", "train.nesterov=true"]


# ---- prediction tables ------------------------------------------------------------------------


@case(2, "the prediction table would have two columns named 'circle'")
def predict_id_column_named_like_a_class(tmp):
    _, run = finished_run(tmp)
    return predict(run, tmp, "--id-column", "circle")


@case(2, "the prediction table would have two columns named 'label'")
def predict_id_column_named_like_the_label_column(tmp):
    _, run = finished_run(tmp)
    return predict(run, tmp, "--id-column", "label")


@case(2, "--checkpoint bets: expected best, last, cycle-K or top-K (this run has: best)")
def predict_with_an_unknown_checkpoint_name(tmp):
    _, run = finished_run(tmp)
    return predict(run, tmp, "--checkpoint", "bets")


@case(2, "no checkpoints/cycle-3.pt (this run has: best)")
def predict_with_a_cycle_the_run_does_not_have(tmp):
    _, run = finished_run(tmp)
    return predict(run, tmp, "--checkpoint", "cycle-3")


# ---- clear messages ---------------------------------------------------------------------------


@case(2, "labels.csv: line 2 has 3 fields, the header 2")
def labels_csv_with_an_extra_column(tmp):
    d = csv(tmp)
    rows = (d / "labels.csv").read_text().splitlines()
    (d / "labels.csv").write_text("\n".join([rows[0], *[r + ",extra" for r in rows[1:]]]) + "\n")
    return fit(tmp, d, layout="csv", data_extra=", suffix: .jpg")


@case(2, "train: one class folder (circle); a classifier needs at least two")
def a_training_set_with_one_class(tmp):
    d = tmp / "one"
    for part in ("train", "valid"):
        (d / part).mkdir(parents=True)
        (folder(tmp) / part / "circle").rename(d / part / "circle")
    return fit(tmp, d)


@case(2, "every training row has the label 'circle'; a classifier needs at least two classes")
def a_labels_csv_with_one_class(tmp):
    d = csv(tmp, [f"img{i},circle" for i in range(12)])
    return fit(tmp, d, layout="csv", data_extra=", suffix: .jpg")


def test_the_hostile_corpus_is_large():
    assert sum(code == 2 for _, code, _ in CASES.values()) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, tmp_path, monkeypatch):
    check(CASES[name], name, tmp_path, monkeypatch)


# ---- what the cases above cannot see --------------------------------------------------------


def test_a_refused_out_leaves_the_users_files_as_they_were(tmp_path, monkeypatch):
    build = CASES["fit_into_a_folder_of_the_users"][0]
    argv = build(tmp_path)
    assert runner.invoke(app, argv).exit_code == 2
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["config.yaml", "metrics.csv"]
    assert (tmp_path / "mine" / "config.yaml").read_text() == "my own\n"
    build = CASES["predict_out_is_a_symlink"][0]
    assert runner.invoke(app, build(tmp_path / "p")).exit_code == 2
    assert (tmp_path / "p" / "link.csv").is_symlink() and (tmp_path / "p" / "target.csv").read_text() == "mine\n"


def test_a_refused_picture_or_export_leaves_the_users_file_as_it_was(tmp_path, monkeypatch):
    for name, mine in [
        ("show_batch_out_is_a_picture_of_the_users", "mine.png"),
        ("show_batch_out_is_a_folder_without_a_suffix", "adir"),
        ("export_out_is_a_file_of_the_users", "mine.safetensors"),
    ]:
        tmp = tmp_path / name
        tmp.mkdir()
        argv = CASES[name][0](tmp)
        before = sorted(p.name for p in tmp.iterdir())
        content = (tmp / mine).read_bytes() if (tmp / mine).is_file() else None
        assert runner.invoke(app, argv).exit_code == 2
        assert sorted(p.name for p in tmp.iterdir()) == before, name  # no adir.png, no b.txt
        assert content is None or (tmp / mine).read_bytes() == content, name


def test_show_batch_replaces_its_own_picture_readable_by_the_team(tmp_path):
    import os

    from trainer.storage import marked_png

    cfg, out = config(tmp_path, folder(tmp_path)), tmp_path / "batch.png"
    old = os.umask(0o022)
    try:
        for n in ("4", "9"):  # the second run replaces the first's picture: it carries our mark
            res = runner.invoke(app, ["show-batch", str(cfg), "--out", str(out), "--n", n])
            assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    assert marked_png(out) and not marked_png(users_png(tmp_path / "mine.png"))
    assert out.stat().st_mode & 0o777 == 0o644  # as open() makes it under umask 022, not mkstemp's 0600


def test_export_replaces_its_own_export_in_each_format(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from trainer.inference.export import an_export

    _, run = finished_run(tmp_path)
    for fmt, out in (("safetensors", None), ("torchscript", tmp_path / "m.pt")):
        argv = ["export", str(run), "--format", fmt, "--no-verify", *(["--out", str(out)] if out else [])]
        for _ in range(2):  # the second export replaces the first
            res = runner.invoke(app, argv)
            assert res.exit_code == 0, res.output
    assert an_export(run / "export" / "model.safetensors") and an_export(tmp_path / "m.pt")
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    onnx.save(model, str(tmp_path / "plain.onnx"))
    model.metadata_props.add(key="trainer", value="{}")
    onnx.save(model, str(tmp_path / "ours.onnx"))
    assert an_export(tmp_path / "ours.onnx") and not an_export(tmp_path / "plain.onnx")
    assert not an_export(users_png(tmp_path / "mine.png"))


def test_a_usage_error_is_one_line_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["trainer", "generate", "run", "--prime", "a", "--seed", "1e23"])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "Invalid value for '--seed'" in err and "trainer generate --help" in err


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path):
    import errno

    from trainer import storage

    def fill(f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="last.pt: no space left to write it"):
        storage.atomic_write_bytes(tmp_path / "last.pt", fill)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_costs_the_image_cache_not_the_run(tmp_path, monkeypatch):
    import errno

    import numpy as np

    from trainer.data import decode

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    d = folder(tmp_path)
    res = runner.invoke(app, fit(tmp_path, d, data_extra=f", cache_dir: '{tmp_path / 'cache'}'"))
    assert res.exit_code == 0, res.output
    assert "could not write the image cache" in res.output
    assert not list((tmp_path / "cache").glob("*.tmp*")) and decode.cache_root(str(tmp_path / "cache")).is_dir()


def test_an_epoch_with_every_step_skipped_reports_no_loss():
    from trainer.train.loop import FitState

    s = FitState()
    assert s.train_loss != s.train_loss  # NaN, not 0
    s.epoch_loss_sum, s.epoch_loss_count = 3.0, 2
    assert s.train_loss == 1.5

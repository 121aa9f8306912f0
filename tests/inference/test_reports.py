"""What evaluate, predict and summary report: per-tag precision, recall and F2 for multi-label, one
threshold per tag, the threshold grid's edges, snapshot ensembles beside the run, and a stage's
freeze state in the summary."""

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import make_csv_dataset, tiny_config
from trainer.cli import app
from trainer.inference.evaluate import per_class
from trainer.inference.finished import load_run
from trainer.inference.pictures import label_text
from trainer.train.tasks import THRESHOLDS, at_edge, best_thresholds_per_tag

runner = CliRunner()


def fit(tmp_path, text, name="run"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(text)
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / name)])
    assert res.exit_code == 0, res.output
    return tmp_path / name


def test_per_tag_precision_recall_and_f2_against_their_formulas():
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6], [0.3, 0.4]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    rows = per_class(probs, y, ["a", "b"], True, torch.tensor([0.5, 0.5]))
    # tag a: predicted on samples 0, 1; present on 0, 2 -> tp 1, precision 1/2, recall 1/2
    # tag b: predicted on 1, 2; present on 1, 2 -> precision 1, recall 1
    assert rows[0]["precision"] == pytest.approx(0.5) and rows[0]["recall"] == pytest.approx(0.5)
    assert rows[0]["f2"] == pytest.approx(0.5) and rows[1]["f2"] == pytest.approx(1.0)
    assert rows[0]["n"] == 2 and rows[1]["accuracy"] == pytest.approx(1.0)


def test_one_threshold_per_tag_is_each_tags_best_and_the_grid_has_room():
    assert THRESHOLDS[0].item() == pytest.approx(0.01) and THRESHOLDS[-1].item() == pytest.approx(0.99)
    y = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    probs = torch.cat([torch.linspace(0.6, 0.7, 10)[:, None], torch.linspace(0.2, 0.3, 10)[:, None]], 1)
    probs[:5, 0] += 0.2  # tag a: present where its probability is above 0.7
    probs[5:, 1] += 0.1  # tag b: present where its probability is above 0.3
    ta, tb = best_thresholds_per_tag(probs, y)
    assert 0.7 <= ta < 0.8 and 0.25 <= tb < 0.35
    assert at_edge([0.01, 0.5]) and at_edge(0.99) and not at_edge([0.3, 0.5])


def test_long_tag_lists_stay_legible_in_titles():
    y = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    assert label_text(y, list("abcdef"), most=3) == "a b c +2"
    assert label_text(y[:3], list("abc"), most=3) == "a b c"


def test_per_class_thresholds_are_saved_used_by_predict_and_reported_per_tag(tmp_path):
    data = make_csv_dataset(tmp_path / "ml", n=60, multi=True)
    text = tiny_config(data, layout="csv", data_extra=", suffix: .jpg", stages="[{epochs: 3, lr: 2.0e-2}]")
    run_dir = fit(tmp_path, text.replace("train:\n", "train:\n  threshold: per_class\n"))
    saved = json.loads((run_dir / "threshold.json").read_text())["threshold"]
    run = load_run(run_dir)
    assert isinstance(saved, list) and len(saved) == len(run.classes) == 5 and run.threshold == saved
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(run_dir), "--data", str(data / "train"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    for _, row in pd.read_csv(out, keep_default_na=False).iterrows():  # each tag against its own threshold
        assert row["tags"].split() == [c for c, t in zip(run.classes, saved, strict=True) if row[c] > t]
    res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "ev" / "per_class.csv")
    assert list(table.columns) == ["class", "n", "accuracy", "precision", "recall", "f2"]
    assert "precision" in res.output and "recall" in res.output


@pytest.fixture(scope="module")
def sgdr_run(tmp_path_factory, folder_data):
    tmp = tmp_path_factory.mktemp("ens")
    stages = "[{schedule: sgdr, n_cycles: 3, cycle_len: 1, lr: 2.0e-2, save_cycles: true}]"
    return fit(tmp, tiny_config(folder_data, stages=stages))


def test_ensembles_say_how_many_snapshots_and_are_scored_beside_the_run(sgdr_run, folder_data, tmp_path):
    res = runner.invoke(
        app,
        [
            "predict",
            str(sgdr_run),
            "--data",
            str(folder_data / "test"),
            "--ensemble",
            "cycles",
            "--out",
            str(tmp_path / "p.csv"),
        ],
    )
    assert res.exit_code == 0 and "averaged 3 snapshots (cycle-1, cycle-2, cycle-3)" in res.output, res.output
    res = runner.invoke(app, ["evaluate", str(sgdr_run), "--ensemble", "cycles", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0 and "ensemble of 3" in res.output, res.output
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["snapshots"] == 3 and 0 <= report["metrics_ensemble"]["accuracy"] <= 1
    assert report["metrics"] != report["metrics_ensemble"]  # the run's weights, and the mean of three


def test_summary_shows_a_stages_freeze_state(tmp_path, folder_data):
    stages = "[{name: head, epochs: 1, freeze: body}, {name: all, epochs: 1, unfreeze: true}]"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, arch="resnet18", stages=stages))

    def counts(*extra):
        res = runner.invoke(app, ["summary", str(cfg), *extra])
        assert res.exit_code == 0, res.output
        last = res.output.strip().splitlines()[-1]  # total parameters: N  trainable: M
        return [int(w.replace(",", "")) for w in last.split() if w.replace(",", "").isdigit()]

    total, trainable = counts()
    assert trainable < total  # the first stage, 'head': the body frozen
    assert counts("--stage", "all") == [total, total]
    res = runner.invoke(app, ["summary", str(cfg), "--stage", "nope"])
    assert res.exit_code == 2 and "no stage named 'nope'" in res.output

"""`trainer compare`: the config keys that differ (and only those), the final and best metrics side by
side, the curves overlaid in one PNG; fewer than two runs, a folder that is no run and a run whose
config cannot be read are refused with one line and exit code 2."""

import pytest
from PIL import Image
from rich.console import Console

from tests.inference.test_runs import cli, config_text, finished, make_run, metric_rows
from trainer.config import flat_keys as flatten
from trainer.inference.compare import (
    compare_runs,
    config_differences,
    main_metric,
    metrics_side_by_side,
    short_labels,
)
from trainer.inference.runs import read_run


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(
        tmp_path / "runs" / "tiny" / "20260101-100000",
        config_text(tmp_path, lr=1e-2, bs=8, seed=0),
        finished(1),
        metric_rows([0.9, 0.5, 0.6], [0.5, 0.75, 0.7]),
    )
    b = make_run(
        tmp_path / "runs" / "tiny" / "20260102-100000",
        config_text(tmp_path, lr=3e-3, bs=16, seed=1),
        finished(2),
        metric_rows([0.8, 0.7], [0.6, 0.625]),
    )
    return a, b


def test_only_the_keys_that_differ_lr_bs_and_seed(two_runs):
    rows = dict(config_differences([read_run(p) for p in two_runs]))
    assert rows == {"seed": ["0", "1"], "data.bs": ["8", "16"], "train.stages.0.lr": ["0.01", "0.003"]}


def test_the_same_configs_have_no_differences(tmp_path, two_runs, monkeypatch, capsys):
    twin = make_run(tmp_path / "twin", (two_runs[0] / "config.yaml").read_text(), finished(3), metric_rows([0.4]))
    assert config_differences([read_run(two_runs[0]), read_run(twin)]) == []
    code, out, err = cli(monkeypatch, capsys, "compare", str(two_runs[0]), str(twin), "--out", str(tmp_path / "c.png"))
    assert code == 0 and "the configs are the same" in out


def test_missing_keys_show_as_a_dash_and_lists_of_scalars_stay_one_value():
    flat = flatten({"a": {"b": [1, 2]}, "stages": [{"lr": 1}, {"lr": 2, "size": 64}], "empty": []})
    assert flat == {"a.b": [1, 2], "stages.0.lr": 1, "stages.1.lr": 2, "stages.1.size": 64, "empty": []}


def test_final_and_best_side_by_side_best_by_min_for_losses_and_max_otherwise(two_runs):
    rows = dict(metrics_side_by_side([read_run(p) for p in two_runs]))
    assert list(rows) == ["train_loss", "valid_loss", "accuracy"]  # not stage, epoch, lr, seconds
    assert rows["valid_loss"] == ["0.6 (best 0.5)", "0.7 (best 0.7)"]
    assert rows["accuracy"] == ["0.7 (best 0.75)", "0.625 (best 0.625)"]


def test_the_main_metric_is_the_monitor_unless_it_is_a_loss(tmp_path, two_runs):
    runs = [read_run(p) for p in two_runs]
    assert main_metric(runs) == "accuracy"
    runs[0].monitor = "fbeta"
    for r in runs:
        r.metrics = [{"valid_loss": 1.0, "fbeta": 0.5, "accuracy_thresh": 0.9}]
    assert main_metric(runs) == "fbeta"
    runs[0].monitor = "valid_loss"
    for r in runs:
        r.metrics = [{"valid_loss": 1.0, "bpc": 2.0}]
    assert main_metric(runs) == "bpc"


def test_labels_are_the_shortest_endings_that_tell_runs_apart(tmp_path):
    assert short_labels([tmp_path / "runs/tiny/t1", tmp_path / "runs/tiny/t2"]) == ["t1", "t2"]
    assert short_labels([tmp_path / "a/t1", tmp_path / "b/t1"]) == ["a/t1", "b/t1"]
    assert short_labels([tmp_path / "a/t1", tmp_path / "a/t1"]) == ["t1 (1)", "t1 (2)"]  # the same run twice


def test_the_command_prints_both_tables_and_writes_a_png(tmp_path, two_runs, monkeypatch, capsys):
    monkeypatch.setattr("trainer.cli.common.console", Console(width=200))
    out = tmp_path / "pics" / "cmp.png"
    code, text, err = cli(monkeypatch, capsys, "compare", *map(str, two_runs), "--out", str(out))
    assert code == 0 and err == "", err
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") == 4}
    assert set(rows) == {"seed", "data.bs", "train.stages.0.lr", "train_loss", "valid_loss", "accuracy"}
    assert "│ 0.01 " in rows["train.stages.0.lr"] and "│ 0.003 " in rows["train.stages.0.lr"]
    assert "│ 0.6 (best 0.5) " in rows["valid_loss"] and "│ 0.7 (best 0.7) " in rows["valid_loss"]
    assert "20260101-100000" in text and "20260102-100000" in text  # the columns: the runs' folder names
    assert text.rstrip().endswith(f"wrote {out}")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 300


def test_the_default_picture_is_compare_png_here(tmp_path, two_runs, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, _ = cli(monkeypatch, capsys, "compare", *map(str, two_runs))
    assert code == 0
    with Image.open(tmp_path / "compare.png") as png:
        png.verify()


def test_running_and_empty_runs_are_compared_with_dashes(tmp_path, two_runs):
    empty = make_run(tmp_path / "empty", config_text(tmp_path, lr=1e-3), finished(5, status="running"))
    result = compare_runs([two_runs[0], empty], tmp_path / "c.png")
    assert dict(result.metrics)["valid_loss"] == ["0.6 (best 0.5)", "-"]
    assert result.labels == ["20260101-100000", "empty"] and result.picture.stat().st_size > 0


def refused(monkeypatch, capsys, *argv) -> str:
    code, out, err = cli(monkeypatch, capsys, "compare", *map(str, argv))
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_fewer_than_two_runs_are_refused(two_runs, monkeypatch, capsys):
    assert "two or more run directories" in refused(monkeypatch, capsys, two_runs[0])
    assert "Missing argument" in refused(monkeypatch, capsys)


def test_a_folder_that_is_no_run_and_an_unreadable_config_are_refused(tmp_path, two_runs, monkeypatch, capsys):
    (tmp_path / "plain").mkdir()
    picture = tmp_path / "c.png"
    assert "not a run directory" in refused(monkeypatch, capsys, two_runs[0], tmp_path / "plain", "--out", picture)
    assert "not a run directory" in refused(monkeypatch, capsys, two_runs[0], tmp_path / "nowhere", "--out", picture)
    bad = make_run(tmp_path / "bad", "name: [tiny\n", finished(4))
    assert "config.yaml: not valid YAML" in refused(monkeypatch, capsys, two_runs[0], bad, "--out", picture)
    assert not picture.exists()


def test_an_output_path_that_is_a_folder_is_refused(tmp_path, two_runs, monkeypatch, capsys):
    assert "is a folder" in refused(monkeypatch, capsys, *two_runs, "--out", tmp_path)

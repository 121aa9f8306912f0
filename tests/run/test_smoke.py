"""Honest smoke runs: every stage for an epoch of a few batches at small sizes, lr: auto at a fixed
safe lr, a loss that explodes fails the run, and the throwaway run directory goes away."""

import tempfile

import pytest
from typer.testing import CliRunner

from tests.conftest import tiny_config
from trainer.cli import app
from trainer.config import load_config
from trainer.run.rundir import read_table
from trainer.run.session import smoke_config

runner = CliRunner()


def config(tmp_path, data, stages: str):
    path = tmp_path / "c.yaml"
    path.write_text(tiny_config(data, stages=stages))
    return path


def test_lr_auto_runs_at_a_fixed_lr_and_every_stage_for_one_epoch(tmp_path, folder_data):
    stages = "[{name: a, epochs: 3, lr: auto}, {name: b, schedule: sgdr, n_cycles: 3, cycle_mult: 2, lr: 1.0e-2}]"
    out = tmp_path / "run"
    res = runner.invoke(app, ["fit", str(config(tmp_path, folder_data, stages)), "--smoke", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "lr: auto uses 0.001 in a smoke run" in (out / "log.txt").read_text()
    assert not list(out.glob("lr_find*"))  # no lr_find on two batches
    rows = read_table(out / "metrics.csv")
    assert [r["stage"] for r in rows] == ["a", "b"] and float(rows[0]["peak_lr"]) == pytest.approx(1e-3)


def test_smoke_config_keeps_stages_and_the_ratio_of_sizes(tmp_path, folder_data):
    stages = "[{epochs: 4, size: 224}, {schedule: sgdr, n_cycles: 3, cycle_len: 2, size: 299, save_cycles: true}]"
    small = smoke_config(load_config(config(tmp_path, folder_data, stages)))
    assert [(s.size, s.total_epochs) for s in small.train.stages] == [(24, 1), (32, 1)]


def test_a_loss_that_explodes_fails_the_smoke_run_and_keeps_its_directory(tmp_path, folder_data, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = config(tmp_path, folder_data, "[{epochs: 1, lr: 1.0e+4, schedule: constant}]")
    res = runner.invoke(app, ["fit", str(cfg), "--smoke"])
    assert res.exit_code == 1, res.output
    assert "smoke run: the loss" in res.output and "stage 'train', epoch 1, batch" in res.output
    assert "the smoke run's directory is kept for a look" in res.output
    assert len(list(tmp_path.glob("trainer-smoke-tiny-*"))) == 1


def test_a_passing_smoke_run_removes_its_throwaway_directory(tmp_path, folder_data, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = runner.invoke(app, ["fit", str(config(tmp_path, folder_data, "[{epochs: 2, lr: 1.0e-2}]")), "--smoke"])
    assert res.exit_code == 0, res.output
    assert "smoke run passed (its temporary run directory is removed" in res.output
    assert not list(tmp_path.glob("trainer-smoke-*"))

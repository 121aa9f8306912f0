"""Early stopping: a run whose validation loss rises stops after the patience is used up, says why
in log.txt and status.json, is not resumed as if unfinished, and resumes exactly when killed."""

import json
import math
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.runs import Crash, CrashAt, assert_same_run, metrics_without_seconds
from trainer.config import load_config
from trainer.run import fit as spine
from trainer.run.early_stop import EarlyStopState
from trainer.run.resume import ResumeError, find_unfinished
from trainer.train.loop import Callback

SIX = "[{name: all, epochs: 6, lr: 1.0e-2}]"


class RisingLoss(Callback):
    """Makes the validation loss 1, 2, 3, ... over the epochs (before anything reads it)."""

    order = -100
    sign = 1.0

    def after_epoch(self, learn):
        learn.state.valid["valid_loss"] = 10.0 + self.sign * (1.0 + learn.state.epoch)


class FallingLoss(RisingLoss):
    sign = -1.0


def config(tmp_path: Path, data: Path, early: str = "{patience: 2}") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(data, stages=SIX).replace("train:\n", f"train:\n  early_stop: {early}\n"))
    return cfg


def test_a_rising_loss_stops_the_run_after_the_patience(tmp_path, folder_data):
    cfg = config(tmp_path, folder_data)
    result = spine.fit(load_config(cfg), tmp_path / "run", callbacks=[RisingLoss()])
    run = tmp_path / "run"
    assert [r["epoch"] for r in result.metrics] == [1, 2, 3]  # best at 1, no better at 2 and 3
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped"
    assert "valid_loss has not improved" in status["reason"] and "best 11 at epoch 1" in status["reason"]
    assert "stopped early: valid_loss has not improved" in (run / "log.txt").read_text()
    assert (run / "losses.png").is_file()  # the run's files are complete
    with pytest.raises(ResumeError, match="stopped early"):
        spine.fit(load_config(cfg), resume=run)
    with pytest.raises(ResumeError, match="no unfinished run"):
        find_unfinished("tiny", tmp_path)  # --resume auto does not pick a stopped run


def test_a_run_that_keeps_improving_is_not_stopped(tmp_path, folder_data):
    cfg = load_config(config(tmp_path, folder_data, "{patience: 1}"))
    result = spine.fit(cfg, tmp_path / "run", callbacks=[FallingLoss()])
    assert len(result.metrics) == 6
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "crash", [(2, "after_epoch", 99), (3, "after_epoch", 30), (10, "after_batch", 99)], ids=["epoch", "verdict", "mid"]
)
def test_killed_and_resumed_it_stops_where_the_uninterrupted_run_stops(tmp_path, folder_data, crash):
    """The state rides in last.pt: killed before the verdict, after it (the checkpoint holds it,
    the stop had not happened yet) or mid-epoch, the resumed run stops after the same epoch."""
    cfg = config(tmp_path, folder_data)
    spine.fit(load_config(cfg), tmp_path / "reference", callbacks=[RisingLoss()])
    with pytest.raises(Crash):
        spine.fit(load_config(cfg), tmp_path / "run", callbacks=[RisingLoss(), CrashAt(*crash)])
    spine.fit(load_config(cfg), resume=tmp_path / "run", callbacks=[RisingLoss()])
    assert_same_run(tmp_path / "reference", tmp_path / "run")
    assert len(metrics_without_seconds(tmp_path / "run")) == 3
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "stopped"


def test_the_state_follows_its_rule():
    s = EarlyStopState("accuracy", "max", patience=2, min_delta=0.05)
    for row, value in enumerate([0.5, 0.54, math.nan, 0.56, 0.7], 1):
        s.update(value, row)
        assert s.exhausted == (row == 3)  # 0.54 and nan are no improvement of more than 0.05
        if s.exhausted:
            break
    assert (s.best, s.best_row, s.wait) == (0.5, 1, 2)
    s.load_state_dict({"best": 0.6, "best_row": 4, "wait": 0})
    s.update(0.66, 5)
    assert (s.best, s.wait) == (0.66, 0)


def test_an_unknown_monitor_is_a_config_error_with_a_hint(tmp_path, folder_data):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"c.yaml:\d+: train.early_stop.monitor: unknown metric 'acuracy'.*accuracy"):
        load_config(config(tmp_path, folder_data, "{monitor: acuracy}"))


def test_a_metric_the_task_does_not_report_is_refused_before_training(tmp_path, folder_data):
    with pytest.raises(ValueError, match="does not report 'fbeta'.*accuracy"):
        spine.fit(load_config(config(tmp_path, folder_data, "{monitor: fbeta}")), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.csv").exists()

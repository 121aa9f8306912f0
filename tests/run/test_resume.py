"""Exact resume, in-process: a crash at many moments, then --resume, gives the uninterrupted run."""

import functools
import json
import os
import shlex
import signal

import pytest
from typer.testing import CliRunner

from tests.runs import Crash, CrashAt, SendSignal, assert_same_run, metrics_without_seconds, resumable_config
from trainer import storage as checkpoint
from trainer.cli import app
from trainer.config import load_config
from trainer.run import fit as spine
from trainer.run.signals import Interrupted
from trainer.run.status import read_status

runner = CliRunner()


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory, folder_data):
    path = tmp_path_factory.mktemp("resume") / "tiny.yaml"
    path.write_text(resumable_config(folder_data))
    return path


@pytest.fixture(scope="module")
def reference(cfg_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    spine.fit(load_config(cfg_path), out)
    return out


def crash_then_resume(cfg_path, out, crash: CrashAt, sets=()):
    cfg = load_config(cfg_path, sets)
    with pytest.raises(Crash):
        spine.fit(cfg, out, callbacks=[crash])
    assert read_status(out) == "failed"
    spine.fit(load_config(cfg_path), resume=out)
    assert read_status(out) == "finished"


@pytest.mark.parametrize(
    "crash",
    [
        (1, "after_batch", 99),  # after the first step's checkpoint
        (4, "after_batch", 99),  # last batch of an epoch, before validation
        (1, "after_epoch", 15),  # metrics row written, checkpoint not yet
        (1, "after_epoch", 99),  # the stage's last checkpoint written: the next stage starts fresh
        (6, "after_batch", 99),  # mid-epoch in the second stage
        (12, "after_batch", 99),  # the very last step
        (2, "after_fit", 99),  # all trained, but not marked finished
    ],
    ids=[
        "step1",
        "epoch-end-batch",
        "between-metrics-and-checkpoint",
        "stage-boundary",
        "stage2-mid",
        "last-step",
        "after-training",
    ],
)
def test_crash_and_resume_equals_uninterrupted(cfg_path, reference, tmp_path, crash):
    crash_then_resume(cfg_path, tmp_path / "run", CrashAt(*crash))
    assert_same_run(reference, tmp_path / "run")


def test_work_since_the_last_checkpoint_is_redone_exactly(cfg_path, reference, tmp_path):
    # checkpoints every 3 batches: the crash at step 6 loses steps 5..6 (stage 2, batches 1..2);
    # a kill -9 during a save left a temporary file behind, which the resume clears
    out = tmp_path / "run"
    cfg = load_config(cfg_path, ["train.checkpoint_every=3"])
    with pytest.raises(Crash):
        spine.fit(cfg, out, callbacks=[CrashAt(6)])
    stale = out / "checkpoints" / ".last.pt.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    spine.fit(load_config(cfg_path), resume=out)
    assert not stale.exists()
    assert_same_run(reference, out)
    assert "resuming" in (out / "log.txt").read_text()


def test_metrics_rows_after_the_checkpoint_are_dropped_then_recomputed(cfg_path, reference, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(cfg_path)
    with pytest.raises(Crash):
        spine.fit(cfg, out, callbacks=[CrashAt(2, "after_epoch", order=15)])
    assert len(metrics_without_seconds(out)) == 2  # written before the crash, not in last.pt
    assert len(checkpoint.load(out / "checkpoints" / "last.pt")["metrics"]) == 1
    spine.fit(cfg, resume=out)
    assert metrics_without_seconds(out) == metrics_without_seconds(reference)


def test_checkpoint_holds_the_whole_loop_state(reference):
    state = checkpoint.load(reference / "checkpoints" / "last.pt")
    assert {
        "model",
        "optimizer",
        "scaler",
        "stage",
        "epoch",
        "batch",
        "rng",
        "train_loss_sum",
        "train_loss_count",
        "metrics",
        "callbacks",
        "skipped_steps",
    } <= set(state)
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert (state["stage"], state["epoch"], state["batch"]) == (1, 2, 0)
    steps = state["callbacks"]["recorder"]["steps"]
    assert steps["n"] == 12 and steps["columns"]["step"].tolist() == list(range(12))  # the whole run
    assert len(state["metrics"]) == 3


def test_resume_auto_takes_the_newest_unfinished_run(cfg_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_path)
    res = runner.invoke(app, ["fit", str(cfg_path), "--resume", "auto"])
    assert res.exit_code == 2 and "no unfinished run of 'tiny'" in res.output
    finished = spine.fit(cfg).run_dir
    for n in (2, 5):  # two crashed runs; the second was checkpointed last
        with pytest.raises(Crash):
            spine.fit(cfg, callbacks=[CrashAt(n)])
    runs = sorted(p for p in (tmp_path / "runs" / "tiny").iterdir() if p.name != finished.name)
    os.utime(runs[0] / "checkpoints" / "last.pt", ns=(1, 1))  # make the older one clearly older
    res = runner.invoke(app, ["fit", str(cfg_path), "--resume", "auto"])
    assert res.exit_code == 0, res.output
    assert f"run directory: {runs[1].relative_to(tmp_path)}" in res.output
    assert read_status(runs[1]) == "finished" and read_status(runs[0]) == "failed"
    res = runner.invoke(app, ["fit", str(cfg_path), "--resume", str(runs[1])])
    assert res.exit_code == 2 and "finished; nothing to resume" in res.output


def test_a_different_config_is_refused(cfg_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        spine.fit(load_config(cfg_path), out, callbacks=[CrashAt(2)])
    res = runner.invoke(app, ["fit", str(cfg_path), "--resume", str(out), "--set", "train.stages.1.lr=0.1"])
    assert res.exit_code == 2
    assert "differs from the run's config.yaml (train.stages.1.lr: 0.005 -> 0.1)" in res.output
    # settings that do not change the results may differ
    res = runner.invoke(app, ["fit", str(cfg_path), "--resume", str(out), "--set", "train.checkpoint_every=2"])
    assert res.exit_code == 0, res.output


def test_seed_comes_from_the_run_when_the_config_has_none(cfg_path, folder_data, tmp_path):
    text = resumable_config(folder_data).replace("seed: 0\n", "")
    path = tmp_path / "noseed.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        spine.fit(load_config(path), out, callbacks=[CrashAt(3)])
    seed = load_config(out / "config.yaml").seed
    assert isinstance(seed, int)
    res = runner.invoke(app, ["fit", str(path), "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert load_config(out / "config.yaml").seed == seed


def test_resume_refusals(cfg_path, tmp_path):
    res = runner.invoke(app, ["fit", str(cfg_path), "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "is not a run directory" in res.output
    res = runner.invoke(app, ["fit", str(cfg_path), "--resume", "auto", "--smoke"])
    assert res.exit_code == 2 and "do not go together" in res.output
    res = runner.invoke(app, ["fit", str(cfg_path), "--resume", "auto", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "leave out --out" in res.output


def test_status_file_tracks_the_run(reference):
    assert json.loads((reference / "status.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "signum, code, at", [(signal.SIGINT, 130, 6), (signal.SIGTERM, 143, 3), (signal.SIGTERM, 143, 4)]
)  # 4: the epoch's last batch
def test_a_signal_saves_at_the_step_boundary_and_prints_the_resume_command(
    cfg_path, reference, tmp_path, monkeypatch, signum, code, at
):
    out, before = tmp_path / "run", signal.getsignal(signal.SIGINT)  # SIG_IGN under a background shell
    monkeypatch.setattr(spine, "fit", functools.partial(spine.fit, callbacks=[SendSignal(signum, at)]))
    res = runner.invoke(app, ["fit", str(cfg_path), "--set", "train.checkpoint_every=epoch", "--out", str(out)])
    assert res.exit_code == code, res.output
    assert f"interrupted by {signal.Signals(signum).name}: saved checkpoints/last.pt at stage" in res.output
    command = f"trainer fit {cfg_path} --set train.checkpoint_every=epoch --resume {out}"
    assert f"resume with: {command}" in res.output
    assert read_status(out) == "interrupted"
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert state["epoch"] * 4 + state["batch"] + 4 * state["stage"] == at  # exactly after step `at`
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) == before  # handlers put back
    res = runner.invoke(app, shlex.split(command)[1:])
    assert res.exit_code == 0, res.output
    assert_same_run(reference, out)


def test_a_signal_during_validation_stops_after_the_epoch_checkpoint(cfg_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        spine.fit(load_config(cfg_path), out, callbacks=[SendSignal(signal.SIGINT, 2, "before_validate")])
    assert "(end of the epoch)" in str(e.value) and e.value.exit_code == 130
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert (state["stage"], state["epoch"], state["batch"]) == (1, 1, 0)
    assert len(metrics_without_seconds(out)) == 2


def test_a_run_in_use_is_neither_resumed_nor_picked_by_auto(cfg_path, tmp_path, monkeypatch):
    from trainer.run.status import lock as _lock

    monkeypatch.chdir(tmp_path)
    with pytest.raises(Crash):
        spine.fit(load_config(cfg_path), callbacks=[CrashAt(2)])
    run = next((tmp_path / "runs" / "tiny").iterdir())
    held = _lock(run)  # as a live training process holds it
    try:
        res = runner.invoke(app, ["fit", str(cfg_path), "--resume", str(run)])
        assert res.exit_code == 2 and "is being trained by another process right now" in res.output
        res = runner.invoke(app, ["fit", str(cfg_path), "--resume", "auto"])
        assert res.exit_code == 2 and "no unfinished run of 'tiny'" in res.output
        res = runner.invoke(app, ["fit", str(cfg_path), "--out", str(run)])
        assert res.exit_code == 2 and "is being trained by another process right now" in res.output
    finally:
        held.close()
    res = runner.invoke(app, ["fit", str(cfg_path), "--out", str(run)])  # not in use, but not empty either
    assert res.exit_code == 2 and "already holds a run (checkpoints/last.pt): continue it with --resume" in res.output


def test_log_and_plots_keep_the_whole_history_over_an_interruption(cfg_path, reference, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        spine.fit(load_config(cfg_path), out, callbacks=[SendSignal(signal.SIGINT, 6)])
    spine.fit(load_config(cfg_path), resume=out)
    log = (out / "log.txt").read_text()
    assert "interrupted by SIGINT: saved checkpoints/last.pt at stage 2/2 'all', epoch 1/2, after batch 2/4" in log
    assert "resuming" in log and "; command: " in log
    # losses.png's validation points: every epoch's, those before the interruption included
    points = checkpoint.load(out / "checkpoints" / "last.pt")["callbacks"]["recorder"]["points"]
    assert [p[0] for p in points] == [4, 8, 12] and len(points) == len(metrics_without_seconds(out))
    assert_same_run(reference, out)


def test_allow_changes_lets_stages_that_have_not_started_change(cfg_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        spine.fit(load_config(cfg_path), out, callbacks=[CrashAt(2)])  # in stage 1 ('head')
    resume = ["fit", str(cfg_path), "--resume", str(out)]
    res = runner.invoke(app, [*resume, "--set", "train.stages.1.epochs=1"])
    assert res.exit_code == 2 and "--allow-changes lets stages that have not started change" in res.output
    res = runner.invoke(app, [*resume, "--set", "train.stages.0.epochs=2", "--allow-changes"])
    assert res.exit_code == 2 and "lets stages from 2 on change" in res.output  # not the stage that is running
    res = runner.invoke(app, [*resume, "--set", "train.stages.1.epochs=1", "--allow-changes"])
    assert res.exit_code == 0, res.output
    assert [r["stage"] for r in metrics_without_seconds(out)] == ["head", "all"]  # 'all': 1 epoch, not 2
    assert "resumed with --allow-changes (train.stages.1.epochs: 2 -> 1)" in (out / "log.txt").read_text()
    assert (out / "config.yaml").read_text().startswith("# resumed with --allow-changes")
    assert load_config(out / "config.yaml").train.stages[1].epochs == 1

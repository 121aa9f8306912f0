"""Real processes killed for real: kill -9 mid-epoch, SIGTERM, a kill in the middle of a save,
a disk that fills up. Afterwards the run resumes to exactly the uninterrupted result."""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.runs import ROOT, assert_same_run, resumable_config
from trainer import storage as checkpoint
from trainer.cli import app
from trainer.config import load_config
from trainer.run import fit as spine
from trainer.run.signals import StopRequest, graceful_stop
from trainer.run.status import read_status

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, folder_data):
    tmp = tmp_path_factory.mktemp("kill")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(resumable_config(folder_data))
    spine.fit(load_config(cfg), tmp / "reference")
    return cfg, tmp / "reference"


def start(args: list[str], cwd: Path, step_seconds: float, log: Path) -> subprocess.Popen:
    """`python -m trainer ...` in its own process; tests/slow_steps makes each step take a while
    (see its sitecustomize) so the kill lands mid-run rather than racing the process."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "slow_steps")]),
        "TRAINER_TEST_STEP_SECONDS": str(step_seconds),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def wait_for_checkpoint(proc: subprocess.Popen, cwd: Path, after_ns: int = 0, timeout: float = 180) -> Path:
    """The run directory, once it has a last.pt newer than after_ns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for last in (cwd / "runs" / "tiny").glob("*/checkpoints/last.pt"):
            try:
                if last.stat().st_mtime_ns > after_ns:
                    return last.parent.parent
            except FileNotFoundError:
                pass
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before a checkpoint appeared"
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def test_kill_9_then_sigterm_then_resume_gives_the_uninterrupted_run(setup, tmp_path, monkeypatch):
    cfg, reference = setup
    rng = random.Random()
    # 1. kill -9 at a random moment after the first checkpoint (possibly in the middle of a save)
    proc = start(["fit", str(cfg)], tmp_path, 0.05, tmp_path / "first.log")
    run = wait_for_checkpoint(proc, tmp_path)
    monkeypatch.chdir(tmp_path)  # a live run is never resumed by a second process
    res = runner.invoke(app, ["fit", str(cfg), "--resume", str(run.relative_to(tmp_path))])
    assert res.exit_code == 2 and "is being trained by another process right now" in res.output, res.output
    monkeypatch.undo()
    time.sleep(rng.uniform(0, 0.1))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL, (tmp_path / "first.log").read_text()
    assert read_status(run) == "running"  # what a kill -9 leaves: auto must still find it
    # 2. resume it in a new process, and stop that one with SIGTERM after its first checkpoint
    before = (run / "checkpoints" / "last.pt").stat().st_mtime_ns
    proc = start(["fit", str(cfg), "--resume", "auto"], tmp_path, 0.05, tmp_path / "second.log")
    wait_for_checkpoint(proc, tmp_path, after_ns=before)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    output = (tmp_path / "second.log").read_text()
    assert code == 143, output
    assert "interrupted by SIGTERM" in output and f"--resume {run.relative_to(tmp_path)}" in output
    assert "Traceback" not in output
    # 3. resume again, to the end
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["fit", str(cfg), "--resume", "auto"])
    assert res.exit_code == 0, res.output
    assert read_status(run) == "finished"
    assert_same_run(reference, tmp_path / run.relative_to(tmp_path))


def test_a_kill_during_a_save_leaves_the_previous_last_pt(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}}, path)
    pid = os.fork()
    if pid == 0:  # the child dies by SIGKILL half-way through writing the next checkpoint
        try:

            def half_then_die(f):
                f.write(b"\x80\x02" * 2048)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            checkpoint.atomic_write_bytes(path, half_then_die)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    leftovers = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(leftovers) == 1  # kill -9 skips the cleanup; resume removes it
    assert checkpoint.remove_stale_temps(tmp_path) == leftovers and not leftovers[0].exists()


def test_a_failing_save_keeps_the_last_good_checkpoint_and_the_run_resumes(setup, tmp_path, monkeypatch):
    cfg, reference = setup
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def disk_fills_up(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            f.write(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_up)
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(out)])
    assert res.exit_code == 1 and "best.pt: no space left to write it" in res.output, res.output
    assert "Traceback" not in res.output
    state = checkpoint.load(out / "checkpoints" / "last.pt")  # intact: the third save
    assert (state["stage"], state["epoch"], state["batch"]) == (0, 0, 3)
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert read_status(out) == "failed"
    monkeypatch.undo()
    res = runner.invoke(app, ["fit", str(cfg), "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert_same_run(reference, out)


def test_a_second_signal_exits_at_once():
    exits = []
    stop = StopRequest(exit_now=exits.append)
    stop(signal.SIGINT)
    assert stop.requested and exits == []
    stop(signal.SIGINT)
    assert exits == [130]
    stop2 = StopRequest(exit_now=exits.append)
    stop2(signal.SIGTERM)
    stop2(signal.SIGTERM)
    assert exits == [130, 143]


def test_handlers_are_installed_only_while_training():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with graceful_stop() as stop:
        assert signal.getsignal(signal.SIGINT) is stop and signal.getsignal(signal.SIGTERM) is stop
        os.kill(os.getpid(), signal.SIGINT)  # caught: no KeyboardInterrupt
        assert stop.signum == signal.SIGINT
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_before_training_starts_is_a_clean_exit(setup, tmp_path, monkeypatch):
    cfg, _ = setup

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(spine, "open_session", interrupted)
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 130 and "interrupted before training started: nothing to save" in res.stderr

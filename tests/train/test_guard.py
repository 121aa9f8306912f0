"""The non-finite guard: a NaN/inf loss or gradient stops the run with where and why (or is
skipped and counted), and nothing non-finite is ever written over last.pt or best.pt."""

import math

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from tests.conftest import tiny_config
from trainer.cli import app
from trainer.config import load_config
from trainer.data.loaders import ImageBatches
from trainer.run import fit as spine
from trainer.run.learner import ORDER
from trainer.run.status import read_status
from trainer.train import callbacks as cbs
from trainer.train.guard import NonFiniteGuard, TrainingDiverged
from trainer.train.loop import Callback, Learner
from trainer.train.tasks import make_task

runner = CliRunner()


class Poison(Callback):
    """At the given (1-based) steps: a NaN loss, or an infinite gradient, or infinite weights."""

    order = 0

    def __init__(self, loss_steps=(), grad_steps=(), weight_steps=()):
        self.loss_steps, self.grad_steps, self.weight_steps = set(loss_steps), set(grad_steps), set(weight_steps)
        self.before: dict[int, dict] = {}

    def _n(self, learn) -> int:
        return learn.state.step + 1

    def before_batch(self, learn) -> None:
        self.before[self._n(learn)] = {k: v.clone() for k, v in learn.model.state_dict().items()}

    def after_loss(self, learn) -> None:
        if self._n(learn) in self.loss_steps:
            learn.loss_t = learn.loss_t * math.nan
            learn.state.loss = math.nan
        if self._n(learn) in self.grad_steps:  # the loss is fine, its gradient is not
            self.hooks = [p.register_hook(lambda g: g * math.inf) for p in learn.model.parameters() if p.ndim > 1]

    def after_backward(self, learn) -> None:
        for h in getattr(self, "hooks", []):
            h.remove()
        self.hooks = []

    def after_batch(self, learn) -> None:
        if learn.state.step in self.weight_steps:
            with torch.no_grad():
                next(learn.model.parameters()).fill_(math.inf)


def tiny_learner(mode: str, poison: Poison, n: int = 64, bs: int = 8) -> Learner:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    dl = ImageBatches(images, labels, bs, 8, torch.tensor([0.5]), torch.tensor([0.25]), shuffle=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard, recorder = NonFiniteGuard(mode), cbs.Recorder("s")
    guard.order, recorder.order = ORDER["guard"], ORDER["recorder"]  # as the learner builder places them
    learn = Learner(model, opt, make_task("single_label"), dl, dl.with_(shuffle=False), [guard, recorder, poison])
    learn.recorder = recorder
    return learn


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_stop_names_the_step_the_lr_and_the_last_finite_loss(kind):
    poison = Poison(loss_steps=[5] if kind == "loss" else [], grad_steps=[5] if kind == "grad" else [])
    learn = tiny_learner("stop", poison)
    with pytest.raises(TrainingDiverged) as e:
        learn.fit(2)
    msg = str(e.value)
    what = "the loss" if kind == "loss" else "the gradient norm"
    last = learn.recorder.steps[-1]["loss"]  # step 4's
    assert msg.startswith(f"{what} is not finite at epoch 1, batch 5 (step 5 of 16), lr 0.1; ")
    assert f"last finite loss {last:.4g}" in msg and math.isfinite(last)
    for k, v in learn.model.state_dict().items():  # the bad step changed nothing
        assert torch.equal(v, poison.before[5][k]), k


def test_skip_mode_skips_and_counts_bad_steps():
    poison = Poison(loss_steps=[2, 9], grad_steps=[5])
    learn = tiny_learner("skip", poison)
    rows = []
    learn.add(
        type("Rows", (Callback,), {"order": 50, "after_epoch": lambda self, l: rows.append(learn.recorder.last_row)})()
    )
    state = learn.fit(2)
    assert state.skipped_steps == 3
    assert [r.get("skipped_steps") for r in rows] == [2, 3]
    for step in (2, 5, 9):  # the weights before the next step are those from before the bad one
        for k, v in poison.before[step + 1].items():
            assert torch.equal(v, poison.before[step][k]), (step, k)
    assert not torch.equal(poison.before[4]["1.weight"], poison.before[3]["1.weight"])  # good steps train
    assert math.isfinite(state.valid["valid_loss"])


@pytest.fixture()
def cfg_path(tmp_path, folder_data):
    path = tmp_path / "c.yaml"
    path.write_text(tiny_config(folder_data, stages="[{epochs: 3, lr: 1.0e-2}]") + "  checkpoint_every: 1\n")
    return path


def checkpoint_bytes(run):
    return {n: (run / "checkpoints" / n).read_bytes() for n in ("last.pt", "best.pt")}


class Snapshot(Callback):
    """The checkpoint files as they were just before step n (order -20: before anything else)."""

    order = -20

    def __init__(self, run, n):
        self.run, self.n, self.files = run, n, None

    def before_batch(self, learn):
        if learn.state.step + 1 == self.n:
            self.files = checkpoint_bytes(self.run)


@pytest.mark.parametrize("kind", ["loss", "grad", "weight"])
def test_a_diverged_run_leaves_last_and_best_as_they_were(cfg_path, tmp_path, kind):
    out = tmp_path / "run"
    poison = Poison(**{f"{kind}_steps": [6]})
    snap = Snapshot(out, 6)
    with pytest.raises(TrainingDiverged) as e:
        spine.fit(load_config(cfg_path), out, callbacks=[poison, snap])
    assert "not finite" in str(e.value)
    assert checkpoint_bytes(out) == snap.files  # nothing written after the bad step
    assert read_status(out) == "diverged"


def test_cli_divergence_is_a_clean_error(folder_data, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(tiny_config(folder_data, stages="[{epochs: 2, lr: 1.0e+6}]") + "  optimizer: sgd\n")
    res = runner.invoke(app, ["fit", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1, res.output
    assert "error: the loss is not finite at epoch 1, batch" in res.output
    assert "lr 1e+06; last finite loss" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["fit", str(path), "--out", str(tmp_path / "run2"), "--set", "train.on_nan=skip"])
    assert res.exit_code == 0, res.output  # skipped, counted, and the run goes on
    assert "skipped_steps" in (tmp_path / "run2" / "metrics.csv").read_text().splitlines()[0]


def test_best_pt_only_ever_improves(tmp_path):
    from types import SimpleNamespace

    from trainer import storage as checkpoint
    from trainer.run.checkpoints import BestSoFar, Checkpointer
    from trainer.run.rundir import RunDir, new_run_dir
    from trainer.train.loop import FitState

    run = RunDir(new_run_dir("x", tmp_path / "run"))
    saver = Checkpointer(
        run, lambda learn, end: {"model": {"w": torch.tensor([float(learn.state.epoch)])}}, BestSoFar()
    )
    learn = SimpleNamespace(state=FitState(), opt=None)
    for epoch, loss in enumerate([1.0, 0.5, 0.7, math.nan, math.inf, 0.6]):
        learn.state.epoch, learn.state.valid = epoch, {"valid_loss": loss}
        saver.after_epoch(learn)
    best = checkpoint.load(run.checkpoints / "best.pt")
    assert best["best_valid_loss"] == 0.5 and best["model"]["w"].item() == 1.0
    assert checkpoint.load(run.checkpoints / "last.pt")["model"]["w"].item() == 5.0
    # after a resume, the best loss so far comes back with the checkpoint: 0.55 is no better
    resumed = Checkpointer(run, saver.snapshot, BestSoFar(saver.best.value))
    learn.state.epoch, learn.state.valid = 6, {"valid_loss": 0.55}
    resumed.after_epoch(learn)
    assert checkpoint.load(run.checkpoints / "best.pt")["model"]["w"].item() == 1.0

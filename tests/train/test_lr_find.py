import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import tiny_config
from tests.playbook_util import assert_same, differs, learner_for, session, snapshot
from trainer.cli import app
from trainer.run.plots import smoothed
from trainer.run.rundir import read_table
from trainer.train import lr_find as LF

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder_data):
    """A BN model (torchvision BatchNorm2d with num_batches_tracked, and the head's BatchNorm1d)
    whose optimizer already holds state: one epoch of training first."""
    tmp = tmp_path_factory.mktemp("lrf")
    sess = session(tmp, folder_data, "[{epochs: 1, lr: 1.0e-2, schedule: constant}]", arch="resnet18")
    learn = learner_for(sess)
    learn.fit(1)
    assert learn.opt.state  # AdamW moments exist, so restoring them is tested
    return learn


def test_lr_find_restores_every_tensor_of_model_and_optimizer(trained):
    learn = trained
    model0, opt0 = snapshot(learn.model), snapshot(learn.opt)
    modes0 = [m.training for m in learn.model.modules()]
    flags0 = [p.requires_grad for p in learn.model.parameters()]
    rng0 = torch.get_rng_state()
    result = LF.lr_find(learn, 1e-5, 1.0, num_it=6)
    assert len(result.lrs) >= 2
    assert_same(model0, snapshot(learn.model), "model")  # weights and every BN buffer
    assert_same(opt0, snapshot(learn.opt), "optimizer")  # moments, steps, lrs, betas
    assert [m.training for m in learn.model.modules()] == modes0
    assert [p.requires_grad for p in learn.model.parameters()] == flags0
    assert torch.equal(torch.get_rng_state(), rng0)


def test_the_restore_check_can_fail(trained, monkeypatch):
    """Without the restore, the same run changes weights, BN buffers and the optimizer."""
    learn = trained
    model0, opt0 = snapshot(learn.model), snapshot(learn.opt)
    monkeypatch.setattr(LF, "restored", lambda learn: contextlib.nullcontext())
    LF.lr_find(learn, 1e-3, 1.0, num_it=3)
    changed = differs(model0, snapshot(learn.model))
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("weight") for k in changed)
    with pytest.raises(AssertionError):
        assert_same(opt0, snapshot(learn.opt))


def test_lr_find_is_deterministic_whatever_the_global_seed(tmp_path, folder_data):
    sess = session(tmp_path, folder_data, "[{epochs: 1, lr: 1.0e-2}]", arch="bnresnet, ps: 0.5")
    learn = learner_for(sess)
    torch.manual_seed(1)
    a = LF.lr_find(learn, num_it=12)
    torch.manual_seed(2)
    b = LF.lr_find(learn, num_it=12)
    assert a.losses == b.losses and a.lrs == b.lrs and a.suggestions == b.suggestions


def test_ramp_smoothing_and_stop_at_four_times_the_best(trained):
    result = LF.lr_find(trained, 1e-4, 1e4, num_it=40)
    n = len(result.lrs)
    assert result.stopped in ("diverged", "not finite") and n < 40
    for i, lr in enumerate(result.lrs):  # exponential: start * (end/start) ** (i / (num_it - 1))
        assert lr == pytest.approx(1e-4 * (1e8) ** (i / 39))
    assert result.smoothed == pytest.approx(smoothed(result.losses, 0.98))
    assert result.smoothed[0] == pytest.approx(result.losses[0])  # bias-corrected: no pull to 0
    if result.stopped == "diverged":
        assert result.smoothed[-1] > 4 * min(result.smoothed)
        assert all(s <= 4 * min(result.smoothed[: i + 1]) for i, s in enumerate(result.smoothed[:-1]))


def test_differential_lrs_keep_their_ratios_and_the_last_group_is_reported():
    groups = [{"lr": 1 / 9}, {"lr": 1 / 3}, {"lr": 1.0}]  # the stage's lrs, as its fresh optimizer holds them
    learn = SimpleNamespace(opt=SimpleNamespace(param_groups=groups), state=SimpleNamespace(loss=1.0))
    finder = LF.LrFinder(1e-6, 1.0, num_it=7)
    finder.before_fit(learn)
    finder.before_batch(learn)
    finder.after_batch(learn)
    finder.before_batch(learn)
    lr = 1e-6 * 1e6 ** (1 / 6)
    assert [g["lr"] for g in groups] == pytest.approx([lr / 9, lr / 3, lr])
    assert finder.lrs == pytest.approx([1e-6])


def test_suggestions_on_a_known_curve():
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    x = [math.log10(lr) for lr in lrs]
    # flat, then falling fastest at 1e-3, lowest at 1e-1, then blowing up
    losses = [2.0 - math.tanh(2 * (v + 3)) if v <= -1 else 2.0 - math.tanh(4) + 5 * (v + 1) ** 2 for v in x]
    s = LF.suggest(lrs, losses, 100)
    steep = min(range(99), key=lambda i: (losses[i + 1] - losses[i]) / (x[i + 1] - x[i]))
    assert s["steep"] == lrs[steep] and abs(math.log10(s["steep"]) + 3) < 0.1
    assert s["minimum"] == pytest.approx(lrs[losses.index(min(losses[10:95]))] / 10)
    assert 1e-4 < s["valley"] < 1e-1  # on the falling stretch, before the minimum
    assert set(LF.suggest(lrs[:2], losses[:2])) == {"valley", "steep", "minimum"}  # short curves work


def test_lr_find_never_leaks_into_the_training_that_follows(tmp_path, folder_data):
    """Same seed, same stage: training after an lr_find is bitwise the training without one."""
    stages = "[{epochs: 1, lr: 1.0e-2, schedule: one_cycle}]"
    plain = learner_for(session(tmp_path, folder_data, stages, arch="bnresnet, ps: 0.5", name="a"))
    plain.fit(1)
    probed = learner_for(session(tmp_path, folder_data, stages, arch="bnresnet, ps: 0.5", name="b"))
    LF.lr_find(probed, num_it=8)
    assert not probed.opt.state  # the stage's optimizer is fresh: nothing carried over
    probed.fit(1)
    assert_same(snapshot(plain.model), snapshot(probed.model), "model")
    assert_same(snapshot(plain.opt), snapshot(probed.opt), "optimizer")


def test_lr_auto_in_fit_records_and_uses_the_recommendation(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, stages="[{name: head, epochs: 1, freeze: body, lr: auto}]"))
    out = tmp_path / "run"
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    found = json.loads((out / "lr_find-head.json").read_text())
    assert found["lr"] == found["suggestions"][found["recommended"]]
    assert (out / "lr_find-head.png").read_bytes().startswith(PNG)
    assert len(read_table(out / "lr_find-head.csv")) >= 2
    rows = read_table(out / "metrics.csv")
    assert float(rows[0]["peak_lr"]) == pytest.approx(found["lr"], rel=1e-5)
    steps = read_table(out / "schedule.csv")
    assert max(float(r["lr"]) for r in steps) == pytest.approx(found["lr"], rel=1e-5)  # 1cycle's peak
    assert "lr_find over" in (out / "log.txt").read_text()


def test_cli_lr_find_uses_the_stage_and_writes_csv_and_png(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        tiny_config(
            folder_data,
            stages="[{name: head, epochs: 1, freeze: body}, {name: all, epochs: 1, unfreeze: true, lr: {max: 1.0e-2}}]",
        )
    )
    out = tmp_path / "lf"
    res = runner.invoke(
        app,
        [
            "lr-find",
            str(cfg),
            "--stage",
            "head",
            "--num-it",
            "8",
            "--start-lr",
            "1e-5",
            "--end-lr",
            "1",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "recommended" in res.output and "valley" in res.output
    rows = read_table(out / "lr_find.csv")
    assert list(rows[0]) == ["step", "lr", "loss", "smoothed_loss"] and 2 <= len(rows) <= 8
    assert float(rows[0]["lr"]) == pytest.approx(1e-5)
    assert (out / "lr_find.png").read_bytes().startswith(PNG)
    assert "'head' (first trainable group 2)" in (out / "log.txt").read_text()
    res = runner.invoke(app, ["lr-find", str(cfg), "--stage", "all", "--num-it", "4", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "'all' (first trainable group 0)" in (tmp_path / "b" / "log.txt").read_text()


def test_cli_lr_find_user_errors_exit_2(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, stages="[{name: head, epochs: 1}]"))
    res = runner.invoke(app, ["lr-find", str(cfg), "--stage", "haed", "--num-it", "4", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no stage named 'haed' (stages: head)" in res.output
    res = runner.invoke(app, ["lr-find", str(cfg), "--start-lr", "1", "--end-lr", "0.1"])
    assert res.exit_code == 2 and "0 < start lr < end lr" in res.output
    assert "Traceback" not in res.output


def test_the_plot_leaves_out_the_diverging_tail():
    from trainer.run.plots import useful_part

    curve = [2.0, 2.0, 1.8, 1.2, 0.9, 1.1, 1.9, 2.5, 9.0, 40.0]  # flat, the dip, then the blow-up
    assert useful_part(curve) == 7  # up to where it passes its start (2.0) after the dip
    assert useful_part([2.0, 1.5, 1.0, 0.8]) == 4  # no tail: all of it
    assert useful_part([2.0, float("nan"), 1.0]) == 3


def test_lr_find_writes_no_empty_checkpoints_folder(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data))
    res = runner.invoke(app, ["lr-find", str(cfg), "--num-it", "6", "--out", str(tmp_path / "lrf")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "lrf").iterdir() if p.name.startswith("lr_find")) == [
        "lr_find.csv",
        "lr_find.json",
        "lr_find.png",
    ]
    assert not (tmp_path / "lrf" / "checkpoints").exists()

"""Freezing, differential learning rates, SGDR snapshots and the schedule record of a run."""

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import CLASSES, tiny_config
from tests.playbook_util import differs, learner_for, session, snapshot
from trainer import storage as checkpoint
from trainer.cli import app
from trainer.config import load_config
from trainer.inference.finished import load_run
from trainer.inference.predict import predict_folder
from trainer.models.layers import is_norm
from trainer.run.fit import train_stages as run_stages
from trainer.run.learner import stage_learner
from trainer.run.rundir import read_table
from trainer.run.session import smoke_sizes
from trainer.train.plan import StageError
from trainer.train.schedule import one_cycle, sgdr

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def norm_buffers(module) -> dict:
    return {
        f"{i}.{k}": v.clone()
        for i, m in enumerate(module.modules())
        if is_norm(m)
        for k, v in m.named_buffers(recurse=False)
    }


def frozen_run(tmp_path, data, arch: str, stage: str):
    sess = session(tmp_path, data, f"[{{name: s, epochs: 1, lr: 1.0e-2, {stage}}}]", arch=arch)
    body = sess.built.groups[:-1]
    before = [snapshot(g) for g in body], snapshot(sess.built.groups[-1]), norm_buffers(sess.built.model)
    run_stages(sess)
    after = [snapshot(g) for g in body], snapshot(sess.built.groups[-1]), norm_buffers(sess.built.model)
    return before, after


@pytest.mark.parametrize("arch", ["resnet18", "bnresnet"])
def test_frozen_stage_leaves_every_frozen_parameter_and_bn_buffer_bitwise_unchanged(tmp_path, folder_data, arch):
    (body0, head0, _), (body1, head1, _) = frozen_run(tmp_path, folder_data, arch, "freeze: body")
    for g0, g1 in zip(body0, body1, strict=True):
        assert differs(g0, g1) == []  # weights, running_mean/var, num_batches_tracked
    assert differs(head0, head1)  # and the head did train


def test_train_bn_lets_frozen_batchnorm_learn(tmp_path, folder_data):
    (body0, _, bn0), (body1, _, bn1) = frozen_run(tmp_path, folder_data, "resnet18", "freeze: body, train_bn: true")
    changed = [k for g0, g1 in zip(body0, body1, strict=True) for k in differs(g0, g1)]
    assert any(k.endswith("running_mean") for k in changed)  # statistics move
    assert any(k.endswith("bn1.weight") for k in changed)  # and the affine params train
    assert not any(k.endswith("conv1.weight") for k in changed)  # convolutions stay frozen


def test_bn_freeze_keeps_all_statistics_even_unfrozen(tmp_path, folder_data):
    (body0, head0, bn0), (body1, head1, bn1) = frozen_run(
        tmp_path, folder_data, "resnet18", "unfreeze: true, bn_freeze: true"
    )
    assert differs(bn0, bn1) == []
    assert any(k.endswith("conv1.weight") for g0, g1 in zip(body0, body1, strict=True) for k in differs(g0, g1))


def test_resnet_layer_groups_as_fastai(tmp_path, folder_data):
    sess = session(tmp_path, folder_data, "[{epochs: 1}]", arch="resnet18")
    g = sess.built.groups
    names = [[type(m).__name__ for m in grp.children()] for grp in g[:2]]
    assert names == [
        ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Sequential", "Sequential"],
        ["Sequential", "Sequential"],
    ]
    assert g[2] is sess.built.model.head and len(g) == 3


def test_differential_lrs_and_weight_decay_per_group(tmp_path, folder_data):
    sess = session(
        tmp_path, folder_data, "[{epochs: 1, lr: {max: 9.0e-2, ratio: 3}, wd: [0.3, 0.2, 0.1]}]", arch="resnet18"
    )
    learn, handles = stage_learner(sess, sess.plan.stages[0])
    opt = learn.opt
    peaks = {g["layer_group"]: handles.schedule.peaks[g["layer_group"]] for g in opt.param_groups}
    assert [peaks[i] for i in range(3)] == pytest.approx([0.01, 0.03, 0.09])  # [lr/9, lr/3, lr]
    for g in opt.param_groups:
        has_matrix = any(p.ndim > 1 for p in g["params"])
        assert g["weight_decay"] == (pytest.approx([0.3, 0.2, 0.1][g["layer_group"]]) if has_matrix else 0.0)
    with pytest.raises(StageError, match="lists 2 values but the model has 3 layer groups"):
        session(tmp_path, folder_data, "[{epochs: 1, lr: [1.0e-4, 1.0e-3]}]", arch="resnet18", name="bad")


def test_unfrozen_stage_trains_with_the_ratios_of_the_groups(tmp_path, folder_data):
    sess = session(tmp_path, folder_data, "[{epochs: 1, lr: [1.0e-4, 1.0e-3, 1.0e-2], schedule: one_cycle}]")
    learn = learner_for(sess)
    learn.fit(1)
    lrs = {g["layer_group"]: g["lr"] for g in learn.opt.param_groups}
    assert lrs[0] / lrs[2] == pytest.approx(1e-2) and lrs[1] / lrs[2] == pytest.approx(1e-1)


@pytest.fixture(scope="module")
def sgdr_run(tmp_path_factory, folder_data):
    """Two SGDR stages: 2 cycles of 1 epoch (cycle_mult 1), then 1 + 2 epochs (cycle_mult 2)."""
    tmp = tmp_path_factory.mktemp("sgdr")
    cfg = tmp / "c.yaml"
    cfg.write_text(
        tiny_config(
            folder_data,
            stages="""
    - {name: a, schedule: sgdr, n_cycles: 2, cycle_len: 1, cycle_mult: 1, lr: 2.0e-2, save_cycles: true}
    - {name: b, schedule: sgdr, n_cycles: 2, cycle_len: 1, cycle_mult: 2, lr: 1.0e-2, save_cycles: true}""",
        )
    )
    out = tmp / "run"
    res = runner.invoke(app, ["fit", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_sgdr_saves_a_snapshot_at_each_cycle_end(sgdr_run):
    files = sorted(p.name for p in (sgdr_run / "checkpoints").glob("cycle-*.pt"))
    assert files == ["cycle-1.pt", "cycle-2.pt", "cycle-3.pt", "cycle-4.pt"]
    ends = [
        (s["stage"], s["epoch"]) for s in (checkpoint.load(sgdr_run / f"checkpoints/cycle-{k}.pt") for k in range(1, 5))
    ]
    assert ends == [(0, 1), (0, 2), (1, 1), (1, 3)]
    last = checkpoint.load(sgdr_run / "checkpoints/last.pt")["model"]
    final = checkpoint.load(sgdr_run / "checkpoints/cycle-4.pt")["model"]
    assert differs(last, final) == []  # the run ends with the end of its last cycle


def test_schedule_csv_records_every_step_against_the_formulas(sgdr_run):
    rows = read_table(sgdr_run / "schedule.csv")
    assert list(rows[0]) == ["stage", "step", "lr", "mom", "loss"]
    assert [int(r["step"]) for r in rows] == list(range(len(rows)))
    a = [float(r["lr"]) for r in rows if r["stage"] == "a"]
    b = [float(r["lr"]) for r in rows if r["stage"] == "b"]
    assert len(a) == 8 and len(b) == 12  # 4 batches an epoch
    fa, fb = sgdr([1, 1]).lr, sgdr([1, 2]).lr
    assert a == pytest.approx([2e-2 * fa(i / 8) for i in range(8)], rel=1e-5)  # 6 digits in the csv
    assert b == pytest.approx([1e-2 * fb(i / 12) for i in range(12)], rel=1e-5)
    assert a[4] == pytest.approx(2e-2, rel=1e-5) and b[4] == pytest.approx(1e-2, rel=1e-5)  # restarts at the top
    for name in ("schedule.png", "losses.png"):
        assert (sgdr_run / name).read_bytes().startswith(PNG)


def test_one_cycle_momentum_is_recorded(tmp_path, folder_data):
    sess = session(tmp_path, folder_data, "[{name: s, epochs: 2, lr: 1.0e-2}]")
    run_stages(sess)
    rows = read_table(sess.run.path / "schedule.csv")
    sched = one_cycle()
    assert [float(r["mom"]) for r in rows] == pytest.approx([sched.mom(i / 8) for i in range(8)], rel=1e-5)
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-2 * sched.lr(i / 8) for i in range(8)], rel=1e-5)


def test_predict_ensemble_averages_the_cycle_snapshots(sgdr_run, folder_data, tmp_path):
    out = tmp_path / "ens.csv"
    res = runner.invoke(
        app, ["predict", str(sgdr_run), "--data", str(folder_data / "test"), "--out", str(out), "--ensemble", "cycles"]
    )
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    run = load_run(sgdr_run)
    probs = []
    for k in range(1, 5):
        run.built.model.load_state_dict(checkpoint.load(sgdr_run / f"checkpoints/cycle-{k}.pt")["model"])
        probs.append(predict_folder(run, folder_data / "test")[1])
    mean = torch.stack(probs).mean(0)
    assert df[CLASSES].to_numpy() == pytest.approx(mean.numpy(), abs=1e-6)
    assert list(df["label"]) == [CLASSES[i] for i in mean.argmax(1).tolist()]
    assert not torch.allclose(probs[0], probs[-1])  # the snapshots really differ


def test_predict_ensemble_without_snapshots_is_a_clear_error(tmp_path, folder_data):
    sess = session(tmp_path, folder_data, "[{epochs: 1}]")
    run_stages(sess)
    res = runner.invoke(
        app, ["predict", str(sess.run.path), "--data", str(folder_data / "test"), "--ensemble", "cycles"]
    )
    assert res.exit_code == 2 and "no checkpoints/cycle-<k>.pt" in res.output
    res = runner.invoke(app, ["predict", str(sess.run.path), "--data", str(folder_data / "test"), "--ensemble", "tta"])
    assert res.exit_code == 2 and "--ensemble must be none or cycles" in res.output


def test_save_cycles_needs_sgdr(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, stages="[{epochs: 2, save_cycles: true}]"))
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2 and "save_cycles needs schedule: sgdr" in res.output


def test_smoke_scales_image_sizes_keeping_their_ratio(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(tiny_config(folder_data, stages="[{epochs: 1, size: 224}, {epochs: 1, size: 299}]"))
    small = smoke_sizes(load_config(cfg))
    assert [s.size for s in small.train.stages] == [24, 32]  # the largest at 32 px, the ratio kept
    cfg.write_text(tiny_config(folder_data, stages="[{epochs: 1, size: 32}]"))
    assert smoke_sizes(load_config(cfg)).train.stages[0].size == 32


def test_nesterov_reaches_the_sgd_optimizer(tmp_path, folder_data):
    def opt(extra):
        sess = session(tmp_path, folder_data, "[{epochs: 1, lr: 1.0e-2}]", name=f"n{len(extra)}")
        sess.cfg.train = sess.cfg.train.model_copy(update={"optimizer": "sgd", **extra})
        return learner_for(sess).opt

    assert all(g["nesterov"] for g in opt({"nesterov": True}).param_groups)
    assert not any(g["nesterov"] for g in opt({}).param_groups)

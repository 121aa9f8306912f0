"""Speed work must not change results: the loss kept on the device gives the same numbers as
reading it every batch, the deferred NaN check still names the first bad step."""

import math

import pytest
import torch
import torch.nn as nn

from trainer.data.loaders import ImageBatches
from trainer.run.learner import ORDER
from trainer.train import callbacks as cbs
from trainer.train.guard import NonFiniteGuard, TrainingDiverged
from trainer.train.loop import Callback, Learner
from trainer.train.tasks import make_task


def placed(name: str, cb: Callback) -> Callback:
    """A callback at its place in the run's table (as the learner builder puts it)."""
    cb.order = ORDER[name]
    return cb


class ItemEveryBatch(Callback):
    """The old way: .item() the loss after every batch and sum Python floats."""

    order = 50

    def __init__(self):
        self.losses: list[float] = []

    def after_batch(self, learn) -> None:
        self.losses.append(learn.loss_t.item())


def tiny_learner(callbacks, n: int = 80, bs: int = 8) -> Learner:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    dl = ImageBatches(images, labels, bs, 8, torch.tensor([0.5]), torch.tensor([0.25]), shuffle=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Learner(model, opt, make_task("single_label"), dl, dl.with_(shuffle=False), callbacks)


def test_lazy_loss_sum_equals_per_batch_item():
    item = ItemEveryBatch()
    rec = placed("recorder", cbs.Recorder("s"))
    learn = tiny_learner([placed("guard", NonFiniteGuard("stop")), rec, item])
    learn.fit(1)
    expected = 0.0
    for v in item.losses:
        expected += v
    assert learn.state.epoch_loss_sum == expected  # bitwise: same additions, same order
    assert learn.state.train_loss == expected / len(item.losses)
    assert [r["loss"] for r in rec.steps] == item.losses
    assert all(isinstance(r["loss"], float) for r in rec.steps)


def test_a_loss_set_by_a_callback_stays_on_the_models_device():
    # SyncLoss and Accumulate set state.loss; on a GPU a CPU loss then met CUDA tensors in the
    # NaN guard and the epoch's sum (seen under torchrun with NCCL). "meta" stands for the GPU here.
    from trainer.train.loop import FitState

    s = FitState(loss_t=torch.tensor(2.0, device="meta"))
    s.loss = 1.5
    assert s.loss_t.device.type == "meta"
    fresh = FitState()
    fresh.loss = 0.5
    assert fresh.loss_t.device.type == "cpu" and fresh.loss == 0.5


def test_restored_sum_continues_in_the_same_order():
    item = ItemEveryBatch()
    learn = tiny_learner([item])
    learn.state.epoch_loss_sum, learn.state.epoch_loss_count = 0.1, 1  # as resume.restore does
    learn.fit(1, start_epoch=0, start_batch=3)
    expected = 0.1
    for v in item.losses:
        expected += v
    assert learn.state.epoch_loss_sum == expected


def test_recorder_state_dict_flushes_pending_losses():
    rec = placed("recorder", cbs.Recorder("s"))
    learn = tiny_learner([rec, cbs.StopAfter(3)])
    learn.fit(1)
    rec.steps.append({"stage": "s", "step": len(rec.steps), "lr": 0.1, "mom": 0.0, "loss": torch.tensor(2.5)})
    rec._pending.append(len(rec.steps) - 1)
    state = rec.state_dict()
    assert all(isinstance(r["loss"], float) for r in rec.steps) and rec.steps[-1]["loss"] == 2.5
    assert state["steps"]


class PoisonLoss(Callback):
    order = 0

    def __init__(self, step: int):
        self.step = step

    def after_loss(self, learn) -> None:
        if learn.state.step + 1 == self.step:
            learn.loss_t = learn.loss_t * math.nan
            learn.state.loss_t = learn.loss_t.detach()


@pytest.mark.parametrize("every", [1, 4])
def test_deferred_guard_names_the_first_bad_step(every):
    rec = placed("recorder", cbs.Recorder("s"))
    learn = tiny_learner([placed("guard", NonFiniteGuard("stop", check_every=every)), rec, PoisonLoss(6)])
    with pytest.raises(TrainingDiverged) as e:
        learn.fit(2)
    assert str(e.value).startswith("the loss is not finite at epoch 1, batch 6 (step 6 of 20")
    assert f"last finite loss {rec.steps[4]['loss']:.4g}" in str(e.value)
    assert len(rec.steps) == (5 if every == 1 else 7)  # deferred: noticed at the check after step 8


def test_deferred_guard_checks_before_validation():
    learn = tiny_learner([NonFiniteGuard("stop", check_every=1000), PoisonLoss(9)])
    with pytest.raises(TrainingDiverged, match="batch 9 "):
        learn.fit(2)
    assert learn.state.epoch == 0  # stopped at the end of the first epoch, before validating it


def test_skip_mode_always_checks_every_step():
    assert NonFiniteGuard("skip", check_every=50).check_every == 1


@pytest.mark.parametrize("arch", ["resnet9", "bnresnet2d"])
def test_speed_archs_shapes_and_groups(arch):
    from trainer.config.schema import ModelConfig
    from trainer.models import create_model

    layers = [8, 16, 16, 32] if arch == "resnet9" else [4, 8, 8]
    built = create_model(ModelConfig(arch=arch, layers=layers), 10, 3, 32)
    for size in (32, 24):  # progressive resizing: any size the pools can take
        assert built.model(torch.randn(2, 3, size, size)).shape == (2, 10)
    grouped = {id(p) for g in built.groups for p in g.parameters()}
    assert grouped == {id(p) for p in built.model.parameters()}  # every weight is in a layer group
    built.model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(built.extra["head"](built.extra["features"](x)), built.model(x))


def test_resnet9_needs_four_widths():
    from trainer.config.schema import ModelConfig
    from trainer.models import create_model

    with pytest.raises(ValueError, match="4 widths"):
        create_model(ModelConfig(arch="resnet9", layers=[8, 16]), 10, 3, 32)


def test_data_on_device_gives_the_same_batches(tmp_path):
    from tests.conftest import make_folder_dataset, tiny_config
    from tests.playbook_util import prepare
    from trainer.config import load_config

    data = make_folder_dataset(tmp_path / "d", n_train=10, n_valid=4, size=16)
    batches = {}
    for on in (False, True):
        cfg = load_config(
            text=tiny_config(data), overrides=[f"data.on_device={str(on).lower()}", "transforms.preset=pad_crop"]
        )
        sess = prepare(cfg, tmp_path / f"run-{on}")
        assert sess.bundle.on_device is on
        train, valid = sess.bundle.loaders(8)
        train.set_epoch(1)
        batches[on] = [(x, y) for _, x, y in train.iterate()] + list(valid)
    for (xa, ya), (xb, yb) in zip(batches[False], batches[True], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_on_device_auto_keeps_images_on_a_gpu_only_when_they_fit():
    from types import SimpleNamespace

    from trainer.data.bundle import keep_on_device

    im = SimpleNamespace(
        train_x=torch.zeros(100, 3, 4, 4, dtype=torch.uint8),
        train_y=torch.zeros(100),
        valid_x=torch.zeros(10, 3, 4, 4, dtype=torch.uint8),
        valid_y=torch.zeros(10),
    )
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert keep_on_device("auto", im, cuda, free_bytes=10**6)
    assert not keep_on_device("auto", im, cuda, free_bytes=10**3)
    assert not keep_on_device("auto", im, cpu) and keep_on_device(True, im, cpu)


def test_threads_never_exceed_the_cpu_budget():
    from trainer.run.runtime import cpu_budget, set_threads

    assert 1 <= set_threads() <= max(cpu_budget(), torch.get_num_threads())


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_foreach_optimizers_match_the_per_parameter_loop(name):
    from trainer.train.optim import create_optimizer

    weights = {}
    for foreach in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
        opt = create_optimizer(name, [{"params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.01}])
        for g in opt.param_groups:
            g["foreach"] = foreach
        for _ in range(3):
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        weights[foreach] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False], strict=True))

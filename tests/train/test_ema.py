"""train.ema: the average follows its formula, validation and checkpoints use it, training itself
is untouched by it, and a run with it resumes exactly."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.runs import CrashAt, assert_same_run, assert_same_state, metrics_without_seconds, resumable_config
from trainer import storage as checkpoint
from trainer.config import load_config
from trainer.inference.evaluate import scores, validation_batches
from trainer.inference.finished import load_run
from trainer.inference.predict import predict_probs
from trainer.run import fit as spine
from trainer.train.ema import WeightAverage


def test_the_average_follows_its_formula_and_counters_follow_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    cb = WeightAverage(model, decay=0.9)
    cb.before_fit(None)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # moves the running statistics and the batch counter
        cb.after_batch(None)
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v if v.is_floating_point() else v.clone()
    for k, v in cb.avg.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    assert cb.avg["1.num_batches_tracked"] == 5


def test_validation_sees_the_average_and_training_the_raw_weights():
    model = nn.Linear(2, 2)
    cb = WeightAverage(model, decay=0.5)
    cb.before_fit(None)
    with torch.no_grad():
        model.weight.fill_(4.0)
    cb.after_batch(None)
    raw = model.weight.detach().clone()
    cb.before_validate(None)
    assert not torch.equal(model.weight, raw) and torch.equal(model.weight, cb.avg["weight"])
    cb.before_epoch(None)
    assert torch.equal(model.weight, raw)


def config(tmp_path, data, ema: float | None, name="ema", one_stage=False) -> Path:
    text = resumable_config(data, name=name)
    if one_stage:  # 3 epochs of one stage: the average is swapped in and out at each epoch end
        text = text.split("    - {name: head")[0] + "    - {name: all, epochs: 3, lr: 5.0e-3}\n"
    if ema is not None:
        text = text.replace("train:\n", f"train:\n  ema: {ema}\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder_data):
    tmp = tmp_path_factory.mktemp("ema")
    out = {}
    for ema in (None, 0.7):
        out[ema] = tmp / f"run-{ema}"
        spine.fit(load_config(config(tmp, folder_data, ema, one_stage=True)), out[ema])
    out["two stages"] = tmp / "run-two-stages"
    spine.fit(load_config(config(tmp, folder_data, 0.7)), out["two stages"])
    return out


def test_training_with_an_average_follows_the_same_path(runs):
    """The swaps around validation leave the optimizer's path bitwise as without the average."""
    plain = checkpoint.load(runs[None] / "checkpoints" / "last.pt")
    averaged = checkpoint.load(runs[0.7] / "checkpoints" / "last.pt")
    assert_same_state(plain["model"], averaged["callbacks"]["ema"]["raw"], "raw weights")
    assert_same_state(plain["optimizer"], averaged["optimizer"], "optimizer")
    assert [r["train_loss"] for r in metrics_without_seconds(runs[None])] == [
        r["train_loss"] for r in metrics_without_seconds(runs[0.7])
    ]


def test_checkpoints_and_metrics_are_of_the_average(runs):
    last = checkpoint.load(runs[0.7] / "checkpoints" / "last.pt")
    assert_same_state(last["model"], last["callbacks"]["ema"]["avg"], "model is the average")
    differ = [
        k
        for k, v in last["model"].items()
        if v.is_floating_point() and not torch.equal(v, last["callbacks"]["ema"]["raw"][k])
    ]
    assert differ  # and the average is not simply the raw weights
    # the model predict loads, run over the validation set again, gives the recorded valid_loss
    run = load_run(runs[0.7], "last", device="cpu")
    dl = validation_batches(run, log=lambda *_: None)
    probs = predict_probs(run, dl)
    rows = metrics_without_seconds(runs[0.7])
    assert scores(run, probs, dl.labels)["valid_loss"] == pytest.approx(float(rows[-1]["valid_loss"]), rel=1e-4)
    assert rows[-1]["valid_loss"] != metrics_without_seconds(runs[None])[-1]["valid_loss"]


@pytest.mark.parametrize(
    "crash",
    [(2, "after_batch", 99), (1, "after_epoch", 99), (7, "after_batch", 99), (2, "after_epoch", 99)],
    ids=["mid-epoch", "stage-boundary", "stage2-mid", "epoch-end-average-in-the-model"],
)
def test_a_run_with_an_average_resumes_exactly(runs, tmp_path, folder_data, crash):
    path = config(tmp_path, folder_data, 0.7)
    out = tmp_path / "run"
    with pytest.raises(Exception, match="after_"):
        spine.fit(load_config(path), out, callbacks=[CrashAt(*crash)])
    spine.fit(load_config(path), resume=out)
    assert_same_run(runs["two stages"], out)

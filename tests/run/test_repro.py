"""Reproducibility: same config and seed -> identical metrics and bitwise-identical weights on the
CPU; a random seed is recorded and replays the run; deterministic: true switches torch's
deterministic algorithms on (and false switches them off again)."""

import pytest
import torch

from tests.conftest import tiny_config
from tests.runs import assert_same_state, metrics_without_seconds
from trainer import storage as checkpoint
from trainer.config import load_config
from trainer.run import fit as spine
from trainer.train.loop import Callback


def run(cfg_path, out, sets=(), callbacks=()):
    spine.fit(load_config(cfg_path, sets), out, callbacks=callbacks)
    return out


@pytest.fixture()
def cfg_path(tmp_path, folder_data):
    path = tmp_path / "c.yaml"
    path.write_text(
        tiny_config(folder_data, arch="bnresnet", stages="[{epochs: 2, lr: 1.0e-2}]").replace(
            "arch: bnresnet", "arch: bnresnet, layers: [8, 16], ps: 0.25"
        )
        + "transforms: {preset: side_on}\n"
    )
    return path


def weights(out):
    return checkpoint.load(out / "checkpoints" / "last.pt")["model"]


def test_same_seed_same_metrics_and_bitwise_weights_other_seed_differs(cfg_path, tmp_path):
    a, b = run(cfg_path, tmp_path / "a"), run(cfg_path, tmp_path / "b")
    assert metrics_without_seconds(a) == metrics_without_seconds(b)
    assert_same_state(weights(a), weights(b))
    c = run(cfg_path, tmp_path / "c", ["seed=1"])
    assert metrics_without_seconds(c) != metrics_without_seconds(a)


def test_a_random_seed_is_recorded_and_replays_the_run(cfg_path, tmp_path):
    cfg_path.write_text(cfg_path.read_text().replace("seed: 0\n", ""))
    assert load_config(cfg_path).seed is None
    first = run(cfg_path, tmp_path / "first")
    recorded = load_config(first / "config.yaml")
    assert isinstance(recorded.seed, int)
    again = run(first / "config.yaml", tmp_path / "again")  # the run's own config.yaml replays it
    assert metrics_without_seconds(again) == metrics_without_seconds(first)
    assert_same_state(weights(again), weights(first))


class SeeDeterminism(Callback):
    def before_fit(self, learn):
        self.seen = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)


@pytest.mark.parametrize("on", [True, False])
def test_deterministic_switches_torch_deterministic_algorithms(cfg_path, tmp_path, on):
    probe = SeeDeterminism()
    torch.use_deterministic_algorithms(not on)  # the opposite of what the config asks for
    try:
        run(cfg_path, tmp_path / "r", [f"deterministic={str(on).lower()}", "train.stages.0.epochs=1"], [probe])
        assert probe.seen == (on, on)
    finally:
        torch.use_deterministic_algorithms(False)

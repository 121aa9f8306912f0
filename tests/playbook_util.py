"""Helpers for the playbook tests: a prepared session on generated data, deep state comparison."""

from __future__ import annotations

import copy

import torch

from tests.conftest import tiny_config
from trainer.config import load_config
from trainer.run.learner import stage_learner
from trainer.run.session import open_session as prepare
from trainer.train.plan import CONFIG_CHECKS


def session(tmp_path, data, stages: str, arch: str = "convnet2", name: str = "run", **over):
    path = tmp_path / f"{name}.yaml"
    path.write_text(tiny_config(data, arch=arch, stages=stages, **over))
    return prepare(load_config(path, [], checks=CONFIG_CHECKS), tmp_path / name)


def learner_for(sess, k: int = 0):
    return stage_learner(sess, sess.plan.stages[k])[0]


def snapshot(obj) -> dict:
    """A deep copy of a module's or an optimizer's state_dict (tensors cloned)."""
    return copy.deepcopy(obj.state_dict())


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested state: every tensor equal in dtype, shape and value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def differs(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]

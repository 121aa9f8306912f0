"""compile: true compiles once per (image size, batch size, train/eval), never once per step,
with progressive resizing. A counting backend stands in for inductor, so no C++ toolchain is
needed and the test takes seconds."""

import pytest
import torch
import torch.nn as nn

from trainer.data.loaders import ImageBatches
from trainer.run.runtime import compile_model
from trainer.train.loop import Learner
from trainer.train.tasks import make_task

dynamo = pytest.importorskip("torch._dynamo")


class CountingBackend:
    def __init__(self):
        self.shapes: list[tuple] = []

    def __call__(self, gm, example_inputs):
        images = [
            tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] >= 12
        ]  # the batch (conv weights are 4-d too, but 3x3)
        self.shapes.append(images[0] if images else None)
        return gm.forward  # run the captured graph as it is


def loaders(size: int, n_train: int = 32, n_valid: int = 12, bs: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (n_train + n_valid, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (n_train + n_valid,), generator=g)
    common = dict(bs=bs, size=size, mean=torch.tensor([0.5] * 3), std=torch.tensor([0.25] * 3))
    train = ImageBatches(x[:n_train], y[:n_train], shuffle=True, drop_last=True, **common)
    return train, ImageBatches(x[n_train:], y[n_train:], **common)


def test_one_compile_per_size_and_mode_not_per_step():
    dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    counter = CountingBackend()
    compile_model(model, backend=counter)
    task = make_task("single_label")
    for size in (12, 16):  # progressive resizing: two stages, two sizes
        train, valid = loaders(size)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        Learner(model, opt, task, train, valid).fit(2)  # 2 epochs x 4 steps, 2 validations each
    # per size: train (bs 8), eval (bs 8), eval of the last short batch (bs 4); 16 steps in all
    assert len(counter.shapes) == 6, counter.shapes
    assert sorted(counter.shapes) == sorted((b, 3, s, s) for s in (12, 16) for b in (8, 4, 8))
    dynamo.reset()


def test_compiled_model_keeps_its_state_dict_keys():
    dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 2))
    keys = list(model.state_dict())
    compile_model(model, backend=CountingBackend())
    assert list(model.state_dict()) == keys  # checkpoints load into an uncompiled model
    dynamo.reset()


def test_inductor_compiles_once_per_shape_and_matches_eager():
    """The real compiler on a tiny model (skipped without a C++ toolchain)."""
    from trainer.run.runtime import compile_ready

    why_not = compile_ready(torch.device("cpu"))
    if why_not:
        pytest.skip(why_not)
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        compile_model(model)
        for _ in range(3):
            got = model(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    dynamo.reset()

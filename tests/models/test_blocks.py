"""model.blocks: the residual layers of each bnresnet stage (the course's two by default)."""

import pytest
import torch
from typer.testing import CliRunner

from trainer.cli import app
from trainer.config import ModelConfig
from trainer.models import create_model


def residuals(model) -> list[int]:
    """ResnetLayers (or bnresnet2d's residuals) in each stage after the stem."""
    return [sum(type(m).__name__ in ("ResnetLayer", "_Residual") for m in stage) for stage in model.layers[1:]]


@pytest.mark.parametrize("arch", ["bnresnet", "bnresnet2d"])
def test_blocks_set_the_residual_layers_of_each_stage(arch):
    layers = [8, 16, 32, 64]
    default = create_model(ModelConfig(arch=arch, layers=layers), 10, 1, 28).model
    two = create_model(ModelConfig(arch=arch, layers=layers, blocks=2), 10, 1, 28).model
    assert residuals(default) == residuals(two) == [2, 2, 2]
    assert list(default.state_dict()) == list(two.state_dict())  # earlier runs' checkpoints still load
    cheap = create_model(ModelConfig(arch=arch, layers=layers, blocks=[0, 1, 2]), 10, 1, 28).model
    assert residuals(cheap) == [0, 1, 2] and cheap(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(cheap) < n(default)


def test_blocks_that_do_not_fit_the_layers_are_refused_by_check(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{layout: folder, path: '{folder_data}'}}\n"
        "model: {arch: bnresnet, layers: [8, 16, 32], blocks: [0, 1, 1]}\n"
        "train: {stages: [{epochs: 1, lr: 1.0e-2}]}\n"
    )
    res = CliRunner().invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2
    assert (
        f"{cfg}:2: model.blocks: [0, 1, 1] has 3 number(s), and layers [8, 16, 32] has 2 stage(s) after the stem"
        in res.output
    ), res.output
    assert "Traceback" not in res.output
    cfg.write_text(cfg.read_text().replace("[0, 1, 1]", "[0, 1]"))
    assert CliRunner().invoke(app, ["check", str(cfg)]).exit_code == 0

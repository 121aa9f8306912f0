"""Every config under configs/ smoke-runs (`trainer fit --smoke`) on small generated data."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import make_csv_dataset, make_folder_dataset
from tests.runs import ROOT
from trainer.cli import app

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
runner = CliRunner()


def fake_data(cfg: dict, tmp: Path) -> Path:
    data = cfg["data"]
    if data["layout"] == "text":
        path = tmp / "corpus.txt"
        path.write_text("the quick brown fox jumps over the lazy dog. " * 300, encoding="utf-8")
        return path
    size = min(int(data.get("size") or 32), 32)
    if data["layout"] == "csv":
        root = make_csv_dataset(tmp / "csv", n=24, size=size)
        suffix = data.get("suffix", "")
        if suffix != ".jpg":
            for f in (root / "train").iterdir():
                f.rename(f.with_name(f.stem + suffix))
        if data.get("labels", "labels.csv") != "labels.csv":
            (root / "labels.csv").rename(root / data["labels"])
        if data.get("train", "train") != "train":
            (root / "train").rename(root / data["train"])
        return root
    return make_folder_dataset(tmp / "folder", n_train=6, n_valid=3, size=size, valid=data.get("valid", "valid"))


def smoke_overrides(cfg: dict) -> list[str]:
    sets = ["data.bs=4", "model.pretrained=false"] if "pretrained" in cfg.get("model", {}) else ["data.bs=4"]
    for i, stage in enumerate(cfg["train"]["stages"]):
        if "bs" in stage:
            sets.append(f"train.stages.{i}.bs=4")
    return sets


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_smoke_runs(config, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    data = fake_data(cfg, tmp_path)
    args = ["fit", str(config), "--smoke", "--out", str(tmp_path / "run"), "--set", f"data.path={data}"]
    for s in smoke_overrides(cfg):
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "smoke run passed" in res.output
    assert (tmp_path / "run" / "metrics.csv").is_file()

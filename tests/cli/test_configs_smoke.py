"""Every config under configs/ smoke-runs (`trainer fit --smoke`) on small generated data."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import CLASSES, make_folder_dataset, shape_image
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
        return kaggle_csv(data, tmp / "csv", size)
    return make_folder_dataset(tmp / "folder", n_train=6, n_valid=3, size=size, valid=data.get("valid", "valid"))


def kaggle_csv(data: dict, root: Path, size: int) -> Path:
    """A labels CSV as the config reads it, Kaggle's way: its file, image folder, suffix and column
    names (dog breeds: id,breed; planet: image_name,tags, several tags to an image, images twice as
    wide as high)."""
    multi = data.get("label_column") == "tags"
    folder = root / data.get("train", "train")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [f"{data.get('id_column', 'id')},{data.get('label_column', 'breed')}"]
    for i in range(24):
        c = CLASSES[i % 3]
        img = np.asarray(shape_image(c, size, rng))
        if multi:
            img = np.concatenate([img, img], 1)  # not square: data.resize decides
        Image.fromarray(img).save(folder / f"img{i}{data.get('suffix', '') or '.png'}", format="PNG")
        rows.append(f"img{i},{c} {'big' if i % 2 else 'small'}" if multi else f"img{i},{c}")
    (root / data.get("labels", "labels.csv")).write_text("\n".join(rows) + "\n")
    if not data.get("suffix"):  # ids are the file names
        for f in folder.iterdir():
            f.rename(f.with_suffix(""))
    return root


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

"""Loading a finished run and predicting on new images."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from trainer import checkpoint
from trainer.config import Config
from trainer.data.augment import AugmentSpec, preset
from trainer.data.decode import read_image
from trainer.data.items import DataError, image_files
from trainer.data.loaders import ImageBatches
from trainer.metrics import make_task
from trainer.models import Built, create_model
from trainer.runtime import pick_device
from trainer.tta import tta_predict
from trainer.tta import tta_views as make_views


@dataclass
class LoadedRun:
    path: Path
    cfg: Config
    built: Built
    classes: list[str]
    multi_label: bool
    stats: dict
    device: torch.device
    threshold: float = 0.5  # multi-label: chosen on the validation set during fit (threshold.json)

    @property
    def size(self) -> int:
        sizes = [s.size for s in self.cfg.train.stages if s.size]
        return sizes[-1] if sizes else self.stats["size"]

    def task(self):
        return make_task("multi_label" if self.multi_label else "single_label")

    def augment_spec(self) -> AugmentSpec | None:
        """The run's training augmentation at its final size (TTA draws its views from it)."""
        t = self.cfg.transforms.model_dump()
        spec = preset(t.pop("preset"), size=self.size, **t)
        return None if spec.is_identity else spec

    def tta_views(self) -> list:
        return make_views(self.augment_spec(), self.cfg.tta.n, self.size, self.cfg.tta.mode, self.cfg.seed or 0)


def read_run_config(path: Path) -> Config:
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)")
    return Config.model_validate(yaml.safe_load((path / "config.yaml").read_text()))


def find_checkpoint(path: Path, which: str = "best") -> Path:
    """checkpoints/<which>.pt, else last.pt."""
    for ckpt in (path / "checkpoints" / f"{which}.pt", path / "checkpoints" / "last.pt"):
        if ckpt.is_file():
            return ckpt
    raise FileNotFoundError(f"{path}: no checkpoint in checkpoints/ (did the run finish an epoch?)")


def load_run(run_dir: str | Path, which: str = "best", device: str = "auto") -> LoadedRun:
    path = Path(run_dir)
    cfg = read_run_config(path)
    if cfg.data.layout == "text":
        raise ValueError(f"{path}: a language-model run; use `trainer generate {path} --prime ...`")
    meta = json.loads((path / "classes.json").read_text())
    stats = json.loads((path / "stats.json").read_text())
    ckpt = find_checkpoint(path, which)
    model_cfg = cfg.model.model_copy(update={"pretrained": False})  # weights come from the checkpoint
    built = create_model(model_cfg, len(meta["classes"]), stats["channels"], stats["size"])
    built.model.load_state_dict(checkpoint.load(ckpt)["model"])
    dev = pick_device(device)
    built.model.to(dev).eval()
    threshold = json.loads((path / "threshold.json").read_text())["threshold"] \
        if (path / "threshold.json").is_file() else 0.5
    return LoadedRun(path, cfg, built, meta["classes"], meta["multi_label"], stats, dev, threshold)


def load_folder(files: list[Path], size: int, channels: int) -> torch.Tensor:
    if not files:
        raise DataError("no image files found to predict on")
    return torch.from_numpy(np.stack([read_image(f, size, channels) for f in files]))


def batches_for(run: LoadedRun, images: torch.Tensor, bs: int = 128) -> ImageBatches:
    return ImageBatches(images, torch.zeros(len(images), dtype=torch.long), bs, run.size,
                        torch.tensor(run.stats["mean"]), torch.tensor(run.stats["std"]), device=run.device)


@torch.no_grad()
def predict_probs(run: LoadedRun, dl: ImageBatches) -> torch.Tensor:
    task = run.task()
    outs = [task.activation(run.built.model(x)).cpu() for x, _ in dl]
    return torch.cat(outs)


def predict_folder(run: LoadedRun, folder: str | Path, bs: int = 128, tta: bool = False) -> tuple[list[Path], torch.Tensor]:
    folder = Path(folder)
    files = image_files(folder) if folder.is_dir() else [folder]
    images = load_folder(files, run.stats["size"], run.stats["channels"])
    dl = batches_for(run, images, bs)
    if tta:
        return files, tta_predict(run.built.model, dl, run.task().activation, run.tta_views(), run.cfg.tta.beta)[0]
    return files, predict_probs(run, dl)


def cycle_checkpoints(run_dir: str | Path) -> list[Path]:
    """checkpoints/cycle-<k>.pt of an SGDR run with save_cycles: true, in cycle order."""
    files = list((Path(run_dir) / "checkpoints").glob("cycle-*.pt"))
    files = [f for f in files if f.stem.split("-", 1)[1].isdigit()]
    if not files:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/cycle-<k>.pt to ensemble (train an sgdr stage "
                                "with save_cycles: true)")
    return sorted(files, key=lambda f: int(f.stem.split("-", 1)[1]))


def predict_ensemble(run: LoadedRun, folder: str | Path, checkpoints: list[Path], bs: int = 128
                     ) -> tuple[list[Path], torch.Tensor]:
    """A snapshot ensemble: the mean of the probabilities each saved cycle predicts."""
    folder = Path(folder)
    files = image_files(folder) if folder.is_dir() else [folder]
    dl = batches_for(run, load_folder(files, run.stats["size"], run.stats["channels"]), bs)
    total = None
    for ckpt in checkpoints:
        run.built.model.load_state_dict(checkpoint.load(ckpt)["model"])
        probs = predict_probs(run, dl)
        total = probs if total is None else total + probs
    return files, total / len(checkpoints)


def file_ids(files: list[Path]) -> list[str]:
    """The file names without suffix (Kaggle's ids); when two files share a name (a test folder
    with a sub-folder per class), the path below their common folder, e.g. cat/0001."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return [f.relative_to(root).with_suffix("").as_posix() for f in files]


def predictions_table(files: list[Path], probs: torch.Tensor, classes: list[str], multi_label: bool,
                      threshold: float = 0.5, labels_only: bool = False, probs_only: bool = False,
                      id_column: str = "id") -> pd.DataFrame:
    """One row per image: its id, the label (multi-label: the tags above the threshold, space
    separated) and one probability column per class in class order. labels_only and probs_only
    give the two Kaggle submission shapes (planet's image_name,tags; dog breeds' id,<classes>)."""
    df = pd.DataFrame({id_column: file_ids(files)})
    if probs_only:
        pass
    elif multi_label:
        df["tags"] = [" ".join(c for c, p in zip(classes, row) if p > threshold) for row in probs.tolist()]
    else:
        df["label"] = [classes[i] for i in probs.argmax(1).tolist()]
    if not labels_only:
        for j, c in enumerate(classes):
            df[c] = probs[:, j].numpy()
    return df

"""A finished run, loaded from its directory: the config it ran with, its model from a
checkpoint, its classes and normalisation. What predict, evaluate, export and TTA start from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from trainer import storage
from trainer.config import Config
from trainer.data.augment import AugmentSpec, preset
from trainer.inference.tta import View, tta_views
from trainer.models import Built, create_model
from trainer.run.runtime import pick_device
from trainer.train.plan import outline
from trainer.train.tasks import Task, make_task


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
        """The image size the run ended at."""
        return outline(self.cfg).last_size or self.stats["size"]

    def task(self) -> Task:
        return make_task("multi_label" if self.multi_label else "single_label")

    def augment_spec(self) -> AugmentSpec | None:
        """The run's training augmentation at its final size (TTA draws its views from it)."""
        t = self.cfg.transforms.model_dump()
        spec = preset(t.pop("preset"), size=self.size, **t)
        return None if spec.is_identity else spec

    def tta_views(self) -> list[View]:
        return tta_views(self.augment_spec(), self.cfg.tta.n, self.size, self.cfg.tta.mode, self.cfg.seed or 0)


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
    built.model.load_state_dict(storage.load(ckpt)["model"])
    dev = pick_device(device)
    built.model.to(dev).eval()
    threshold = (
        json.loads((path / "threshold.json").read_text())["threshold"] if (path / "threshold.json").is_file() else 0.5
    )
    return LoadedRun(path, cfg, built, meta["classes"], meta["multi_label"], stats, dev, threshold)

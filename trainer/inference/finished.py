"""A finished run, loaded from its directory: the config it ran with, its model from a
checkpoint, its classes and normalisation. What predict, evaluate, export and TTA start from."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, model_validator

from trainer import storage
from trainer.config import Config, read_saved_config
from trainer.data.augment import AugmentSpec, preset
from trainer.inference.tta import View, tta_views
from trainer.models import Built, create_model
from trainer.models.weights import load_weights
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
    # multi-label: chosen on the validation set during fit (threshold.json): one, or one per tag
    threshold: float | list[float] = 0.5

    @property
    def size(self) -> int:
        """The image size the run ended at."""
        return outline(self.cfg).last_size or self.stats["size"]

    def task(self) -> Task:
        # the run's label smoothing too: valid_loss means here what it meant in metrics.csv
        kind = "multi_label" if self.multi_label else "single_label"
        return make_task(kind, self.cfg.train.label_smoothing, self.cfg.train.threshold)

    def thresholds(self) -> torch.Tensor:
        """The multi-label threshold of each tag."""
        t = torch.tensor(self.threshold, dtype=torch.float32)
        return t.expand(len(self.classes)) if t.dim() == 0 else t

    def augment_spec(self) -> AugmentSpec | None:
        """The run's training augmentation at its final size (TTA draws its views from it)."""
        t = self.cfg.transforms
        spec = preset(t.preset, size=self.size, **t.per_image())
        return None if spec.is_identity else spec

    def tta_views(self) -> list[View]:
        return tta_views(self.augment_spec(), self.cfg.tta.n, self.size, self.cfg.tta.mode, self.cfg.seed or 0)


def read_run_config(path: Path) -> Config:
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no config.yaml)")
    return read_saved_config(path / "config.yaml")


class ClassesFile(BaseModel):
    classes: list[str] = Field(min_length=1)
    multi_label: bool = False


class StatsFile(BaseModel):
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]
    size: Annotated[int, Field(ge=1)]
    channels: Literal[1, 3]

    @model_validator(mode="after")
    def _one_per_channel(self):
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        return self


def read_json(path: Path, kind: type[BaseModel]) -> BaseModel:
    """A JSON file of the run directory, checked against what the run wrote; a damaged one is a
    ValueError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the run directory") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not what trainer writes there (a JSON object, not a {type(data).__name__})")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "the file"
        raise ValueError(f"{path}: not what trainer writes there ({where}: {err['msg']})") from None


CHECKPOINT = re.compile(r"best|last|cycle-[0-9]+|top-[0-9]+")


def find_checkpoint(path: Path, which: str = "best") -> Path:
    """checkpoints/<which>.pt: best (else last, for a run with no finite monitored value yet),
    last, cycle-K or top-K. Any other name is refused, never replaced by another checkpoint."""
    folder = path / "checkpoints"
    have = sorted(f.stem for f in folder.glob("*.pt")) if folder.is_dir() else []
    if not CHECKPOINT.fullmatch(which):
        raise ValueError(
            f"--checkpoint {which}: expected best, last, cycle-K or top-K (this run has: {', '.join(have) or 'none'})"
        )
    for name in (which, "last") if which == "best" else (which,):
        if (folder / f"{name}.pt").is_file():
            return folder / f"{name}.pt"
    if not have:
        raise FileNotFoundError(f"{path}: no checkpoint in checkpoints/ (did the run finish an epoch?)")
    raise FileNotFoundError(f"{path}: no checkpoints/{which}.pt (this run has: {', '.join(have)})")


def load_run(run_dir: str | Path, which: str = "best", device: str = "auto") -> LoadedRun:
    path = Path(run_dir)
    cfg = read_run_config(path)
    if cfg.data.layout == "text":
        raise ValueError(f"{path}: a language-model run; use `trainer generate {path} --prime ...`")
    meta = read_json(path / "classes.json", ClassesFile)
    stats = read_json(path / "stats.json", StatsFile)
    ckpt = find_checkpoint(path, which)
    model_cfg = cfg.model.model_copy(update={"pretrained": False})  # weights come from the checkpoint
    built = create_model(model_cfg, len(meta.classes), stats.channels, stats.size)
    load_weights(built.model, storage.model_state(ckpt), ckpt)
    dev = pick_device(device)
    built.model.to(dev).eval()
    threshold = 0.5
    if (path / "threshold.json").is_file():
        threshold = read_json(path / "threshold.json", ThresholdFile).threshold
    return LoadedRun(path, cfg, built, meta.classes, meta.multi_label, stats.model_dump(), dev, threshold)


class ThresholdFile(BaseModel):
    threshold: Annotated[float, Field(ge=0, le=1)] | list[Annotated[float, Field(ge=0, le=1)]]

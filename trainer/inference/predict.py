"""Predicting on new images with a finished run: one model, its TTA, or a snapshot ensemble."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainer import storage
from trainer.data.decode import read_image
from trainer.data.images import fit_of
from trainer.data.items import DataError, image_files
from trainer.data.loaders import ImageBatches
from trainer.inference.finished import LoadedRun
from trainer.inference.tta import tta_predict
from trainer.models.weights import load_weights
from trainer.train.loop import outputs


def load_folder(run: LoadedRun, files: list[Path]) -> torch.Tensor:
    """The images as the run's training saw them: its decoded size, channels and data.resize."""
    if not files:
        raise DataError("no image files found to predict on")
    fit = fit_of(run.cfg.data)
    return torch.from_numpy(np.stack([read_image(f, run.stats["size"], run.stats["channels"], fit) for f in files]))


def batches_for(run: LoadedRun, images: torch.Tensor, bs: int = 128) -> ImageBatches:
    return ImageBatches(
        images,
        torch.zeros(len(images), dtype=torch.long),
        bs,
        run.size,
        torch.tensor(run.stats["mean"]),
        torch.tensor(run.stats["std"]),
        device=run.device,
    )


def predict_probs(run: LoadedRun, dl: ImageBatches) -> torch.Tensor:
    return outputs(run.built.model, dl, activation=run.task().activation)[0]


def predict_folder(
    run: LoadedRun, folder: str | Path, bs: int = 128, tta: bool = False
) -> tuple[list[Path], torch.Tensor]:
    folder = Path(folder)
    files = image_files(folder) if folder.is_dir() else [folder]
    images = load_folder(run, files)
    dl = batches_for(run, images, bs)
    if tta:
        return files, tta_predict(run.built.model, dl, run.task().activation, run.tta_views(), run.cfg.tta.beta)[0]
    return files, predict_probs(run, dl)


def cycle_checkpoints(run_dir: str | Path) -> list[Path]:
    """checkpoints/cycle-<k>.pt of an SGDR run with save_cycles: true, in cycle order."""
    files = list((Path(run_dir) / "checkpoints").glob("cycle-*.pt"))
    files = [f for f in files if f.stem.split("-", 1)[1].isdigit()]
    if not files:
        raise FileNotFoundError(
            f"{run_dir}: no checkpoints/cycle-<k>.pt to ensemble (train an sgdr stage with save_cycles: true)"
        )
    return sorted(files, key=lambda f: int(f.stem.split("-", 1)[1]))


def predict_ensemble(
    run: LoadedRun, folder: str | Path, checkpoints: list[Path], bs: int = 128
) -> tuple[list[Path], torch.Tensor]:
    """A snapshot ensemble: the mean of the probabilities each saved cycle predicts."""
    folder = Path(folder)
    files = image_files(folder) if folder.is_dir() else [folder]
    dl = batches_for(run, load_folder(run, files), bs)
    total = None
    for ckpt in checkpoints:
        load_weights(run.built.model, storage.model_state(ckpt), ckpt)
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


def predictions_table(
    files: list[Path],
    probs: torch.Tensor,
    classes: list[str],
    multi_label: bool,
    threshold: float | list[float] = 0.5,
    labels_only: bool = False,
    probs_only: bool = False,
    id_column: str = "id",
) -> pd.DataFrame:
    """One row per image: its id, the label (multi-label: the tags above the threshold, space
    separated) and one probability column per class in class order. labels_only and probs_only
    give the two Kaggle submission shapes (planet's image_name,tags; dog breeds' id,<classes>).
    A class named like the id or label column is refused: one column would overwrite the other."""
    label_column = None if probs_only else "tags" if multi_label else "label"
    columns = [id_column, *([label_column] if label_column else []), *([] if labels_only else classes)]
    twice = [c for c in dict.fromkeys(columns) if columns.count(c) > 1]
    if twice:
        raise ValueError(
            f"the prediction table would have two columns named '{twice[0]}' (the id, the label or a "
            "class); choose another --id-column, or --labels to leave out the class columns"
        )
    df = pd.DataFrame({id_column: file_ids(files)})
    if probs_only:
        pass
    elif multi_label:
        above = probs > torch.as_tensor(threshold, dtype=probs.dtype)  # one threshold, or one per tag
        df["tags"] = [" ".join(c for c, on in zip(classes, row, strict=True) if on) for row in above.tolist()]
    else:
        df["label"] = [classes[i] for i in probs.argmax(1).tolist()]
    if not labels_only:
        for j, c in enumerate(classes):
            df[c] = probs[:, j].numpy()
    return df

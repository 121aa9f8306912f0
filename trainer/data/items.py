"""Dataset layouts -> lists of image files with labels (no pixels are read here).

Folder per class (`train/<class>/*`, a validation folder, an optional unlabeled test folder) and
a labels CSV (`id,label`, a seeded random validation split or a file of validation ids;
space-separated tags make it multi-label).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trainer.registry import did_you_mean

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(Exception):
    """A problem with the user's data; the CLI prints it and exits 2."""


@dataclass
class ImageItems:
    classes: list[str]
    train_files: list[Path]
    train_labels: list  # class index, or a list of indices when multi_label
    valid_files: list[Path]
    valid_labels: list
    multi_label: bool = False
    test_files: list[Path] = field(default_factory=list)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(root: Path, part: str) -> dict[str, list[Path]]:
    folder = root / part
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected {part}/<class>/<image files>)")
    found = {d.name: image_files(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not found:
        raise DataError(f"{folder}: no class folders inside (expected {part}/<class>/<image files>)")
    return found


def folder_items(root: Path, train: str = "train", valid: str = "valid", test: str | None = None) -> ImageItems:
    root = Path(root)
    train_sets = _class_folders(root, train)
    empty = [c for c, files in train_sets.items() if not files]
    if empty:
        raise DataError(f"{root / train}: class folder(s) with no images: {', '.join(empty)}")
    classes = sorted(train_sets)
    if len(classes) < 2:
        raise DataError(
            f"{root / train}: one class folder ({classes[0]}); a classifier needs at least two "
            f"({train}/<class>/<images> for each)"
        )
    valid_sets = _class_folders(root, valid)
    unknown = sorted(set(valid_sets) - set(classes))
    if unknown:
        raise DataError(f"{root / valid}: class(es) not in {train}/: {', '.join(unknown)}")
    items = ImageItems(classes, [], [], [], [])
    for i, c in enumerate(classes):
        items.train_files += train_sets[c]
        items.train_labels += [i] * len(train_sets[c])
        items.valid_files += valid_sets.get(c, [])
        items.valid_labels += [i] * len(valid_sets.get(c, []))
    if not items.valid_files:
        raise DataError(f"{root / valid}: no validation images")
    if test:
        items.test_files = image_files(root / test)
    return items


def _safe_id(raw: str, csv_path: Path) -> str:
    ident = str(raw).strip()
    if not ident or ident.startswith(("/", "\\")) or ".." in Path(ident).parts or ":" in ident:
        raise DataError(f"{csv_path}: refused id {ident!r}: ids must be plain names inside the image folder")
    return ident


def read_labels_csv(
    csv_path: Path, delim: str = " ", id_column: str | None = None, label_column: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """The ids and tags of a labels CSV: the named columns, else the first two."""
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{csv_path}: labels file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: cannot read the labels CSV: {str(e).splitlines()[0]}") from None
    if not isinstance(df.index, pd.RangeIndex):  # pandas made the extra field of every row an index
        raise DataError(f"{csv_path}: {_ragged_row(csv_path)}")
    if df.shape[1] < 2 or len(df) == 0:
        raise DataError(f"{csv_path}: expected a header `id,label` and at least one row")
    for key, name in (("data.id_column", id_column), ("data.label_column", label_column)):
        if name is not None and name not in df.columns:
            hint = did_you_mean(name, df.columns)
            raise DataError(
                f"{csv_path}: no column {name!r} ({key}); its columns: {', '.join(df.columns)}"
                + (f"; {hint}" if hint else "")
            )
    id_values = df[id_column] if id_column is not None else df.iloc[:, 0]
    label_values = df[label_column] if label_column is not None else df.iloc[:, 1]
    ids = [_safe_id(v, csv_path) for v in id_values]
    dup = pd.Series(ids)[pd.Series(ids).duplicated()].unique()
    if len(dup):
        raise DataError(f"{csv_path}: duplicate id(s): {', '.join(map(str, dup[:5]))}")
    tags = [[t for t in str(v).split(delim) if t] for v in label_values]
    missing = [ids[i] for i, t in enumerate(tags) if not t]
    if missing:
        raise DataError(f"{csv_path}: empty label for id(s): {', '.join(missing[:5])}")
    return ids, tags


def _ragged_row(csv_path: Path) -> str:
    """Where the rows stop matching the header, in words."""
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        for line, row in enumerate(rows, 2):
            if row and len(row) != len(header):
                return (
                    f"line {line} has {len(row)} fields, the header {len(header)} ({','.join(row[:4])}); "
                    "a value holding a comma needs quotes"
                )
    return "the rows have more fields than the header"


def split_ids(n: int, valid_pct: float, seed: int) -> np.ndarray:
    """A boolean mask of validation rows, the same for the same seed (fastai's random split)."""
    rng = np.random.default_rng(seed)
    n_valid = max(1, int(round(n * valid_pct)))
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:n_valid]] = True
    return mask


def _valid_mask(ids: list[str], path: Path) -> np.ndarray:
    try:
        wanted = set(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read data.valid_ids ({type(e).__name__}: {e})") from None
    mask = np.array([i in wanted for i in ids])
    if not mask.any():
        raise DataError(f"{path}: none of its ids appear in the labels CSV, so there is no validation set")
    if mask.all():
        raise DataError(f"{path}: lists every id of the labels CSV, so there is nothing to train on")
    return mask


def csv_items(
    root: Path,
    labels: str = "labels.csv",
    folder: str = "train",
    suffix: str = "",
    valid_pct: float = 0.2,
    valid_ids: str | None = None,
    seed: int = 0,
    delim: str = " ",
    test: str | None = None,
    columns: tuple[str | None, str | None] = (None, None),
) -> ImageItems:
    """columns: the CSV's id and label columns by name (None: the first, the second)."""
    root = Path(root)
    csv_path = root / labels
    ids, tags = read_labels_csv(csv_path, delim, *columns)
    files = [root / folder / f"{i}{suffix}" for i in ids]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise DataError(
            f"{csv_path}: {len(absent)} listed file(s) not found, e.g. {absent[0]} "
            f"(check data.suffix, now {suffix!r}, and data.train, now {folder!r})"
        )
    if valid_ids:
        mask = _valid_mask(ids, root / valid_ids)
    else:
        mask = split_ids(len(ids), valid_pct, seed)
    multi = any(len(t) > 1 for t in tags)
    train_classes = sorted({t for k, ts in enumerate(tags) if not mask[k] for t in ts})
    only_valid = sorted({t for k, ts in enumerate(tags) if mask[k] for t in ts} - set(train_classes))
    if only_valid:
        raise DataError(
            f"{csv_path}: class(es) only in the validation split: {', '.join(only_valid[:5])} "
            "(add training examples, or change data.valid_pct / the seed)"
        )
    if len(train_classes) < 2:
        raise DataError(
            f"{csv_path}: every training row has the label {train_classes[0]!r}; a classifier needs at "
            "least two classes"
        )
    index = {c: i for i, c in enumerate(train_classes)}
    labels_idx = [[index[t] for t in ts] if multi else index[ts[0]] for ts in tags]
    items = ImageItems(train_classes, [], [], [], [], multi_label=multi)
    for k, (f, y) in enumerate(zip(files, labels_idx, strict=True)):
        (items.valid_files if mask[k] else items.train_files).append(f)
        (items.valid_labels if mask[k] else items.train_labels).append(y)
    if test:
        items.test_files = image_files(root / test)
    return items


def subsample(items: ImageItems, n_train: int | None, n_valid: int | None, seed: int) -> ImageItems:
    """A seeded random slice of the training and validation items, in their original order
    (data.subset; the same seed gives the same slice, so evaluate sees the run's validation set)."""
    rng = np.random.default_rng(seed)

    def pick(files, labels, n):
        if n is None or n >= len(files):
            return files, labels
        keep = sorted(rng.permutation(len(files))[:n].tolist())
        return [files[i] for i in keep], [labels[i] for i in keep]

    items.train_files, items.train_labels = pick(items.train_files, items.train_labels, n_train)
    items.valid_files, items.valid_labels = pick(items.valid_files, items.valid_labels, n_valid)
    return items

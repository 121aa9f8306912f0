"""Evaluate a finished run on its validation set and show where it goes wrong: metrics (plain and
with TTA), per-class accuracy, the confusion matrix, the most confused pairs, the top losses
(with Grad-CAM heat maps). Works from the run directory alone: the validation items are listed
again from the saved config (same seed, same split), and the decoded-image cache makes it quick.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from trainer import storage
from trainer.data.images import load_images
from trainer.data.items import DataError
from trainer.data.loaders import ImageBatches
from trainer.inference.finished import LoadedRun
from trainer.inference.pictures import confusion_plot, image_grid, label_text, to_display
from trainer.inference.tta import predict_view, tta_predict
from trainer.models.weights import load_weights
from trainer.storage import OutputError, marked_png, writable_folder, write_output
from trainer.train.plan import outline
from trainer.train.tasks import at_edge, fbeta_per_tag


@dataclass
class Evaluation:
    metrics: dict
    metrics_tta: dict | None
    per_class: list[dict]
    confused: list[dict]
    files: dict[str, Path] = field(default_factory=dict)
    metrics_ensemble: dict | None = None  # --ensemble cycles: the mean of the SGDR snapshots
    snapshots: int = 0
    warnings: list[str] = field(default_factory=list)


def validation_batches(run: LoadedRun, data_path: str | Path | None = None, bs: int = 128, log=print) -> ImageBatches:
    data = run.cfg.data
    if data.layout == "text":
        raise ValueError("evaluate: this run is a language model; it has no images to evaluate")
    if data_path is not None:
        data = data.model_copy(update={"path": str(data_path)})
    if not Path(data.path).exists():
        raise DataError(
            f"{data.path}: the run's data folder is not here (run from the folder you trained in, or pass --data PATH)"
        )
    images = load_images(data, run.cfg.seed or 0, list(outline(run.cfg).image_sizes), log, valid_only=True)
    if images.classes != run.classes:
        raise DataError(f"{data.path}: its classes differ from the run's classes.json")
    return ImageBatches(
        images.valid_x,
        images.valid_y,
        bs,
        run.size,
        torch.tensor(run.stats["mean"]),
        torch.tensor(run.stats["std"]),
        device=run.device,
    )


def as_logits(probs: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Outputs whose activation gives back probs, so the task's loss and metrics apply to
    (TTA-averaged) probabilities too."""
    p = probs.clamp(1e-7, 1 - 1e-7)
    return torch.logit(p) if multi_label else p.log()


def scores(run: LoadedRun, probs: torch.Tensor, y: torch.Tensor) -> dict:
    task = run.task()
    logits = as_logits(probs, run.multi_label)
    return {"valid_loss": task.loss_fn(logits, y).item(), **task.metrics(logits, y)}


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, n: int) -> np.ndarray:
    """cm[actual, predicted] counts."""
    return torch.bincount(y * n + pred, minlength=n * n).view(n, n).numpy()


def most_confused(cm: np.ndarray, classes: list[str], min_count: int = 1) -> list[dict]:
    """Off-diagonal pairs, most frequent first (fastai's most_confused)."""
    pairs = [
        {"actual": classes[i], "predicted": classes[j], "count": int(cm[i, j])}
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and cm[i, j] >= min_count
    ]
    return sorted(pairs, key=lambda r: (-r["count"], r["actual"], r["predicted"]))


def per_class(
    probs: torch.Tensor,
    y: torch.Tensor,
    classes: list[str],
    multi_label: bool,
    threshold: float | torch.Tensor = 0.5,
) -> list[dict]:
    """Single-label: the share of each class's images predicted right (its recall).
    Multi-label: per tag, the share of images where its presence is predicted right, and the
    tag's precision, recall and F2 over the images (n: the images that have the tag)."""
    if multi_label:
        pred = (probs > torch.as_tensor(threshold, dtype=probs.dtype)).float()
        precision, recall, f2 = fbeta_per_tag(pred, y.float())
        right = (pred == (y > 0.5).float()).float().mean(0)
        return [
            {
                "class": name,
                "n": int(y[:, c].sum()),
                "accuracy": right[c].item(),
                "precision": precision[c].item(),
                "recall": recall[c].item(),
                "f2": f2[c].item(),
            }
            for c, name in enumerate(classes)
        ]
    rows = []
    for c, name in enumerate(classes):
        mask = y == c
        n = int(mask.sum())
        right = (probs[mask].argmax(1) == c).float() if n else torch.zeros(0)
        rows.append({"class": name, "n": n, "accuracy": right.mean().item() if n else float("nan")})
    return rows


def item_losses(probs: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    logits = as_logits(probs, multi_label)
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
    return F.nll_loss(logits, y, reduction="none")


def plot_top_losses(
    run: LoadedRun,
    dl: ImageBatches,
    probs: torch.Tensor,
    path: Path,
    k: int = 9,
    heatmap: bool = False,
    threshold: float | torch.Tensor = 0.5,
) -> Path:
    """The k worst validation images, titled predicted / actual / loss / probability of the actual
    class (the mean over tags for multi-label); with heatmap, Grad-CAM of the predicted class."""
    y = dl.labels
    losses = item_losses(probs, y, run.multi_label)
    top = losses.topk(min(k, len(losses))).indices
    x, _ = dl.batch(top.sort().values)
    order = torch.argsort(torch.argsort(top))  # dl.batch sorted the rows; put them back in loss order
    x = x[order]
    titles = []
    for i in top.tolist():
        if run.multi_label:
            pred = label_text((probs[i] > threshold).float(), run.classes, most=3)
            p_actual = probs[i][y[i] > 0.5].mean().item()
        else:
            pred, p_actual = run.classes[int(probs[i].argmax())], probs[i, y[i]].item()
        actual = label_text(y[i], run.classes, most=3)  # several tags stay legible: three, then +N
        titles.append(f"{pred} / {actual}\n{losses[i]:.2f} / {p_actual:.2f}")
    overlays = None
    if heatmap:
        from trainer.inference.gradcam import grad_cam

        layer = run.built.extra.get("cam_layer")
        if layer is None:
            raise ValueError(f"--heatmap: '{run.cfg.model.arch}' has no convolutional block to map")
        target = None if run.multi_label else probs[top].argmax(1)
        overlays = grad_cam(run.built.model, layer, x, target).numpy()
    return image_grid(
        to_display(x, run.stats["mean"], run.stats["std"]),
        titles,
        path,
        overlays,
        suptitle="predicted / actual / loss / probability of actual",
    )


def evaluate(
    run: LoadedRun,
    data_path=None,
    tta: bool = False,
    heatmap: bool = False,
    out: Path | None = None,
    k: int = 9,
    log=print,
    ensemble: list[Path] | None = None,
) -> Evaluation:
    """`ensemble`: checkpoints (the SGDR snapshots) whose mean prediction is scored beside the run's."""
    out = output_folder(out, run.path)  # checked before any work
    dl = validation_batches(run, data_path, log=log)
    activation = run.task().activation
    if tta:
        probs_tta, probs = tta_predict(run.built.model, dl, activation, run.tta_views(), run.cfg.tta.beta)
    else:
        probs_tta, probs = None, predict_view(run.built.model, dl, activation)
    y = dl.labels
    metrics = scores(run, probs, y)
    metrics_tta = scores(run, probs_tta, y) if probs_tta is not None else None
    threshold = torch.tensor(metrics.get("thresholds", metrics.get("threshold", run.threshold)))
    best = probs_tta if probs_tta is not None else probs  # tables and pictures use the better prediction
    ev = Evaluation(metrics, metrics_tta, per_class(best, y, run.classes, run.multi_label, threshold), [])
    if ensemble:
        ev.metrics_ensemble, ev.snapshots = scores(run, snapshot_mean(run, dl, ensemble), y), len(ensemble)
    if run.multi_label and at_edge(threshold.tolist()):
        ev.warnings.append(
            f"the best threshold sits at the edge of the searched grid ({threshold.tolist()}): "
            "the model's probabilities are all high or all low for some tag"
        )
    if not run.multi_label:
        cm = confusion_matrix(best.argmax(1), y, len(run.classes))
        ev.confused = most_confused(cm, run.classes)
        ev.files["confusion_matrix"] = confusion_plot(cm, run.classes, out / "confusion_matrix.png")
        _write_csv(pd.DataFrame(ev.confused, columns=["actual", "predicted", "count"]), out / "most_confused.csv")
        ev.files["most_confused"] = out / "most_confused.csv"
    ev.files["top_losses"] = plot_top_losses(run, dl, best, out / "top_losses.png", k, heatmap, threshold)
    _write_csv(pd.DataFrame(ev.per_class), out / "per_class.csv")
    ev.files["per_class"] = out / "per_class.csv"
    report = {
        "written_by": MARK,
        "metrics": metrics,
        "metrics_tta": metrics_tta,
        "metrics_ensemble": ev.metrics_ensemble,
        "snapshots": ev.snapshots,
        "n_valid": len(y),
        "tta": run.cfg.tta.model_dump() if tta else None,
        "per_class": ev.per_class,
    }
    write_output(out / "evaluation.json", lambda f: f.write(json.dumps(report, indent=1).encode("utf-8")))
    ev.files["evaluation"] = out / "evaluation.json"
    return ev


OUTPUTS = ("evaluation.json", "per_class.csv", "most_confused.csv", "confusion_matrix.png", "top_losses.png")


MARK = "trainer evaluate"  # evaluation.json's "written_by": the folder's files are an evaluate's


def output_folder(path: Path | None, run_dir: Path) -> Path:
    """evaluate's folder: its fixed file names are replaced only in the run directory (all ours) or
    where an earlier evaluate wrote them (its marked evaluation.json beside them; pictures carry
    trainer's mark), never a user's files."""
    out = writable_folder(path or run_dir)
    if out.resolve() == Path(run_dir).resolve():
        return out
    ours = _an_evaluation(out / "evaluation.json")
    theirs = [
        name
        for name in OUTPUTS
        if ((f := out / name).exists() or f.is_symlink())
        and not (marked_png(f) if f.suffix == ".png" else ours and f.is_file())
    ]
    if theirs:  # all of them, so a user moving files aside does not meet them one at a time
        shown = str(out / theirs[0]) if len(theirs) == 1 else f"{out}: {', '.join(theirs)}"
        verb = "exists and was" if len(theirs) == 1 else "exist and were"
        raise OutputError(f"{shown}: {verb} not written by trainer evaluate; give another --out (nothing was replaced)")
    return out


def _an_evaluation(path: Path) -> bool:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("written_by") == MARK


def snapshot_mean(run: LoadedRun, dl: ImageBatches, checkpoints: list[Path]) -> torch.Tensor:
    """The mean prediction of the snapshots; the run's own weights are put back after."""
    own = {k: v.clone() for k, v in run.built.model.state_dict().items()}
    total = None
    try:
        for ckpt in checkpoints:
            load_weights(run.built.model, storage.model_state(ckpt), ckpt)
            p = predict_view(run.built.model, dl, run.task().activation)
            total = p if total is None else total + p
    finally:
        run.built.model.load_state_dict(own)
    return total / len(checkpoints)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    write_output(path, lambda f: f.write(df.to_csv(index=False).encode("utf-8")))

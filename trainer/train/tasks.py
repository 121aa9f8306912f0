"""Tasks: the loss, the output activation and the metrics that go with a kind of target."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def fbeta_samples(probs: torch.Tensor, y: torch.Tensor, thresh: float | torch.Tensor = 0.5, beta: float = 2.0) -> float:
    """F-beta averaged over samples (the planet competition's metric); `thresh` one for all tags
    or one per tag."""
    pred = (probs > thresh).float()
    tp = (pred * y).sum(1)
    precision = tp / pred.sum(1).clamp_min(1e-9)
    recall = tp / y.sum(1).clamp_min(1e-9)
    b2 = beta**2
    f = (1 + b2) * precision * recall / (b2 * precision + recall).clamp_min(1e-9)
    return f.mean().item()


THRESHOLDS = torch.linspace(0.01, 0.99, 99)  # a grid whose best point is rarely its edge


def best_threshold(probs: torch.Tensor, y: torch.Tensor) -> float:
    """The threshold with the best F2 on these predictions (chosen on the validation set)."""
    scores = [fbeta_samples(probs, y, t.item()) for t in THRESHOLDS]
    return round(THRESHOLDS[int(torch.tensor(scores).argmax())].item(), 2)


def fbeta_per_tag(pred: torch.Tensor, y: torch.Tensor, beta: float = 2.0) -> tuple[torch.Tensor, ...]:
    """Precision, recall and F-beta of each tag (the last dimension) over the samples."""
    tp = (pred * y).sum(-2)
    precision = tp / pred.sum(-2).clamp_min(1e-9)
    recall = tp / y.sum(-2).clamp_min(1e-9)
    b2 = beta**2
    return precision, recall, (1 + b2) * precision * recall / (b2 * precision + recall).clamp_min(1e-9)


def best_thresholds_per_tag(probs: torch.Tensor, y: torch.Tensor) -> list[float]:
    """For each tag, the threshold with its best F2 over the samples (threshold: per_class)."""
    pred = (probs[None] > THRESHOLDS.view(-1, 1, 1)).float()  # (grid, samples, tags)
    f = fbeta_per_tag(pred, y[None].float())[2]  # (grid, tags)
    return [round(v, 2) for v in THRESHOLDS[f.argmax(0)].tolist()]


def at_edge(threshold: float | list[float]) -> bool:
    """A threshold search whose best point is the grid's end: the right one may lie beyond it."""
    values = threshold if isinstance(threshold, list) else [threshold]
    return any(v <= THRESHOLDS[0].item() + 1e-6 or v >= THRESHOLDS[-1].item() - 1e-6 for v in values)


@dataclass
class Task:
    name: str
    loss_fn: nn.Module
    activation: Callable[[torch.Tensor], torch.Tensor]
    metrics: Callable[[torch.Tensor, torch.Tensor], dict]
    main_metric: str
    reports: tuple[str, ...] = ("valid_loss", "train_loss")  # the numeric columns of metrics.csv it gives


def _single_metrics(logits, y):
    return {"accuracy": accuracy(logits, y)}


def _multi_metrics(logits, y, per_tag: bool = False):
    """F2 at the best threshold (one, or one per tag); with per_tag, `threshold` is their mean and
    `thresholds` the list (metrics.csv keeps the numbers, threshold.json the list)."""
    probs = torch.sigmoid(logits.float())
    if per_tag:
        ts = best_thresholds_per_tag(probs, y)
        t = torch.tensor(ts)
        return {
            "fbeta": fbeta_samples(probs, y, t),
            "accuracy_thresh": ((probs > t) == (y > 0.5)).float().mean().item(),
            "threshold": round(sum(ts) / len(ts), 4),
            "thresholds": ts,
        }
    t = best_threshold(probs, y)
    return {
        "fbeta": fbeta_samples(probs, y, t),
        "accuracy_thresh": ((probs > t) == (y > 0.5)).float().mean().item(),
        "threshold": t,
    }


class FlatCrossEntropy(nn.Module):
    """Cross-entropy over every position of (batch, seq, vocab) outputs."""

    def forward(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _lm_metrics(logits, y):
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).item()
    return {"bpc": loss / math.log(2), "accuracy": accuracy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))}


def make_task(kind: str, label_smoothing: float = 0.0, threshold: str = "single") -> Task:
    """threshold (multi-label): one threshold for every tag, or one per tag (per_class)."""
    if kind == "single_label":
        return Task(
            kind,
            nn.CrossEntropyLoss(label_smoothing=label_smoothing),
            lambda o: torch.softmax(o.float(), -1),
            _single_metrics,
            "accuracy",
            ("valid_loss", "train_loss", "accuracy"),
        )
    if kind == "multi_label":
        metrics = partial(_multi_metrics, per_tag=threshold == "per_class")
        reports = ("valid_loss", "train_loss", "fbeta", "accuracy_thresh")
        return Task(kind, nn.BCEWithLogitsLoss(), lambda o: torch.sigmoid(o.float()), metrics, "fbeta", reports)
    if kind == "language_model":
        reports = ("valid_loss", "train_loss", "bpc", "accuracy")
        return Task(kind, FlatCrossEntropy(), lambda o: torch.softmax(o.float(), -1), _lm_metrics, "accuracy", reports)
    raise ValueError(f"unknown task {kind}")


def soft_targets(kind: str, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Training targets as probabilities, for MixUp and CutMix to mix: one-hot rows (single-label),
    the multi-hot rows as floats (multi-label). The losses take them as they are: nn.CrossEntropyLoss
    reads float targets as probabilities and smooths them (linear, so smoothing the mix equals
    mixing smoothed one-hots, as timm does), BCEWithLogitsLoss any targets in [0, 1]. Validation,
    TTA and predict keep the class indices (accuracy needs them)."""
    if kind == "single_label":
        return F.one_hot(y, n_classes).float()
    if kind == "multi_label":
        return y.float()
    raise ValueError(
        f"transforms.mixup/cutmix mix images and their labels; a {kind.replace('_', ' ')} run has no images to mix"
    )


def check_loss(loss: str, data_kind: str) -> None:
    """train.loss must suit the labels: bce for several tags per image, cross_entropy for one."""
    if (loss, data_kind) == ("bce", "single_label"):
        raise ValueError(
            "train.loss: bce needs multi-label data (several tags per row of a labels CSV); "
            "this dataset has one label per image: use cross_entropy or auto"
        )
    if (loss, data_kind) == ("cross_entropy", "multi_label"):
        raise ValueError(
            "train.loss: cross_entropy needs one label per image; this dataset has several "
            "tags per image: use bce or auto"
        )

"""Tasks: the loss, the output activation and the metrics that go with a kind of target."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def fbeta_samples(probs: torch.Tensor, y: torch.Tensor, thresh: float = 0.5, beta: float = 2.0) -> float:
    """F-beta averaged over samples (the planet competition's metric)."""
    pred = (probs > thresh).float()
    tp = (pred * y).sum(1)
    precision = tp / pred.sum(1).clamp_min(1e-9)
    recall = tp / y.sum(1).clamp_min(1e-9)
    b2 = beta**2
    f = (1 + b2) * precision * recall / (b2 * precision + recall).clamp_min(1e-9)
    return f.mean().item()


def best_threshold(probs: torch.Tensor, y: torch.Tensor) -> float:
    """The threshold with the best F2 on these predictions (chosen on the validation set)."""
    grid = torch.linspace(0.05, 0.95, 19)
    scores = [fbeta_samples(probs, y, t.item()) for t in grid]
    return round(grid[int(torch.tensor(scores).argmax())].item(), 2)


@dataclass
class Task:
    name: str
    loss_fn: nn.Module
    activation: Callable[[torch.Tensor], torch.Tensor]
    metrics: Callable[[torch.Tensor, torch.Tensor], dict]
    main_metric: str


def _single_metrics(logits, y):
    return {"accuracy": accuracy(logits, y)}


def _multi_metrics(logits, y):
    probs = torch.sigmoid(logits.float())
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


def make_task(kind: str, label_smoothing: float = 0.0) -> Task:
    if kind == "single_label":
        return Task(
            kind,
            nn.CrossEntropyLoss(label_smoothing=label_smoothing),
            lambda o: torch.softmax(o.float(), -1),
            _single_metrics,
            "accuracy",
        )
    if kind == "multi_label":
        return Task(kind, nn.BCEWithLogitsLoss(), lambda o: torch.sigmoid(o.float()), _multi_metrics, "fbeta")
    if kind == "language_model":
        return Task(kind, FlatCrossEntropy(), lambda o: torch.softmax(o.float(), -1), _lm_metrics, "accuracy")
    raise ValueError(f"unknown task {kind}")


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

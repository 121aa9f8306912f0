"""`trainer compare`: two or more runs side by side: the config keys that differ, the final and best
metrics, and their curves overlaid in one picture."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from trainer.config import flat_keys
from trainer.config.base import LOWER_IS_BETTER, better_mode
from trainer.inference.runs import RunInfo, finite, is_run_dir, read_run
from trainer.run.plots import _figure, _save
from trainer.storage import writable_picture

NOT_METRICS = {"stage", "epoch", "lr", "seconds", "peak_lr", "threshold", "skipped_steps"}
MAIN_METRICS = ("accuracy", "fbeta", "bpc")  # the second plot's metric when the monitor is a loss
MISSING = object()  # a key one config has and another has not


@dataclass
class Comparison:
    labels: list[str]
    differences: list[tuple[str, list[str]]]  # dotted key, its value in each run
    metrics: list[tuple[str, list[str]]]  # metric, "final (best b)" in each run
    picture: Path
    notes: list[str]  # what could not be read of a run (its metrics, its status)


def compare_runs(paths: list[Path], out: Path) -> Comparison:
    if len(paths) < 2:
        raise ValueError("compare needs two or more run directories")
    target = writable_picture(out)  # checked before any work
    runs = [load(Path(p)) for p in paths]
    labels = short_labels([r.path for r in runs])
    plot_curves(runs, labels, target)
    return Comparison(
        labels,
        config_differences(runs),
        metrics_side_by_side(runs),
        target,
        [f"{label}: {run.reason}" for label, run in zip(labels, runs, strict=True) if run.problems],
    )


def load(path: Path) -> RunInfo:
    if not is_run_dir(path):
        raise ValueError(f"{path}: not a run directory (no config.yaml, status.json, metrics.csv or log.txt)")
    run = read_run(path)
    if run.config is None:
        raise ValueError(f"{path}: cannot compare a run whose config cannot be read ({run.problems[0]})")
    return run


def short_labels(paths: list[Path]) -> list[str]:
    """The shortest path endings that tell the runs apart: the folder name when that is enough."""
    parts = [Path(p).resolve().parts for p in paths]
    distinct = len(set(parts))
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = [str(Path(*p[-k:])) for p in parts]
        if len(set(labels)) == distinct:
            break
    if distinct < len(labels):  # the same run given twice
        labels = [f"{label} ({n})" for n, label in enumerate(labels, 1)]
    return labels


def config_differences(runs: list[RunInfo]) -> list[tuple[str, list[str]]]:
    flat = [flat_keys(r.config.model_dump(mode="json")) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for key in keys:
        values = [f.get(key, MISSING) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append((key, [show_value(v) for v in values]))
    return rows


def show_value(value) -> str:
    if value is MISSING:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def metric_columns(runs: list[RunInfo]) -> list[str]:
    columns = dict.fromkeys(k for r in runs for row in r.metrics for k in row)
    return [c for c in columns if c not in NOT_METRICS]


def metrics_side_by_side(runs: list[RunInfo]) -> list[tuple[str, list[str]]]:
    return [(metric, [final_and_best(r.metrics, metric) for r in runs]) for metric in metric_columns(runs)]


def final_and_best(rows: list[dict], metric: str) -> str:
    values = [r[metric] for r in rows if finite(r.get(metric))]
    if not values:
        return "-"
    best = min(values) if better_mode(metric) == "min" else max(values)
    final = rows[-1].get(metric)
    return f"{final:.4g} (best {best:.4g})" if final is not None else f"- (best {best:.4g})"


def main_metric(runs: list[RunInfo]) -> str | None:
    """The runs' monitored metric when it is not a loss, else the first of accuracy, fbeta, bpc they have."""
    present = set(metric_columns(runs))
    monitors = [r.monitor for r in runs if r.monitor not in LOWER_IS_BETTER and not r.monitor.endswith("loss")]
    return next((m for m in (*monitors, *MAIN_METRICS) if m in present), None)


def curve(rows: list[dict], column: str) -> list[float]:
    return [r[column] if isinstance(r.get(column), float) else math.nan for r in rows]


def plot_curves(runs: list[RunInfo], labels: list[str], path: Path) -> Path:
    """Losses (valid solid, train dashed, one colour a run) and the main metric against the epoch."""
    from matplotlib.ticker import MaxNLocator

    metric = main_metric(runs)
    fig, (ax_loss, ax_metric) = _figure(2, 3.2)
    for n, (run, label) in enumerate(zip(runs, labels, strict=True)):
        colour, epochs = f"C{n % 10}", list(range(1, len(run.metrics) + 1))
        name = label if run.name in label.split("/") else f"{run.name} ({label})"
        ax_loss.plot(epochs, curve(run.metrics, "valid_loss"), "o-", color=colour, markersize=3, label=name)
        ax_loss.plot(epochs, curve(run.metrics, "train_loss"), "--", color=colour, alpha=0.7)
        if metric:
            ax_metric.plot(epochs, curve(run.metrics, metric), "o-", color=colour, markersize=3, label=name)
    ax_loss.set_ylabel("loss (valid solid, train dashed)")
    ax_loss.legend(fontsize="small")
    ax_metric.set_ylabel(metric or "no metric in these runs")
    ax_metric.set_xlabel("epoch")
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metric:
        ax_metric.legend(fontsize="small")
    return _save(fig, path)

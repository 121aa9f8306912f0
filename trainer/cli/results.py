"""Commands on a finished run: predict, evaluate, export, generate."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from trainer.cli import common
from trainer.cli.common import app, fail, guarded


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    data: Path = typer.Option(..., help="Folder of images (or one image)."),
    out: Path | None = typer.Option(None, help="CSV file (default RUN_DIR/predictions.csv)."),
    labels: bool = typer.Option(False, "--labels", help="Only id and label(s), no probabilities."),
    probs: bool = typer.Option(False, "--probs", help="Only id and one probability column per class."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation (the config's tta: n, beta)."),
    id_column: str = typer.Option("id", help="Name of the id column (planet: image_name)."),
    checkpoint: str = typer.Option("best", help="best, last, top-K (checkpoint.keep) or cycle-K."),
    ensemble: str = typer.Option(
        "none", help="cycles: average the SGDR snapshots (checkpoints/cycle-<k>.pt of save_cycles: true)."
    ),
):
    """Predict a folder of images: id, predicted label(s), one probability column per class."""
    from trainer.inference.finished import load_run
    from trainer.inference.predict import cycle_checkpoints, predict_ensemble, predict_folder, predictions_table
    from trainer.storage import writable_file, write_output

    if ensemble not in ("none", "cycles"):
        fail(f"--ensemble must be none or cycles, not '{ensemble}'")

    if labels and probs:
        fail("--labels and --probs exclude each other")
    if not data.exists():
        fail(f"--data {data}: no such file or folder")

    def work():
        target = writable_file(out or run_dir / "predictions.csv")  # checked before any work
        run = load_run(run_dir, checkpoint)
        if ensemble == "cycles":
            snapshots = cycle_checkpoints(run_dir)
            files, p = predict_ensemble(run, data, snapshots)
            common.console.print(
                f"averaged {len(snapshots)} snapshots ({', '.join(s.stem for s in snapshots)})", highlight=False
            )
        else:
            files, p = predict_folder(run, data, tta=tta)
        table = predictions_table(
            files,
            p,
            run.classes,
            run.multi_label,
            run.threshold,
            labels_only=labels,
            probs_only=probs,
            id_column=id_column,
        )
        write_output(target, lambda f: f.write(table.to_csv(index=False).encode("utf-8")))
        return len(table), target

    n, target = guarded(work)
    common.console.print(f"wrote {n} predictions to {target}", highlight=False, soft_wrap=True)


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., help="A language-model run directory."),
    prime: str = typer.Option(..., help='Text to start from, e.g. "for thos".'),
    chars: int = typer.Option(400, min=0, help="How many characters to generate."),
    temperature: float = typer.Option(0.8, min=0.0, help="Sampling temperature; 0 is greedy."),
    seed: int | None = typer.Option(None, min=0, max=2**63 - 1, help="Seed for the sampling (default: random)."),
    checkpoint: str = typer.Option("best", help="best or last."),
):
    """Generate text from a character-level language model: the prime, then --chars more."""
    from trainer.inference.generate import generate as sample
    from trainer.inference.generate import load_text_run

    if not temperature < math.inf:
        fail(f"--temperature {temperature}: must be 0 (greedy) or a finite positive number")

    def work():
        run = load_text_run(run_dir, checkpoint)
        return sample(run.model, run.vocab, prime, chars, temperature, seed, run.device)

    typer.echo(guarded(work))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    format: str = typer.Option("safetensors", "--format", help="safetensors, onnx or torchscript."),
    out: Path | None = typer.Option(None, help="Output file (default RUN_DIR/export/model.<ext>)."),
    checkpoint: str = typer.Option("best", help="best or last."),
    verify: bool = typer.Option(True, help="Reload the export and compare its outputs."),
):
    """Export the trained model for deployment, with its classes and input statistics inside."""
    from trainer.inference.export import FORMATS, export_run

    if format not in FORMATS:
        fail(f"--format {format}: expected one of {', '.join(FORMATS)}")
    result = guarded(lambda: export_run(run_dir, format, out, checkpoint, verify))
    common.console.print(
        f"wrote {result.path} ({result.format}, {result.size_bytes / 1e6:.2f} MB)"
        + (f"; verified, max |difference| {result.max_diff:.2e}" if result.max_diff is not None else ""),
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    tta: bool = typer.Option(False, "--tta", help="Also report metrics with test-time augmentation."),
    heatmap: bool = typer.Option(False, "--heatmap", help="Grad-CAM heat maps over the top losses."),
    data: Path | None = typer.Option(None, help="The dataset folder, if not where the run found it."),
    out: Path | None = typer.Option(None, help="Folder for the plots and tables (default RUN_DIR)."),
    k: int = typer.Option(9, min=1, help="How many top losses to show."),
    checkpoint: str = typer.Option("best", help="best, last, top-K (checkpoint.keep) or cycle-K."),
    ensemble: str = typer.Option("none", help="cycles: also score the mean of the SGDR snapshots."),
):
    """Metrics and per-class accuracy on the validation set; confusion matrix, most confused
    pairs and top losses (with --heatmap, Grad-CAM over them)."""
    from trainer.inference.evaluate import evaluate as run_eval
    from trainer.inference.finished import load_run
    from trainer.inference.predict import cycle_checkpoints

    if ensemble not in ("none", "cycles"):
        fail(f"--ensemble must be none or cycles, not '{ensemble}'")

    def work():
        snapshots = cycle_checkpoints(run_dir) if ensemble == "cycles" else None
        log = lambda m: common.console.print(m, highlight=False)  # noqa: E731
        return run_eval(load_run(run_dir, checkpoint), data, tta, heatmap, out, k, log=log, ensemble=snapshots)

    ev = guarded(work)
    columns = {"plain": ev.metrics, "tta": ev.metrics_tta, f"ensemble of {ev.snapshots}": ev.metrics_ensemble}
    columns = {name: m for name, m in columns.items() if m}
    table = Table("metric", *columns)
    for name, v in ev.metrics.items():
        if isinstance(v, (int, float)):
            table.add_row(name, *(f"{m[name]:.4f}" for m in columns.values()))
    common.console.print(table)
    extra = ["precision", "recall", "f2"] if ev.per_class and "f2" in ev.per_class[0] else []
    classes = Table("class", "n", "accuracy", *extra)
    for r in ev.per_class:
        classes.add_row(r["class"], str(r["n"]), *(f"{r[c]:.4f}" for c in ["accuracy", *extra]))
    common.console.print(classes)
    for w in ev.warnings:
        common.errors.print(f"warning: {w}", highlight=False, soft_wrap=True)
    if ev.confused:
        confused = Table("actual", "predicted", "count", title="most confused")
        for r in ev.confused[:10]:
            confused.add_row(r["actual"], r["predicted"], str(r["count"]))
        common.console.print(confused)
    for path in ev.files.values():
        common.console.print(f"wrote {path}", highlight=False, soft_wrap=True)

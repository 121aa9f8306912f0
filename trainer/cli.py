"""The command line: each command parses, calls one procedure, prints. No training code here."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.exceptions import TyperException

from trainer.config import Config, ConfigError, dump_config, load_config
from trainer.data.items import DataError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train image classifiers and character-level language models from a YAML config.",
)
console = Console()  # results
errors = Console(stderr=True)  # errors and warnings

CONFIG = typer.Argument(..., help="YAML config file.")
SETS = typer.Option(None, "--set", help="Override a key, e.g. --set data.bs=64 (repeatable).")


def fail(message: str, code: int = 2, show: bool = True):
    # escaped: a message quoting the user's input ("[1, 2]", a path) is text, not rich markup
    if show:
        errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load(config: Path, sets: list[str] | None) -> Config:
    from trainer.run.tracking import missing_packages
    from trainer.train.plan import CONFIG_CHECKS

    try:
        return load_config(config, sets or [], checks=(*CONFIG_CHECKS, missing_packages))
    except ConfigError as e:
        fail(str(e))


def guarded(fn):
    """Known user errors become one clear line and exit code 2, never a traceback."""
    from trainer.train.plan import StageError

    if os.environ.get("TRAINER_DEBUG"):  # the whole traceback, for a bug report
        return fn()
    try:
        return fn()
    except (DataError, StageError, ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e), show=not getattr(e, "rank0_says", False))
    except (RuntimeError, OSError) as e:  # a diverged run, a full disk: the run failed, say why
        said = e.strerror if isinstance(e, OSError) and e.strerror and e.filename is None else str(e)
        fail(said, 1, show=not getattr(e, "rank0_says", False))


@app.command()
def fit(
    config: Path = CONFIG,
    sets: list[str] | None = SETS,
    out: Path | None = typer.Option(None, help="Run directory (default runs/<name>/<time>)."),
    smoke: bool = typer.Option(False, help="Every stage on a few batches: does the pipeline work?"),
    resume: str | None = typer.Option(
        None,
        help="RUN_DIR, or auto (the newest unfinished run of this config): continue exactly from its last checkpoint.",
    ),
    devices: int | None = typer.Option(
        None,
        "--devices",
        min=1,
        help="Train with N processes on this machine (DDP; one per GPU), started as torchrun would.",
    ),
    allow_changes: bool = typer.Option(
        False, "--allow-changes", help="With --resume: let stages that have not started change (epochs, cycles, lr...)."
    ),
    launched_with: int | None = typer.Option(None, "--launched-with-devices", hidden=True),
):
    """Train: run every stage of the config and write a run directory."""
    from trainer.run import launch
    from trainer.run.fit import fit as run_fit
    from trainer.run.signals import Interrupted

    cfg = load(config, sets)
    if resume is not None and out is not None:
        fail("--resume continues in the run's own directory; leave out --out")
    if devices is not None:
        raise typer.Exit(
            launch.launch(
                devices,
                launch.fit_args(config, sets, out, smoke, resume, devices, allow_changes),
                log=lambda m: console.print(m, highlight=False, markup=False),
            )
        )
    main = launch.is_main_process()  # under torchrun only rank 0 reports
    throwaway = smoke and out is None and resume is None  # removed when it passes, kept when it fails
    if throwaway and main:
        out = Path(tempfile.mkdtemp(prefix=f"trainer-smoke-{cfg.name}-"))
    try:
        result = guarded(lambda: run_fit(cfg, out, smoke, console, resume=resume, allow_changes=allow_changes))
    except typer.Exit as e:
        if throwaway and main and e.exit_code:
            errors.print(f"the smoke run's directory is kept for a look: {out}", highlight=False, soft_wrap=True)
        raise
    except Interrupted as e:
        command = shlex.join(
            launch.resume_command(
                [
                    "trainer",
                    "fit",
                    str(config),
                    *[a for s in sets or [] for a in ("--set", s)],
                    "--resume",
                    str(e.run_dir),
                ],
                launched_with,
            )
        )
        if main:
            console.print(f"{e}\nresume with: {command}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        console.print("interrupted before training started: nothing to save", highlight=False)
        raise typer.Exit(130) from None
    if main and throwaway:
        shutil.rmtree(result.run_dir, ignore_errors=True)
        console.print("smoke run passed (its temporary run directory is removed; --out DIR keeps one)", highlight=False)
    elif main:
        console.print(f"run directory: {result.run_dir}", highlight=False)
        if smoke:
            console.print("smoke run passed", highlight=False)


@app.command()
def check(config: Path = CONFIG, sets: list[str] | None = SETS):
    """Validate a config and print it resolved (every default filled in)."""
    cfg = load(config, sets)
    console.print(dump_config(cfg), end="", highlight=False, markup=False)


@app.command()
def schema():
    """Print the config's JSON schema (for editor completion and validation)."""
    print(json.dumps(Config.model_json_schema(), indent=1))


@app.command()
def summary(
    config: Path = CONFIG,
    sets: list[str] | None = SETS,
    stage: str | None = typer.Option(None, help="Show the model as this stage freezes it (default: the first)."),
):
    """A per-layer table: layer, output shape, parameters, trainable (like learn.summary())."""
    from trainer.inference.summary import summarize

    cfg = load(config, sets)
    rows, total, trainable, name = guarded(lambda: summarize(cfg, stage))
    console.print(f"as stage '{name}' trains it:", highlight=False)
    table = Table("layer", "output shape", "parameters", "trainable")
    for r in rows:
        table.add_row(r["layer"], str(r["shape"]), f"{r['params']:,}", str(r["trainable"]))
    console.print(table)
    console.print(f"total parameters: {total:,}  trainable: {trainable:,}", highlight=False)


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

    def work():
        target = writable_file(out or run_dir / "predictions.csv")  # checked before any work
        run = load_run(run_dir, checkpoint)
        if ensemble == "cycles":
            snapshots = cycle_checkpoints(run_dir)
            files, p = predict_ensemble(run, data, snapshots)
            console.print(
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
    console.print(f"wrote {n} predictions to {target}", highlight=False)


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
    console.print(
        f"wrote {result.path} ({result.format}, {result.size_bytes / 1e6:.2f} MB)"
        + (f"; verified, max |difference| {result.max_diff:.2e}" if result.max_diff is not None else ""),
        highlight=False,
    )


@app.command("lr-find")
def lr_find(
    config: Path = CONFIG,
    sets: list[str] | None = SETS,
    stage: str | None = typer.Option(
        None, help="Stage whose freeze state, size, batch size and lr ratios to use (default: the first)."
    ),
    start_lr: float = typer.Option(1e-7, "--start-lr", help="First learning rate."),
    end_lr: float = typer.Option(10.0, "--end-lr", help="Last learning rate."),
    num_it: int = typer.Option(100, "--num-it", help="At most this many batches."),
    out: Path | None = typer.Option(None, help="Folder for lr_find.csv/.png (default runs/<name>/lr_find-<time>)."),
):
    """The learning-rate range test: loss against an exponentially growing lr, with suggestions.
    The model and optimizer are left exactly as they were; the same config gives the same curve."""
    from trainer.run import launch
    from trainer.run.find_lr import lr_find_stage

    cfg = load(config, sets)
    result, folder = guarded(lambda: lr_find_stage(cfg, stage, start_lr, end_lr, num_it, out, console))
    if not launch.is_main_process():  # under torchrun, rank 0 reports
        return
    table = Table("suggestion", "lr", "")
    for name, lr in result.suggestions.items():
        table.add_row(name, f"{lr:.3g}", "recommended" if name == result.recommended else "")
    console.print(table)
    console.print(
        f"{len(result.lrs)} steps, stopped: {result.stopped}; recommended lr {result.lr:.3g}", highlight=False
    )
    console.print(f"wrote lr_find.csv, lr_find.json, lr_find.png to {folder}", highlight=False)


@app.command("show-batch")
def show_batch(
    config: Path = CONFIG,
    sets: list[str] | None = SETS,
    out: Path = typer.Option(Path("batch.png"), help="Image file to write."),
    n: int = typer.Option(16, min=1, help="How many images."),
):
    """A grid of augmented training images with their labels (check the transforms by eye)."""
    from trainer.inference.pictures import show_batch as draw

    cfg = load(config, sets)
    path = guarded(lambda: draw(cfg, out, n, log=lambda m: console.print(m, highlight=False)))
    console.print(f"wrote {path}", highlight=False)


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
        log = lambda m: console.print(m, highlight=False)  # noqa: E731
        return run_eval(load_run(run_dir, checkpoint), data, tta, heatmap, out, k, log=log, ensemble=snapshots)

    ev = guarded(work)
    columns = {"plain": ev.metrics, "tta": ev.metrics_tta, f"ensemble of {ev.snapshots}": ev.metrics_ensemble}
    columns = {name: m for name, m in columns.items() if m}
    table = Table("metric", *columns)
    for name, v in ev.metrics.items():
        if isinstance(v, (int, float)):
            table.add_row(name, *(f"{m[name]:.4f}" for m in columns.values()))
    console.print(table)
    extra = ["precision", "recall", "f2"] if ev.per_class and "f2" in ev.per_class[0] else []
    classes = Table("class", "n", "accuracy", *extra)
    for r in ev.per_class:
        classes.add_row(r["class"], str(r["n"]), *(f"{r[c]:.4f}" for c in ["accuracy", *extra]))
    console.print(classes)
    for w in ev.warnings:
        errors.print(f"warning: {w}", highlight=False, soft_wrap=True)
    if ev.confused:
        confused = Table("actual", "predicted", "count", title="most confused")
        for r in ev.confused[:10]:
            confused.add_row(r["actual"], r["predicted"], str(r["count"]))
        console.print(confused)
    for path in ev.files.values():
        console.print(f"wrote {path}", highlight=False)


@app.command("runs")
def runs_cmd(
    folder: Path = typer.Argument(Path("runs"), help="Folder to look for run directories in (at any depth)."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list on stdout instead of the table."),
):
    """Every run under a folder, newest first: status, epochs, best monitored metric, wall time."""
    from trainer.inference.runs import COLUMNS, list_runs, row

    if not folder.is_dir():
        fail(f"{folder}: {'is not a folder' if folder.exists() else 'no such folder'}")
    found = guarded(lambda: list_runs(folder))
    if as_json:
        print(json.dumps([r.as_dict() for r in found], indent=1))
        return
    if not found:
        console.print(f"no runs found under {folder}", highlight=False, markup=False)
        return
    table = Table(*COLUMNS)
    for column in table.columns:
        column.no_wrap = column.header in ("started", "epochs", "wall")
    # whole paths (to copy) when the other columns still have room (about 90 characters), else folded
    table.columns[-1].no_wrap = console.width >= 90 + max(len(str(r.path)) for r in found)
    table.columns[-1].overflow = "fold"
    for r in found:
        table.add_row(*(escape(cell) for cell in row(r)))
    console.print(table)


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Two or more run directories."),
    out: Path = typer.Option(Path("compare.png"), help="Image file for the curves."),
):
    """Runs side by side: the config keys that differ, final and best metrics, curves overlaid."""
    from trainer.inference.compare import compare_runs

    if len(run_dirs) < 2:
        fail("compare needs two or more run directories")
    result = guarded(lambda: compare_runs(run_dirs, out))
    for note in result.notes:
        errors.print(f"warning: {note}", highlight=False, markup=False, soft_wrap=True)
    if result.differences:
        table = Table("config key", *map(escape, result.labels), title="config differences")
        for key, values in result.differences:
            table.add_row(escape(key), *map(escape, values))
        console.print(table)
    else:
        console.print("the configs are the same", highlight=False)
    table = Table("metric", *map(escape, result.labels), title="final (best)")
    for metric, values in result.metrics:
        table.add_row(escape(metric), *values)
    console.print(table)
    console.print(f"wrote {result.picture}", highlight=False, markup=False)


@app.command()
def sweep(
    config: Path = CONFIG,
    space: Path = typer.Option(..., "--space", help="Search space YAML: objective, sampler, pruner, params."),
    trials: int = typer.Option(..., "--trials", min=1, help="Trials the study holds when done (all processes)."),
    out: Path | None = typer.Option(None, help="Sweep folder (default sweeps/<study>): sweep.db, trials/, results."),
    storage: str | None = typer.Option(None, help="Optuna storage URL (default sqlite:///OUT/sweep.db)."),
    study: str | None = typer.Option(None, help="Study name (default the config's name); same name, same study."),
    timeout: float | None = typer.Option(None, min=1, help="Start no trial after this many seconds."),
    sets: list[str] | None = SETS,
):
    """Hyperparameter search with Optuna: each trial an ordinary run, pruned on its epochs; run the
    same command again (or on another machine with the same --storage) to continue the study."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        fail("trainer sweep needs Optuna, which is not installed: pip install -e '.[sweep]'")
    from trainer.sweep.report import best_trials, summary_line, write_results
    from trainer.sweep.space import load_space
    from trainer.sweep.study import MARKER, Sweep, open_study, run_sweep

    space_, base = guarded(lambda: load_space(space, config, sets or []))
    name = study or base.name
    out = out or Path("sweeps") / name
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        fail(f"--out {out}: not a sweep folder of trainer (no {MARKER}); give a new or empty folder")
    say = lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    job = Sweep(config, sets or [], space_, out, trials, storage, name, timeout, say, console)
    code = 0
    try:
        result = guarded(lambda: run_sweep(job))
    except KeyboardInterrupt:
        errors.print("interrupted: the trial that was running is recorded as failed; run the same command to continue")
        result, code = open_study(job), 130
    files = guarded(lambda: write_results(result, out, config, sets or [], space_.objective.monitor))
    console.print(summary_line(result), highlight=False)
    _best_table(best_trials(result, 5), space_.objective.monitor)
    for f in files:
        console.print(f"wrote {f}", highlight=False, markup=False)
    raise typer.Exit(code)


@app.command("sweep-report")
def sweep_report(
    folder: Path = typer.Argument(..., help="A sweep folder."),
    storage: str | None = typer.Option(None, help="The study's storage URL when not the folder's sweep.db."),
    study: str | None = typer.Option(None, help="The study name (default: the folder's)."),
    n: int = typer.Option(10, min=1, help="How many of the best trials."),
):
    """The best trials of a sweep, best first (the study may still be running)."""
    import optuna

    from trainer.sweep.report import best_trials, summary_line
    from trainer.sweep.study import MARKER

    marker = folder / MARKER
    if not marker.is_file():
        fail(f"{folder}: not a sweep folder (no {MARKER})")
    saved = guarded(lambda: json.loads(marker.read_text()))
    url = storage or (saved.get("storage") if "***" not in str(saved.get("storage")) else None)
    if url is None:
        fail(f"{folder}: its storage URL holds a password; give it with --storage")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    found = guarded(lambda: optuna.load_study(study_name=study or saved.get("study"), storage=url))
    console.print(summary_line(found), highlight=False)
    rows = best_trials(found, n)
    monitor = found.user_attrs.get("monitor", "value")
    _best_table(rows, monitor)


def _best_table(rows: list[dict], monitor: str) -> None:
    if not rows:
        console.print("no trial has completed yet", highlight=False)
        return
    params = [k for k in rows[0] if k.startswith("params.")]
    table = Table("trial", monitor, "seconds", *(k.removeprefix("params.") for k in params), "run directory")
    for r in rows:
        cells = [str(r["number"]), f"{r['value']:.4g}", str(r["seconds"]), *(_cell(r.get(k)) for k in params)]
        table.add_row(*map(escape, cells), escape(r["run_dir"]))
    console.print(table)


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main() -> None:
    """Usage errors (an unknown option, a value of the wrong type) as one line on stderr: typer's
    own report is a box of many lines."""
    try:
        code = app(prog_name="trainer", standalone_mode=False)
    except typer.Abort:
        errors.print("aborted", highlight=False)
        sys.exit(1)
    except TyperException as e:  # typer's usage errors
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        errors.print(f"[red]error:[/red] {escape(e.format_message())}{hint}", highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())

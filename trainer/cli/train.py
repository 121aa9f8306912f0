"""Commands that train or look at a config: fit, check, schema, summary, lr-find, show-batch."""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from pathlib import Path

import typer
from rich.table import Table

from trainer.cli import common
from trainer.cli.common import CONFIG, SETS, app, fail, guarded, load
from trainer.config import Config, dump_config


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
                log=lambda m: common.console.print(m, highlight=False, markup=False),
            )
        )
    main = launch.is_main_process()  # under torchrun only rank 0 reports
    throwaway = smoke and out is None and resume is None  # removed when it passes, kept when it fails
    if throwaway and main:
        out = Path(tempfile.mkdtemp(prefix=f"trainer-smoke-{cfg.name}-"))
    try:
        result = guarded(lambda: run_fit(cfg, out, smoke, common.console, resume=resume, allow_changes=allow_changes))
    except typer.Exit as e:
        if throwaway and main and e.exit_code:
            common.errors.print(f"the smoke run's directory is kept for a look: {out}", highlight=False, soft_wrap=True)
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
            common.console.print(f"{e}\nresume with: {command}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        common.errors.print("interrupted before training started: nothing to save", highlight=False)
        raise typer.Exit(130) from None
    if main and throwaway:
        shutil.rmtree(result.run_dir, ignore_errors=True)
        common.console.print(
            "smoke run passed (its temporary run directory is removed; --out DIR keeps one)", highlight=False
        )
    elif main:
        common.console.print(f"run directory: {result.run_dir}", highlight=False)
        if smoke:
            common.console.print("smoke run passed", highlight=False)


@app.command()
def check(config: Path = CONFIG, sets: list[str] | None = SETS):
    """Validate a config and print it resolved (every default filled in)."""
    cfg = load(config, sets)
    common.console.print(dump_config(cfg), end="", highlight=False, markup=False)


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
    common.console.print(f"as stage '{name}' trains it:", highlight=False)
    table = Table("layer", "output shape", "parameters", "trainable")
    for r in rows:
        table.add_row(r["layer"], str(r["shape"]), f"{r['params']:,}", str(r["trainable"]))
    common.console.print(table)
    common.console.print(f"total parameters: {total:,}  trainable: {trainable:,}", highlight=False)


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
    result, folder = guarded(lambda: lr_find_stage(cfg, stage, start_lr, end_lr, num_it, out, common.console))
    if not launch.is_main_process():  # under torchrun, rank 0 reports
        return
    table = Table("suggestion", "lr", "")
    for name, lr in result.suggestions.items():
        table.add_row(name, f"{lr:.3g}", "recommended" if name == result.recommended else "")
    common.console.print(table)
    common.console.print(
        f"{len(result.lrs)} steps, stopped: {result.stopped}; recommended lr {result.lr:.3g}", highlight=False
    )
    common.console.print(f"wrote lr_find.csv, lr_find.json, lr_find.png to {folder}", highlight=False, soft_wrap=True)


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
    path = guarded(lambda: draw(cfg, out, n, log=lambda m: common.console.print(m, highlight=False)))
    common.console.print(f"wrote {path}", highlight=False, soft_wrap=True)

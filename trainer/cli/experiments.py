"""Commands over many runs: runs, compare, sweep, sweep-report."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from trainer.cli import common
from trainer.cli.common import CONFIG, SETS, app, fail, guarded
from trainer.config.schema import name_problem


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
        common.console.print(f"no runs found under {folder}", highlight=False, markup=False)
        return
    table = Table(*COLUMNS)
    for column in table.columns:
        column.no_wrap = column.header in ("started", "epochs", "wall")
    # whole paths (to copy) when the other columns still have room (about 90 characters), else folded
    table.columns[-1].no_wrap = common.console.width >= 90 + max(len(str(r.path)) for r in found)
    table.columns[-1].overflow = "fold"
    for r in found:
        table.add_row(*(escape(cell) for cell in row(r)))
    common.console.print(table)


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
        common.errors.print(f"warning: {note}", highlight=False, markup=False, soft_wrap=True)
    if result.differences:
        table = Table("config key", *map(escape, result.labels), title="config differences")
        for key, values in result.differences:
            table.add_row(escape(key), *map(escape, values))
        common.console.print(table)
    else:
        common.console.print("the configs are the same", highlight=False)
    table = Table("metric", *map(escape, result.labels), title="final (best)")
    for metric, values in result.metrics:
        table.add_row(escape(metric), *values)
    common.console.print(table)
    common.console.print(f"wrote {result.picture}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def sweep(
    config: Path = CONFIG,
    space: Path = typer.Option(..., "--space", help="Search space YAML: objective, sampler, pruner, params, enqueue."),
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
    from trainer.sweep.database import shares_mlflow_store
    from trainer.sweep.report import all_failed, best_trials, summary_line, write_results
    from trainer.sweep.space import load_space
    from trainer.sweep.study import MARKER, OWN_FILES, Sweep, open_study, run_sweep

    space_, base = guarded(lambda: load_space(space, config, sets or []))
    if study is not None and (problem := name_problem(study)):
        fail(f"--study {study!r}: a study name {problem}")
    name = study or base.name
    out = out or Path("sweeps") / name
    # the default database without the marker: another worker is opening the study
    # right now (the marker follows); a second worker started then was refused, a flaky test found
    foreign = out.is_dir() and not (out / MARKER).is_file() and any(p.name not in OWN_FILES for p in out.iterdir())
    if out.exists() and (not out.is_dir() or foreign):
        fail(f"--out {out}: not a sweep folder of trainer (no {MARKER}); give a new or empty folder")
    held = guarded(lambda: json.loads((out / MARKER).read_text())) if (out / MARKER).is_file() else {}
    if held.get("study", name) != name:
        fail(
            f"--out {out} holds the study '{held['study']}'; give another --out for '{name}' (or --study {held['study']})"
        )
    say = lambda m: common.console.print(m, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    job = Sweep(config, sets or [], space_, out, trials, storage, name, timeout, say, common.console)
    if clash := shares_mlflow_store(job.url, base):
        fail(clash)
    code = 0
    try:
        result = guarded(lambda: run_sweep(job))
    except KeyboardInterrupt:
        common.errors.print(
            "interrupted: the running trial is recorded as failed and queued to run again (from its "
            "checkpoint); run the same command to continue",
            highlight=False,
            soft_wrap=True,
        )
        result, code = open_study(job), 130
    files = guarded(lambda: write_results(result, out, config, sets or [], space_.objective.monitor))
    common.console.print(summary_line(result), highlight=False)
    _best_table(best_trials(result, 5), space_.objective.monitor)
    for f in files:
        common.console.print(f"wrote {f}", highlight=False, markup=False, soft_wrap=True)
    failed = all_failed(result)
    if failed and code == 0:
        fail(f"every trial failed; trial {failed.number}'s error: {failed.user_attrs.get('error', '?')}", 1)
    raise typer.Exit(code)


@app.command("sweep-report")
def sweep_report(
    folder: Path | None = typer.Argument(None, help="A sweep folder (or give --storage)."),
    storage: str | None = typer.Option(None, help="The study's storage URL (default: the folder's)."),
    study: str | None = typer.Option(None, help="The study name (default: the folder's, or the storage's only one)."),
    n: int = typer.Option(10, min=1, help="How many of the best trials."),
):
    """The best trials of a sweep, best first (the study may still be running). From another
    machine, the storage URL alone does: trainer sweep-report --storage URL [--study NAME]."""
    import optuna

    from trainer.sweep.database import folder_storage, load_study
    from trainer.sweep.report import best_trials, in_folder, summary_line
    from trainer.sweep.study import MARKER

    saved = {}
    if folder is None and storage is None:
        fail("give a sweep folder, or the study's storage with --storage URL")
    if folder is not None:
        marker = folder / MARKER
        if not marker.is_file():
            fail(f"{folder}: not a sweep folder (no {MARKER})")
        saved = guarded(lambda: json.loads(marker.read_text()))
    url = storage or (saved.get("storage") if "***" not in str(saved.get("storage")) else None)
    if storage is None and folder is not None:
        url = folder_storage(url, folder)
    if url is None:
        fail(f"{folder}: its storage URL holds a password; give it with --storage")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    found = guarded(lambda: load_study(url, study or saved.get("study")))
    common.console.print(summary_line(found), highlight=False)
    rows = best_trials(found, n)
    for r in rows if folder is not None else ():  # as seen from here: the sweep may have run elsewhere
        r["run_dir"] = str(in_folder(Path(r["run_dir"]), folder))
    monitor = found.user_attrs.get("monitor", "value")
    _best_table(rows, monitor)


def _best_table(rows: list[dict], monitor: str) -> None:
    if not rows:
        common.console.print("no trial has completed yet", highlight=False)
        return
    params = [k for k in rows[0] if k.startswith("params.")]
    table = Table("trial", monitor, "seconds", *(k.removeprefix("params.") for k in params), "run directory")
    for r in rows:
        cells = [str(r["number"]), f"{r['value']:.4g}", str(r["seconds"]), *(_cell(r.get(k)) for k in params)]
        table.add_row(*map(escape, cells), escape(r["run_dir"]))
    common.console.print(table)


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

"""What every command shares: the app, the two consoles (results to stdout, errors to stderr),
loading a config, and turning known errors into one line and exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from trainer.config import Config, ConfigError
from trainer.data.items import DataError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train image classifiers and character-level language models from a YAML config.",
)


def results_console() -> Console:
    """Piped (a file, a CI log), rich would cut a table at 80 columns ("0.017…"): keep them whole,
    unless COLUMNS asks for a width."""
    return Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 1000)


console = results_console()  # results
errors = Console(stderr=True)  # errors and warnings

CONFIG = typer.Argument(..., help="YAML config file.")
SETS = typer.Option(None, "--set", help="Override a key, e.g. --set data.bs=64 (repeatable).")


def fail(message: str, code: int = 2, show: bool = True):
    # escaped: a message quoting the user's input ("[1, 2]", a path) is text, not rich markup
    if show:
        errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load(config: Path, sets: list[str] | None) -> Config:
    from trainer.run.checked import load_checked

    try:
        return load_checked(config, sets)
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

"""The command line: each command parses, calls one procedure, prints. No training code here.

common.py holds the app and what every command shares; the commands are in train.py (fit and
the tools around a config), results.py (a finished run) and experiments.py (many runs, sweeps)."""

from trainer.cli.common import app, console, errors, main

# isort: off
# importing a module registers its commands, in this order in `trainer --help`
from trainer.cli import train  # noqa: F401
from trainer.cli import results  # noqa: F401
from trainer.cli import experiments  # noqa: F401

# isort: on

__all__ = ["app", "console", "errors", "main"]

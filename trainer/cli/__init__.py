"""The command line: each command parses, calls one procedure, prints. No training code here.

common.py holds the app and what every command shares; the commands are in train.py (fit and
the tools around a config), results.py (a finished run) and experiments.py (many runs, sweeps)."""

import importlib

from trainer.cli.common import app, console, errors, main

for _module in ("train", "results", "experiments"):  # in this order in `trainer --help`
    importlib.import_module(f"trainer.cli.{_module}")  # importing registers the module's commands

__all__ = ["app", "console", "errors", "main"]

"""A config as every command loads it: the schema's rules, then the checks that need code beyond
the config package (a model's name and groups, the stages' plan, mixing, the trackers' packages)."""

from __future__ import annotations

from pathlib import Path

from trainer.config import Config, load_config
from trainer.run.tracking import foreign_store, missing_packages
from trainer.train.plan import CONFIG_CHECKS

CHECKS = (*CONFIG_CHECKS, missing_packages, foreign_store)


def load_checked(config: Path, sets: list[str] | None = None) -> Config:
    """The config file with its --set overrides, every check passed (a ConfigError otherwise)."""
    return load_config(config, sets or [], checks=CHECKS)

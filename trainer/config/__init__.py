"""Typed configuration: schema, YAML loading with located errors, overrides."""

from trainer.config.load import (
    ConfigError,
    apply_override,
    dump_config,
    flat_keys,
    load_config,
    node_at,
    parse_yaml,
    read_saved_config,
)
from trainer.config.schema import IMAGENET_STATS, Config, CsvData, FolderData, ModelConfig, Stage, TextData, Train

__all__ = [
    "IMAGENET_STATS",
    "Config",
    "ConfigError",
    "CsvData",
    "FolderData",
    "ModelConfig",
    "Stage",
    "TextData",
    "Train",
    "apply_override",
    "dump_config",
    "flat_keys",
    "load_config",
    "node_at",
    "parse_yaml",
    "read_saved_config",
]

"""Typed configuration: schema, YAML loading with located errors, overrides."""

from trainer.config.data_schema import IMAGENET_STATS, CsvData, FolderData, TextData
from trainer.config.load import apply_override, dump_config, flat_keys, load_config, read_saved_config
from trainer.config.schema import Config, ModelConfig, Stage, Train
from trainer.config.yaml_text import ConfigError, node_at, parse_yaml, yaml_word

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
    "yaml_word",
]

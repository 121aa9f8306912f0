"""YAML + --set overrides -> a validated Config, or one clear error per problem.

Errors name the file, the line, the key path and a hint, because a config typo found after
an hour of training is the most expensive typo there is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from trainer.config.errors import format_errors, unknown_nulls
from trainer.config.schema import Config
from trainer.config.yaml_text import ConfigError, parse_yaml


def apply_override(data: dict, assignment: str) -> str:
    """Applies `a.b.0.c=value` in place (value parsed as YAML); returns the dotted key."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. --set data.bs=64")
    key, raw = assignment.split("=", 1)
    value = parse_yaml(raw, f"--set {assignment}")[0] if raw else ""  # KEY= sets the empty word
    parts = key.strip().split(".")
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                raise ConfigError(f"--set {assignment}: {'.'.join(parts[: i + 1])}: no such list item")
            target = target[int(part)]
        else:
            target = target.setdefault(part, [] if nxt.isdigit() else {})
    last = parts[-1]
    if isinstance(target, list):
        if not last.isdigit() or int(last) >= len(target):
            raise ConfigError(f"--set {assignment}: {key}: no such list item")
        target[int(last)] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise ConfigError(f"--set {assignment}: {'.'.join(parts[:-1])} is not a mapping")
    return key.strip()


Check = Callable[[Config], list[tuple[str, str]]]


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), text: str | None = None, checks: Iterable[Check] = ()
) -> Config:
    """Reads, overrides and validates a config. `checks` add domain rules (e.g. the arch registry)
    from layers below this one, returning (dotted key, message) pairs. A config may say
    `extends: base.yaml`, relative to its own folder (to the current working directory for a
    config given as `text` without a `path`); the chain is merged child over base."""
    source = str(path) if path is not None else "<string>"
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except (UnicodeDecodeError, IsADirectoryError) as e:
            raise ConfigError(f"{source}: cannot read the config: {e}") from None
    data, node = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the config must be a mapping of keys (name, data, model, train)")
    chain = None
    if "extends" in data:
        from trainer.config.extends import resolve_extends  # it reads each base with yaml_text.parse_yaml

        data, chain = resolve_extends(data, node, source, Path(path).parent if path is not None else None)
    data = copy.deepcopy(data)
    origins = {}
    for assignment in overrides:
        origins[apply_override(data, assignment)] = f"--set {assignment}"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e.errors(), data, node, source, origins, chain)) from None
    typos = unknown_nulls(chain, data)
    if typos:
        raise ConfigError(format_errors(typos, data, node, source, origins, chain))
    problems = [p for check in (_check_paths, *checks) for p in check(cfg)]
    if problems:
        errs = [
            {
                "loc": tuple(int(p) if p.isdigit() else p for p in key.split(".")),
                "type": kind,
                "msg": msg,
                "input": None,
            }
            for key, msg, kind in _with_kind(problems)
        ]
        raise ConfigError(format_errors(errs, data, node, source, origins, chain))
    return cfg


def read_saved_config(path: str | Path) -> Config:
    """A run's own config.yaml: read safely and validated as any config, without the checks that
    need the data on this machine (predict and export work on a run moved elsewhere). It does not
    follow `extends`: a saved config is already merged, so the key is unknown here."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the run's config ({e})") from None
    data, node = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: not a run's config (a mapping of keys: name, data, model, train)")
    try:
        return Config.model_validate(data, context={"saved": True})
    except ValidationError as e:
        raise ConfigError(format_errors(e.errors(), data, node, str(path), {})) from None


def _check_paths(cfg: Config) -> list[tuple[str, str]]:
    if not Path(cfg.data.path).exists():
        return [
            (
                "data.path",
                f"'{cfg.data.path}' does not exist (prepare it with `python scripts/get_data.py`, or fix the path)",
            )
        ]
    valid_path = getattr(cfg.data, "valid_path", None)
    if valid_path and not Path(valid_path).is_file():
        return [("data.valid_path", f"'{valid_path}' is not a file")]
    if cfg.data.layout != "text" and not Path(cfg.data.path).is_dir():
        return [("data.path", f"'{cfg.data.path}' is a file; the {cfg.data.layout} layout needs the dataset's folder")]
    return []


def _with_kind(problems):
    for item in problems:
        yield (item[0], item[1], "semantic") if len(item) == 2 else item


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (every default filled in), saved with each run."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flat_keys(data, prefix: str = "") -> dict:
    """Dotted keys, as --set writes them: mappings and lists of mappings open up
    (train.stages.0.lr); any other list stays one value."""
    if isinstance(data, dict):
        return {k: v for key, val in data.items() for k, v in flat_keys(val, f"{prefix}{key}.").items()}
    if isinstance(data, list) and any(isinstance(v, dict) for v in data):
        return {k: v for i, val in enumerate(data) for k, v in flat_keys(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: data}

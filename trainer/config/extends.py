"""`extends: base.yaml`: a config written as the changes to another one.

The chain of files is merged child over base (mappings key by key, lists and scalars replaced
whole); each file keeps its YAML nodes, so an error still names the file and line that hold the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config.yaml_text import ConfigError, parse_yaml

MAX_DEPTH = 20  # files in one chain; a real chain holds two or three


@dataclass
class Chain:
    """The files of a config chain, child first: (source as shown in messages, YAML node tree)."""

    files: list[tuple[str, Any]]
    dropped: list[tuple] = field(default_factory=list)  # key paths a null named that no base set

    def owner(self, loc: tuple) -> tuple[str, Any]:
        """The nearest file (child first) that holds the key path; the child when none does."""
        return next(((s, n) for s, n in self.files if _holds(n, loc)), self.files[0])


def _holds(node, loc: tuple) -> bool:
    if node is None:
        return False  # an empty file holds no key
    for part in loc:
        if isinstance(node, yaml.SequenceNode):
            return True  # the first file that has a list owns all of it (lists are replaced whole)
        if not isinstance(node, yaml.MappingNode):
            return False
        hit = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
        if not hit:
            return False
        node = hit[0]
    return True


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13): reading it says so
        return path.absolute()


def _extends_line(node) -> int:
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "extends":
                return key.start_mark.line + 1
    return 1


def merge(base: dict, child: dict, dropped: list | None = None, at: tuple = ()) -> dict:
    """child over base: mappings merged key by key, anything else (lists too) replaced whole; a
    null in the child drops the base's key, so it takes its default, at any depth, whether the base
    has the section or not (JSON Merge Patch, RFC 7386). `dropped` collects the paths of nulls with
    no key under them (a typo drops nothing, silently)."""
    out = dict(base)
    for key, value in child.items():
        if value is None:
            if out.pop(key, None) is None and dropped is not None:
                dropped.append((*at, key))
            continue
        under = base.get(key) if isinstance(base.get(key), dict) else {}
        out[key] = merge(under, value, dropped, (*at, key)) if isinstance(value, dict) else value
    return out


def resolve_extends(data: dict, node, source: str, folder: Path | None) -> tuple[dict, Chain]:
    """Follows `extends` from a parsed config; returns the merged data (without `extends`) and its
    chain of files. `folder` holds the config (None: a config given as text, read from the cwd)."""
    chain = Chain([(source, node)])
    layers = [data]
    here = folder if folder is not None else Path(".")
    seen = [_real(Path(source))] if folder is not None else [None]
    while "extends" in data:
        value, where = data["extends"], f"{source}:{_extends_line(node)}: extends"
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: give the path of the config to extend, e.g. extends: base.yaml")
        path = here / value
        shown = [s for s, _ in chain.files] + [str(path)]
        if _real(path) in seen:
            raise ConfigError(f"{where}: a cycle: {' -> '.join(shown)}")
        if len(chain.files) >= MAX_DEPTH:
            raise ConfigError(f"{where}: more than {MAX_DEPTH} configs in the chain; is it meant to be this long?")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            relative = f"{here}/" if str(here) != "." else "the current folder"
            raise ConfigError(f"{where}: {value} not found (relative to {relative})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: cannot read {value}: {e}") from None
        source = str(path)
        data, node = parse_yaml(text, source)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}:1: the config must be a mapping of keys (name, data, model, train)")
        chain.files.append((source, node))
        layers.append(data)
        seen.append(_real(path))
        here = path.parent
    merged = layers[-1]  # the first base as it is: its own nulls mean what they mean in any config
    for layer in reversed(layers[:-1]):
        merged = merge(merged, {k: v for k, v in layer.items() if k != "extends"}, chain.dropped)
    return merged, chain

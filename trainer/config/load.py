"""YAML + --set overrides -> a validated Config, or one clear error per problem.

Errors name the file, the line, the key path and a hint, because a config typo found after
an hour of training is the most expensive typo there is.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config.schema import Config
from trainer.registry import did_you_mean


class ConfigError(Exception):
    """Raised with a ready-to-print message; the CLI exits 2 on it."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's plain scalars: 1e-3 is a float (YAML 1.1 wants a dot: 1.0e-3) and
    only true/false are booleans, so `amp: off` or `on`, `yes`, `no`, `y`, `n` stay the words they are."""


_FLOAT = re.compile(r"""^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$""")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


MAX_VALUES = 100_000  # a config holds a few hundred; aliases that multiply get no further


def parse_yaml(text: str, source: str = "<string>"):
    """Returns (data, node) where node keeps line numbers for error messages. Safe loading only:
    a tag such as !!python/object is an error, never a constructor call."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is None:
            return {}, None
        _check_size(node, source)
        _no_duplicate_keys(node, source, set())
        data = _Loader(text).construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else text[: getattr(e, "position", 0)].count("\n") + 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]  # a ReaderError has no problem
        raise ConfigError(f"{source}:{line}: not valid YAML: {problem}") from None
    return data, node


def _check_size(node, source: str) -> None:
    """Refuses a document whose aliases expand past MAX_VALUES (a "billion laughs" file): counted
    on the node graph, where every alias is one shared node, so the count itself stays cheap."""
    sizes: dict[int, int] = {}

    def size(n) -> int:
        if id(n) not in sizes:
            sizes[id(n)] = 0  # an alias to an enclosing node: cut the cycle
            children = (
                [c for kv in n.value for c in kv]
                if isinstance(n, yaml.MappingNode)
                else n.value
                if isinstance(n, yaml.SequenceNode)
                else []
            )
            sizes[id(n)] = 1 + sum(size(c) for c in children)
            if sizes[id(n)] > MAX_VALUES:
                raise ConfigError(
                    f"{source}:{n.start_mark.line + 1}: the YAML expands to more than "
                    f"{MAX_VALUES:,} values (aliases repeating aliases); a config holds a few hundred"
                )
        return sizes[id(n)]

    size(node)


def _no_duplicate_keys(node, source: str, seen_nodes: set[int]) -> None:
    """YAML keeps the last of two equal keys without a word; a silently ignored lr is worse."""
    if id(node) in seen_nodes:  # an alias: checked where it was defined
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise ConfigError(
                        f"{source}:{key.start_mark.line + 1}: duplicate key '{key.value}' "
                        f"(first on line {seen[key.value]})"
                    )
                seen[key.value] = key.start_mark.line + 1
            _no_duplicate_keys(value, source, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item, source, seen_nodes)


def node_at(node, loc: Iterable):
    """Walks the YAML node tree along a pydantic loc; returns the deepest node found."""
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = [(k, v) for k, v in node.value if k.value == str(part)]
            if not hit:
                if isinstance(part, str) and part in ("folder", "csv", "text"):
                    continue  # pydantic inserts the union's tag into the loc
                return node
            key, value = hit[0]
            node = key if isinstance(value, yaml.ScalarNode) else value  # a scalar's line is its key's
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node


def _clean_loc(loc: tuple) -> tuple:
    """Drops pydantic's type tags from a loc: union members, 'list[...]', 'function-after'."""
    return tuple(
        p
        for p in loc
        if not (
            isinstance(p, str)
            and (
                p in ("folder", "csv", "text", "LrSpread")
                or "[" in p
                or p.startswith(("function-", "literal", "constrained-"))
                or p in ("float", "int", "str", "bool", "tuple", "list", "dict")
            )
        )
    )


def _model_for(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the last key of loc (for 'did you mean')."""
    from trainer.config import schema

    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is Config and part == "data":
            return None
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        model = {
            "train": schema.Train,
            "model": schema.ModelConfig,
            "transforms": schema.Transforms,
            "tta": schema.Tta,
            "stages": schema.Stage,
            "fine_tune": schema.FineTune,
        }.get(part, ann)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _data_model(layout: str | None) -> type[BaseModel] | None:
    from trainer.config import schema

    return {"folder": schema.FolderData, "csv": schema.CsvData, "text": schema.TextData}.get(layout or "")


def _data_fields(layout: str | None) -> list[str]:
    cls = _data_model(layout)
    return list(cls.model_fields) if cls else []


def _layout(data: dict) -> str | None:
    return data.get("data", {}).get("layout") if isinstance(data.get("data"), dict) else None


def _unknown_nulls(chain, data: dict) -> list[dict]:
    """Errors for the nulls of an `extends` chain that name no key of the schema (`bss: null`)."""
    errs = []
    for loc in chain.dropped if chain is not None else ():
        if loc[:1] == ("data",):
            known = (_data_fields(_layout(data)) or None) if len(loc) == 2 else None
        else:
            known = getattr(_model_for(loc), "model_fields", None)
        if known is not None and loc[-1] not in known:
            errs.append({"loc": loc, "type": "extra_forbidden", "msg": "Extra inputs are not permitted", "input": None})
    return errs


def _hint(err: dict, loc: tuple, data: dict) -> str:
    if err["type"] == "extra_forbidden":
        if loc[:1] == ("data",):
            return did_you_mean(loc[-1], _data_fields(_layout(data)))
        model = _model_for(loc)
        return did_you_mean(loc[-1], model.model_fields) if model else ""
    if err["type"] == "union_tag_invalid":
        return did_you_mean(err["ctx"]["tag"], re.findall(r"'([^']+)'", err["ctx"]["expected_tags"]))
    if err["type"] == "literal_error":
        expected = re.findall(r"'([^']+)'", err.get("msg", ""))
        return did_you_mean(err.get("input"), expected)
    return ""


def _description(loc: tuple, data: dict) -> str:
    """The schema's word for what a key holds, where it has one."""
    if loc[:1] == ("data",) and len(loc) == 2:
        model = _data_model(_layout(data))
    else:
        model = _model_for(loc)
    field = getattr(model, "model_fields", {}).get(loc[-1]) if loc else None
    return (field.description or "") if field is not None else ""


def _message(err: dict) -> str:
    if err.get("input") in ("", None) and err["type"] not in ("missing", "extra_forbidden", "semantic"):
        return "is empty; give a value"
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "union_tag_invalid":
        return f"unknown value '{err['ctx']['tag']}' (expected {err['ctx']['expected_tags']})"
    if err["type"] == "missing":
        return "required key is missing"
    return err["msg"].removeprefix("Value error, ")


def format_errors(errors: list[dict], data: dict, node, source: str, origins: dict, chain=None) -> str:
    """One line per error: where (file:line, or the --set), the key, the problem, a hint. With
    `extends`, `chain` (extends.Chain) names the file of the chain that holds each key."""
    lines, seen = [], set()
    for err in errors:
        loc = _clean_loc(tuple(err["loc"]))
        if err["type"] == "union_tag_invalid":
            loc = loc + (err["ctx"]["discriminator"].strip("'"),)
        if err["type"] == "bool_for_number":
            loc = loc + (err["ctx"]["key"],)
        if loc in seen:
            continue  # a union reports once per member; its first complaint is the useful one
        seen.add(loc)
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = source
        origin = next((o for p, o in origins.items() if key == p or key.startswith(p + ".")), None)
        # an error about a whole section (a rule across its keys) that a --set inside it changed
        origin = origin or next((o for p, o in origins.items() if p.startswith(key + ".")), None)
        if origin:
            where = origin
        elif chain is not None:
            owner, owner_node = chain.owner(loc)
            where = f"{owner}:{node_at(owner_node, loc).start_mark.line + 1}"
        elif node is not None:
            found = node_at(node, loc)
            where = f"{source}:{found.start_mark.line + 1}"
        hint = _hint(err, loc, data)
        if err.get("input") in ("", None) and not hint:
            hint = _description(loc, data)
        lines.append(f"{where}: {key}: {_message(err)}" + (f"; {hint}" if hint else ""))
    return "\n".join(lines)


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
        from trainer.config.extends import resolve_extends  # it reads each base with this module's parse_yaml

        data, chain = resolve_extends(data, node, source, Path(path).parent if path is not None else None)
    data = copy.deepcopy(data)
    origins = {}
    for assignment in overrides:
        origins[apply_override(data, assignment)] = f"--set {assignment}"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e.errors(), data, node, source, origins, chain)) from None
    typos = _unknown_nulls(chain, data)
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

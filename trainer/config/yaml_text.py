"""Reading YAML safely, with line numbers kept for messages; ConfigError, raised ready to print."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import yaml


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


LAYOUT_TAGS = ("folder", "csv", "text")  # the data section's union members, which pydantic puts in a loc


def node_at(node, loc: Iterable):
    """Walks the YAML node tree along a pydantic loc; returns the deepest node found."""
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = [(k, v) for k, v in node.value if k.value == str(part)]
            if not hit:
                if isinstance(part, str) and part in LAYOUT_TAGS:
                    continue  # pydantic inserts the union's tag into the loc
                return node
            key, value = hit[0]
            node = key if isinstance(value, yaml.ScalarNode) else value  # a scalar's line is its key's
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node


def yaml_word(value) -> str:
    """A value as a YAML file writes it (true, null, [8, 12]), not as Python does."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)  # one line, however long
    return text.strip().removesuffix("...").strip()


def key_node(parent, value):
    """The key node of a mapping node that loads as `value` (a null or a number key), or None."""
    if not isinstance(parent, yaml.MappingNode):
        return None
    loader = _Loader("")
    for key, _ in parent.value:
        if isinstance(key, yaml.ScalarNode):
            loaded = loader.construct_object(key)
            if type(loaded) is type(value) and loaded == value:
                return key
    return None


def key_spelling(trees: list, parent: tuple, value) -> str:
    """A key that is not a name (~, 0x1F) as the file spells it, found under its parent in the first
    of the trees that holds it (the files of an extends chain); as YAML writes it otherwise."""
    for tree in trees:
        found = key_node(node_at(tree, parent), value) if tree is not None else None
        if found is not None:
            return found.value
    return yaml_word(value)

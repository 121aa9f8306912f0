"""Pydantic's validation errors -> one line each: the file and line (or the --set), the key, the
problem, and a hint (did you mean, or what the key holds)."""

from __future__ import annotations

import re
from typing import Any, get_args, get_type_hints

from pydantic import BaseModel

from trainer.config.data_schema import CsvData, FolderData, TextData
from trainer.config.schema import Config
from trainer.config.yaml_text import LAYOUT_TAGS, key_spelling, node_at
from trainer.registry import did_you_mean


def _clean_loc(loc: tuple) -> tuple:
    """Drops pydantic's type tags from a loc: union members, 'list[...]', 'function-after'."""
    return tuple(
        p
        for p in loc
        if not (
            isinstance(p, str)
            and (
                p in (*LAYOUT_TAGS, "LrSpread")
                or "[" in p
                or p.startswith(("function-", "literal", "constrained-"))
                or p in ("float", "int", "str", "bool", "tuple", "list", "dict")
            )
        )
    )


EMPTY, MISSING = "is empty; give a value", "required key is missing"
NUMBER_PARSING = ("float_parsing", "int_parsing")


def _model_for(loc: tuple, data: dict) -> type[BaseModel] | None:
    """The pydantic model that holds the last key of loc (for 'did you mean' and descriptions);
    the data section's model follows its layout."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is Config and part == "data":
            model = _data_model(_layout(data))
        elif part in getattr(model, "model_fields", {}):
            model = _inner_model(get_type_hints(model, include_extras=True)[part])
        else:
            return None
        if model is None:
            return None
    return model


def _inner_model(tp) -> type[BaseModel] | None:
    """The model inside a field's type: EarlyStop | None, list[Stage], Annotated[...]."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return next((m for m in map(_inner_model, get_args(tp)) if m is not None), None)


def _data_model(layout: str | None) -> type[BaseModel] | None:
    return {"folder": FolderData, "csv": CsvData, "text": TextData}.get(layout or "")


def _layout(data: dict) -> str | None:
    return data.get("data", {}).get("layout") if isinstance(data.get("data"), dict) else None


def unknown_nulls(chain, data: dict) -> list[dict]:
    """Errors for the nulls of an `extends` chain that name no key of the schema (`bss: null`)."""
    errs = []
    for loc in chain.dropped if chain is not None else ():
        if not isinstance(loc[-1], str):  # `~: null`
            errs.append({"loc": loc, "type": "invalid_key", "msg": "", "input": loc[-1]})
            continue
        known = getattr(_model_for(loc, data), "model_fields", None)
        if known is not None and loc[-1] not in known:
            errs.append({"loc": loc, "type": "extra_forbidden", "msg": "Extra inputs are not permitted", "input": None})
    return errs


def _hint(err: dict, loc: tuple, data: dict) -> str:
    if err["type"] == "extra_forbidden":
        model = _model_for(loc, data)
        return did_you_mean(loc[-1], model.model_fields) if model else ""
    if err["type"] == "union_tag_invalid":
        return did_you_mean(err["ctx"]["tag"], re.findall(r"'([^']+)'", err["ctx"]["expected_tags"]))
    if err["type"] == "literal_error":
        expected = re.findall(r"'([^']+)'", err.get("msg", ""))
        return did_you_mean(err.get("input"), expected)
    return ""


def _description(loc: tuple, data: dict) -> str:
    """The schema's word for what a key holds, where it has one."""
    field = getattr(_model_for(loc, data), "model_fields", {}).get(loc[-1]) if loc else None
    return (field.description or "") if field is not None else ""


def _message(err: dict) -> str:
    if err["type"] == "invalid_key":  # `~: 3` or `1: 2`: YAML allows any key, a config only names
        value = err["input"]
        what = "null" if value is None else "true or false" if isinstance(value, bool) else "a number"
        return "a key must be a name" + (f", not {what}" if isinstance(value, (type(None), int, float)) else "")
    if err.get("input") in ("", None) and err["type"] not in ("missing", "extra_forbidden", "semantic"):
        return EMPTY
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "union_tag_invalid":
        return f"unknown value '{err['ctx']['tag']}' (expected {err['ctx']['expected_tags']})"
    if err["type"] == "missing":
        return MISSING
    return err["msg"].removeprefix("Value error, ")


def format_errors(errors: list[dict], data: dict, node, source: str, origins: dict, chain=None) -> str:
    """One line per error: where (file:line, or the --set), the key, the problem, a hint. With
    `extends`, `chain` (extends.Chain) names the file of the chain that holds each key."""
    lines, seen = [], set()
    # a union's member for a mapping or list says what is wrong inside it: its scalar members'
    # "Input should be a valid number" about the whole value is noise beside that
    locs = [_clean_loc(tuple(err["loc"])) for err in errors]
    inside = {loc[:i] for loc in locs for i in range(len(loc))}
    # a word given where a number or certain words go (lr: auot, checkpoint_every: epoc): say both
    words = {loc: err for err, loc in zip(errors, locs, strict=True) if err["type"] == "literal_error"}
    numbers = {loc for err, loc in zip(errors, locs, strict=True) if err["type"] in NUMBER_PARSING}
    for err, loc in zip(errors, locs, strict=True):
        if isinstance(err.get("input"), dict | list) and loc in inside:
            continue
        if loc in words and loc in numbers and err["type"] in (*NUMBER_PARSING, "literal_error"):
            said = words[loc]["msg"].removeprefix("Input should be ")
            err = {**words[loc], "msg": f"Input should be a number or {said}"}
        if err["type"] == "union_tag_invalid":
            loc = loc + (err["ctx"]["discriminator"].strip("'"),)
        if loc in seen:
            continue  # a union reports once per member; its first complaint is the useful one
        seen.add(loc)
        if err["type"] == "invalid_key":  # the key as the file writes it (~, not None), found by it
            trees = [n for _, n in chain.files] if chain is not None else [node]
            loc = loc[:-1] + (key_spelling(trees, loc[:-1], err["input"]),)
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
        message = _message(err)
        if message in (EMPTY, MISSING) and not hint:  # what the key holds, for a value left out
            hint = _description(loc, data)
        lines.append(f"{where}: {key}: {message}" + (f"; {hint}" if hint else ""))
    return "\n".join(lines)

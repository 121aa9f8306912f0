"""The search space file of `trainer sweep`: the objective, the sampler, the pruner and the params,
each a dotted config path. Checked whole before the first trial: the file's own keys by pydantic,
every path against the config it tunes ("did you mean"), and every edge value and choice applied
to that config and validated as any config is, so a typo or a bad range costs no trial."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from trainer.config import Config, ConfigError, node_at, parse_yaml
from trainer.config.schema import Metric, Strict, better_mode
from trainer.registry import did_you_mean
from trainer.run.checked import load_checked

Number = Annotated[float, Field(allow_inf_nan=False)]


class Objective(Strict):
    monitor: Metric = "valid_loss"  # the trial's value: the best value of this metric over its epochs
    mode: Literal["auto", "min", "max"] = "auto"

    @property
    def direction(self) -> str:
        return "minimize" if better_mode(self.monitor, self.mode) == "min" else "maximize"


class Sampler(Strict):
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: Annotated[int, Field(ge=0)] | None = None


class Pruner(Strict):
    name: Literal["median", "hyperband", "none"] = "median"
    warmup_epochs: Annotated[int, Field(ge=0)] = 1  # epochs a trial runs before it can be pruned
    startup_trials: Annotated[int, Field(ge=0)] = 2  # trials that finish before any is pruned (median)


class LogRange(Strict):
    log: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], Annotated[float, Field(gt=0, allow_inf_nan=False)]]


class Range(Strict):
    range: tuple[Number, Number]
    step: Annotated[float, Field(gt=0)] | None = None


class IntRange(Strict):
    int: tuple[int, int]
    step: Annotated[int, Field(ge=1)] = 1


class Choice(Strict):
    choice: Annotated[list[Any], Field(min_length=1)]


Param = LogRange | Range | IntRange | Choice


class Space(Strict):
    objective: Objective = Objective()
    sampler: Sampler = Sampler()
    pruner: Pruner = Pruner()
    params: Annotated[dict[str, Param], Field(min_length=1)]

    @model_validator(mode="after")
    def _ordered_and_gridable(self):
        for key, p in self.params.items():
            lo_hi = getattr(p, "log", None) or getattr(p, "range", None) or getattr(p, "int", None)
            if lo_hi is not None and lo_hi[0] > lo_hi[1]:
                raise ValueError(f"params.{key}: the low end {lo_hi[0]} is above the high end {lo_hi[1]}")
            if self.sampler.name == "grid" and not isinstance(p, Choice):
                raise ValueError(f"params.{key}: sampler grid takes choice params only (a grid lists its values)")
        return self


def edge_values(p: Param) -> list:
    """The values to try on the config before any trial: both ends, or every choice."""
    if isinstance(p, Choice):
        return list(p.choice)
    return list(getattr(p, "log", None) or getattr(p, "range", None) or p.int)


def as_override(key: str, value) -> str:
    """KEY=VALUE for the config loader (the value as flow YAML: lists and numbers keep their type)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_space(path: Path, config: Path, sets: list[str]) -> tuple[Space, Config]:
    """The space file, checked against the config it tunes (with the sweep's --set options)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read the search space ({e})") from None
    data, node = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the search space must be a mapping (objective, sampler, pruner, params)")
    try:
        space = Space.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_located(e, node, source)) from None
    base = load_checked(config, sets)
    problems = []
    for key, p in space.params.items():
        line = _line(node, ("params", key), source)
        why = path_problem(key, base)
        if why:
            problems.append(f"{line}: params.{key}: {why}")
            continue
        for value in edge_values(p):
            try:
                trial_config(config, sets, {key: value})
            except ConfigError as e:
                first = str(e).splitlines()[0].split(": ", 2)[-1]
                problems.append(f"{line}: params.{key}: the value {value!r} makes the config invalid: {first}")
                break
    if problems:
        raise ConfigError("\n".join(problems))
    return space, base


def trial_config(config: Path, sets: list[str], values: dict) -> Config:
    """The config a trial trains: the sweep's --set options, then the trial's values."""
    return load_checked(config, [*sets, *(as_override(k, v) for k, v in values.items())])


def path_problem(key: str, cfg: Config) -> str | None:
    """Why a dotted path names no key of this config (None when it does)."""
    obj: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the config"
        if isinstance(obj, BaseModel):
            fields = type(obj).model_fields
            if part not in fields:
                hint = did_you_mean(part, fields)
                return f"unknown key '{part}' in {here}" + (f"; {hint}" if hint else "")
            obj = getattr(obj, part)
            if obj is None and i < len(parts) - 1:
                return f"{'.'.join(parts[: i + 1])} is not set in the config; set it there to tune what is inside"
        elif isinstance(obj, list):
            if not part.isdigit() or int(part) >= len(obj):
                return f"{here} has {len(obj)} item(s); '{part}' is not one of them"
            obj = obj[int(part)]
        else:
            return f"{here} holds a value, not keys"
    return None


def _line(node, loc: tuple, source: str) -> str:
    return f"{source}:{node_at(node, loc).start_mark.line + 1}" if node is not None else source


PARAM_FORMS = "{log: [low, high]}, {range: [low, high]}, {int: [low, high]} or {choice: [a, b, ...]}"


def _key_line(node, loc: tuple, source: str) -> str:
    """The line of an unknown key itself (its value may start on the next line)."""
    parent = node_at(node, loc[:-1]) if node is not None else None
    for k, _ in getattr(parent, "value", []) if isinstance(parent, yaml.MappingNode) else []:
        if k.value == str(loc[-1]):
            return f"{source}:{k.start_mark.line + 1}"
    return _line(node, loc, source)


def _located(e: ValidationError, node, source: str) -> str:
    lines, seen = [], set()
    for err in e.errors():
        loc = tuple(err["loc"])
        in_param = loc[:1] == ("params",) and len(loc) > 2  # one of the param forms did not fit
        loc = loc[:2] if in_param else loc
        key = ".".join(str(p) for p in loc) or "(top level)"
        if key in seen:
            continue  # a union reports once per member
        seen.add(key)
        msg = {"extra_forbidden": "unknown key", "missing": "required key is missing"}.get(
            err["type"], err["msg"].removeprefix("Value error, ")
        )
        if in_param:
            msg = f"expected {PARAM_FORMS}"
        if err["type"] == "extra_forbidden" and loc:
            hint = did_you_mean(loc[-1], ["objective", "sampler", "pruner", "params"] if len(loc) == 1 else [])
            msg += f"; {hint}" if hint else ""
        where = _key_line(node, loc, source) if err["type"] == "extra_forbidden" else _line(node, loc, source)
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)

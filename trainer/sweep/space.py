"""The search space file of `trainer sweep`: the objective, the sampler, the pruner and the params,
each a dotted config path. Checked whole before the first trial: the file's own keys by pydantic,
every path against the config it tunes ("did you mean"), and every edge value and choice applied
to that config and validated as any config is, so a typo or a bad range costs no trial."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Discriminator, Field, Tag, ValidationError, model_validator

from trainer.config import Config, ConfigError, node_at, parse_yaml, yaml_word
from trainer.config.base import Metric, Strict, better_mode
from trainer.config.yaml_text import key_spelling
from trainer.registry import did_you_mean
from trainer.run.checked import load_checked

Number = Annotated[float, Field(allow_inf_nan=False)]


class Objective(Strict):
    monitor: Metric = "valid_loss"  # the trial's value: the best value of this metric over its epochs
    mode: Literal["auto", "min", "max"] = "auto"
    # a time budget per trial: one on course to take longer (wall seconds from its start, projected
    # from its epochs so far) is stopped and recorded as pruned, and so is one that finished over it
    max_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @property
    def direction(self) -> str:
        return "minimize" if better_mode(self.monitor, self.mode) == "min" else "maximize"


TPE_STARTUP = 10  # Optuna's n_startup_trials default: random trials until this many have finished


class Sampler(Strict):
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: Annotated[int, Field(ge=0)] | None = None
    startup_trials: Annotated[int, Field(ge=0)] = TPE_STARTUP  # finished trials before TPE models them

    @model_validator(mode="after")
    def _startup_is_tpes(self):
        if self.name != "tpe" and self.startup_trials != TPE_STARTUP:
            raise ValueError(f"startup_trials is TPE's (name: tpe); with name: {self.name} it does nothing")
        return self


class Pruner(Strict):
    name: Literal["median", "hyperband", "none"] = "median"
    warmup_epochs: Annotated[int, Field(ge=0)] = 1  # epochs a trial runs before it can be pruned
    startup_trials: Annotated[int, Field(ge=0)] = 2  # trials that finish before any is pruned (median)


class Ordered(Strict):
    @model_validator(mode="after")
    def _low_first(self):
        low, high = self.ends
        if low > high:
            raise ValueError(f"the low end {low} is above the high end {high}")
        return self


class LogRange(Ordered):
    log: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], Annotated[float, Field(gt=0, allow_inf_nan=False)]]

    @property
    def ends(self):
        return self.log


class Range(Ordered):
    range: tuple[Number, Number]
    step: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @property
    def ends(self):
        return self.range


class IntRange(Ordered):
    int: tuple[int, int]
    step: Annotated[int, Field(ge=1)] = 1

    @property
    def ends(self):
        return self.int


class Choice(Strict):
    choice: Annotated[list[Any], Field(min_length=1)]


FORMS = ("log", "range", "int", "choice")


def _form(value) -> str | None:
    """Which param form a mapping means, by its first form key: its errors are then that form's own."""
    return next((k for k in FORMS if k in value), None) if isinstance(value, dict) else None


PARAM_FORMS = "{log: [low, high]}, {range: [low, high]}, {int: [low, high]} or {choice: [a, b, ...]}"
Param = Annotated[
    Annotated[LogRange, Tag("log")]
    | Annotated[Range, Tag("range")]
    | Annotated[IntRange, Tag("int")]
    | Annotated[Choice, Tag("choice")],
    Discriminator(_form, custom_error_type="param_form", custom_error_message=f"expected {PARAM_FORMS}"),
]


class Space(Strict):
    objective: Objective = Objective()
    sampler: Sampler = Sampler()
    pruner: Pruner = Pruner()
    params: Annotated[dict[str, Param], Field(min_length=1)]
    # points tried before the sampler's own (Optuna's enqueue_trial), e.g. the best config known so far
    enqueue: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _gridable(self):
        for key, p in self.params.items():
            if self.sampler.name == "grid" and not isinstance(p, Choice):
                raise ValueError(f"params.{key}: sampler grid takes choice params only (a grid lists its values)")
        return self


def edge_values(p: Param) -> list:
    """The values to try on the config before any trial: both ends, or every choice, and for a
    float range a value between them (an integer key passes 4.0 and 8.0 but not 5.48)."""
    if isinstance(p, Choice):
        return list(p.choice)
    low, high = p.ends
    inside = [] if isinstance(p, IntRange) or low == high else [round(low + (high - low) * 0.37, 6)]
    return [low, high, *inside]


def as_override(key: str, value) -> str:
    """KEY=VALUE for the config loader (the value as flow YAML: lists and numbers keep their type)."""
    return f"{key}={yaml_word(value)}"


def load_space(path: Path, config: Path, sets: list[str]) -> tuple[Space, Config]:
    """The space file, checked against the config it tunes (with the sweep's --set options)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read the search space ({e})") from None
    data, node = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}:1: the search space must be a mapping (objective, sampler, pruner, params, enqueue)"
        )
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
                whole = "; it takes whole numbers: use {int: [low, high]}" if "integer" in first else ""
                problems.append(f"{line}: params.{key}: the value {value!r} makes the config invalid: {first}{whole}")
                break
    if not problems:
        problems = enqueue_problems(space, config, sets, node, source)
    if problems:
        raise ConfigError("\n".join(problems))
    return space, base


def enqueue_problems(space: Space, config: Path, sets: list[str], node, source: str) -> list[str]:
    """Each queued point names params of the space, inside their ranges, and makes a valid config."""
    if space.sampler.name == "grid" and space.enqueue:
        return [f"{_key_line(node, ('enqueue',), source)}: enqueue: sampler grid tries every point of its grid already"]
    problems, seen = [], {}
    for i, point in enumerate(space.enqueue):
        where = f"{_line(node, ('enqueue', i), source)}: enqueue.{i}"
        shown = yaml_word(point)
        if not point or shown in seen:  # an empty point is an ordinary sampled trial; a repeat runs once
            why = "names no param of the space" if not point else f"is the same point as enqueue.{seen[shown]}"
            problems.append(f"{where}: {why}")
            continue
        seen[shown] = i
        bad = [f"'{k}' is not a param of the space" + _hint(k, space.params) for k in point if k not in space.params]
        bad += [f"{k}: {why}" for k, v in point.items() if k in space.params and (why := outside(space.params[k], v))]
        if not bad:
            try:
                trial_config(config, sets, point)
            except ConfigError as e:
                bad = [f"the point makes the config invalid: {str(e).splitlines()[0].split(': ', 2)[-1]}"]
        problems += [f"{where}: {b}" for b in bad]
    return problems


def outside(p: Param, value) -> str | None:
    """Why a queued value is not one the param could draw (None when it could)."""
    shown = yaml_word(value)
    if isinstance(p, Choice):
        return None if value in p.choice else f"{shown} is not one of its choices {yaml_word(p.choice)}"
    whole = isinstance(p, IntRange)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (whole and value != int(value)):
        return f"{shown} is not {'a whole number' if whole else 'a number'}"
    low, high = p.ends
    if not low <= value <= high:
        return f"{shown} is outside [{low}, {high}]"
    step = getattr(p, "step", None)
    if step and abs((value - low) / step - round((value - low) / step)) > 1e-8:
        return f"{shown} is not on its grid: {low} plus a whole number of steps of {step}"
    return None


def _hint(key: str, params) -> str:
    """The closest param (case aside) whose last part starts with the key's last part's letter:
    `train.pct_start` is not pointed at `train.stages.0.lr` for sharing `train.`; `pct_start`
    alone finds the one param that ends in it."""
    last = key.rsplit(".", 1)[-1].lower()
    related = {str(p).lower(): p for p in params if str(p).rsplit(".", 1)[-1][:1].lower() == last[:1]}
    close = difflib.get_close_matches(key.lower(), list(related), n=1, cutoff=0.6)
    near = [p for p in params if str(p).rsplit(".", 1)[-1].lower() == last]
    hint = related[close[0]] if close else near[0] if len(near) == 1 else None
    return f"; did you mean '{hint}'?" if hint is not None else ""


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


def _key_line(node, loc: tuple, source: str) -> str:
    """The line of an unknown key itself (its value may start on the next line)."""
    parent = node_at(node, loc[:-1]) if node is not None else None
    for k, _ in getattr(parent, "value", []) if isinstance(parent, yaml.MappingNode) else []:
        if k.value == str(loc[-1]):
            return f"{source}:{k.start_mark.line + 1}"
    return _line(node, loc, source)


def loc_form(err) -> str:
    return str(err["loc"][2]) if len(err["loc"]) > 2 else "?"


def _which(inner: tuple) -> str:
    """('log', 0) -> 'log's low end'; ('choice',) -> 'choice'."""
    form, *rest = inner
    if rest and rest[0] in (0, 1) and form in ("log", "range", "int"):
        return f"{form}'s {'low' if rest[0] == 0 else 'high'} end"
    return ".".join(str(p) for p in inner)


def _located(e: ValidationError, node, source: str) -> str:
    lines, seen = [], set()
    for err in e.errors():
        loc = tuple(err["loc"])
        if err["type"] == "invalid_key":  # `~: 3`: the key as the file spells it
            loc = loc[:-1] + (key_spelling([node], loc[:-1], err["input"]),)
            err = {**err, "msg": "a key must be a name"}
        inner = loc[3:] if loc[:1] == ("params",) and len(loc) > 3 else ()  # (form, index): which end
        loc = loc[:2] if loc[:1] == ("params",) else loc
        key = ".".join(str(p) for p in loc) or "(top level)"
        if key in seen:
            continue  # one line per param
        seen.add(key)
        msg = {"extra_forbidden": "unknown key", "missing": "required key is missing"}.get(
            err["type"], err["msg"].removeprefix("Value error, ")
        )
        if err["type"] == "extra_forbidden" and inner:
            k = inner[-1]
            msg = f"{loc_form(err)} takes no key '{k}'" + (" (one form per param)" if k in FORMS else "")
        elif inner:
            msg = f"{_which(inner)}: {msg[0].lower()}{msg[1:]}"
        if err["type"] == "param_form" and isinstance(err["input"], dict):  # {lg: [...]}, {choices: [...]}
            msg += next(filter(None, (_hint(str(k), FORMS) for k in err["input"])), "")
        if err["type"] == "extra_forbidden" and loc:
            msg += _hint(loc[-1], ["objective", "sampler", "pruner", "params", "enqueue"] if len(loc) == 1 else [])
        where = _key_line(node, loc, source) if err["type"] == "extra_forbidden" else _line(node, loc, source)
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)

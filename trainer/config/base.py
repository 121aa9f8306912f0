"""The base of every config model (unknown keys refused, no inf or nan, no true for a number), the
value types the sections share, and the metrics a run can monitor."""

from __future__ import annotations

from typing import Annotated, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

PosFloat = Annotated[float, Field(gt=0)]
PosInt = Annotated[int, Field(ge=1)]
# Image sizes in pixels: 8192 px squared is 200 MB a colour image, already far past any course config.
Pixels = Annotated[int, Field(ge=1, le=8192)]


def _takes(tp, kinds: tuple) -> bool:
    """Whether a field's annotation accepts a value of one of `kinds` (through unions, lists, Literals)."""
    if tp in kinds:
        return True
    if get_origin(tp) is Literal:
        return any(type(a) in kinds for a in get_args(tp))
    return any(_takes(a, kinds) for a in get_args(tp))


def _holds_bool(v) -> bool:
    return isinstance(v, bool) or (isinstance(v, list | tuple) and any(_holds_bool(x) for x in v))


class Strict(BaseModel):
    # inf and nan are never a sensible setting (an infinite lr passes `gt=0`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _no_bool_for_number(cls, data, handler):
        # pydantic reads true as 1.0 for a number: `mixup: true` would mean alpha 1.0 unsaid. Each
        # such key is said on its own, beside the section's other errors (it is masked meanwhile).
        bools = {k: v for k, v in data.items() if _bool_for_number(cls, k, v)} if isinstance(data, dict) else {}
        if not bools:
            return handler(data)
        try:
            handler({**data, **dict.fromkeys(bools, _MASKED)})
            others = []
        except ValidationError as e:
            others = [_detail(err) for err in e.errors() if err["input"] is not _MASKED]
        said = [InitErrorDetails(type=_bool_error(v), loc=(k,), input=v) for k, v in bools.items()]
        order = {k: i for i, k in enumerate(data)}  # the file's order (a section's own errors first)
        errors = sorted(said + others, key=lambda d: order.get(d["loc"][0], -1) if d["loc"] else -1)
        raise ValidationError.from_exception_data(cls.__name__, errors)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_assigned(cls, data):
        # an assignment (validate_assignment) reaches the wrap above as the model, its new value here
        for k, v in data.items() if isinstance(data, dict) else ():
            if _bool_for_number(cls, k, v):
                raise _bool_error(v)
        return data


def _bool_error(value) -> PydanticCustomError:
    return PydanticCustomError("bool_for_number", "takes a number, not {value}", {"value": str(value).lower()})


_MASKED = object()  # what a bool given for a number is while the rest of its section is checked
_ERROR_TYPES = set(get_args(ErrorType))


def _bool_for_number(model: type[BaseModel], key, value) -> bool:
    field = model.model_fields.get(key)
    return (
        bool(field)
        and _holds_bool(value)
        and not _takes(field.annotation, (bool,))
        and _takes(field.annotation, (int, float))
    )


def _detail(err: dict) -> InitErrorDetails:
    """A reported error as it can be raised again (pydantic's own types by name, ours as they read)."""
    kind = err["type"] if err["type"] in _ERROR_TYPES else PydanticCustomError(err["type"], err["msg"])
    detail = InitErrorDetails(type=kind, loc=tuple(err["loc"]), input=err["input"])
    if "ctx" in err and isinstance(kind, str):
        detail["ctx"] = err["ctx"]
    return detail


# The metrics a run can report (which ones depend on the task: single-label, multi-label, text).
METRICS = ("valid_loss", "train_loss", "accuracy", "fbeta", "accuracy_thresh", "bpc")
LOWER_IS_BETTER = ("valid_loss", "train_loss", "bpc")


def better_mode(monitor: str, mode: str = "auto") -> str:
    """min or max: `mode` when given, else min for losses (and bits per character), max otherwise."""
    if mode != "auto":
        return mode
    return "min" if monitor in LOWER_IS_BETTER or monitor.endswith(("loss", "error")) else "max"


def known_metric(name: str) -> str:
    if name not in METRICS:
        from trainer.registry import did_you_mean

        hint = did_you_mean(name, METRICS)
        raise ValueError(f"unknown metric '{name}' (one of {', '.join(METRICS)})" + (f"; {hint}" if hint else ""))
    return name


Metric = Annotated[str, AfterValidator(known_metric)]

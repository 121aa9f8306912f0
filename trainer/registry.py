"""Name -> factory registries with 'did you mean' hints (timm's create_model pattern)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable)


def did_you_mean(word: str, choices) -> str:
    """A short hint naming the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None):
        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        if name not in self._items:
            hint = did_you_mean(name, self._items)
            raise KeyError(
                f"unknown {self.kind} '{name}'" + (f"; {hint}" if hint else "") + f" (known: {', '.join(self.names())})"
            )
        return self._items[name]

"""`Input`: the constraints and description of one argument of `predict()`.

Tenants import it as `from thaw.snapshotter.runtime.inputs import Input` (the
runtime's folder is on every instance's path) and use it as a parameter's default:

    def predict(self, text: str = Input(description="What to embed", max_length=4096),
                n: int = Input(default=1, ge=1, le=16)) -> list[float]: ...

The build turns the signature into a JSON Schema (signature.py) that the gateway
checks every call against before an instance is touched. At call time the runtime
passes the caller's value, or the default, never the `Input` object itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class _Missing:
    """No default: the argument is required."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Input:
    """One argument's default and constraints (cog's `Input` has the same keywords)."""

    __slots__ = ("default", "description", "ge", "le", "min_length", "max_length",
                 "regex", "choices")

    def __init__(self, default: Any = MISSING, *, description: str | None = None,
                 ge: float | None = None, le: float | None = None,
                 min_length: int | None = None, max_length: int | None = None,
                 regex: str | None = None, choices: Sequence[Any] | None = None) -> None:
        if ge is not None and le is not None and ge > le:
            raise ValueError(f"Input(ge={ge}, le={le}): ge is above le")
        if choices is not None and not list(choices):
            raise ValueError("Input(choices=[]): no value could ever be given")
        self.default = default
        self.description = description
        self.ge = ge
        self.le = le
        self.min_length = min_length
        self.max_length = max_length
        self.regex = regex
        self.choices = list(choices) if choices is not None else None

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def __repr__(self) -> str:
        shown = {name: getattr(self, name) for name in self.__slots__
                 if getattr(self, name) not in (None, MISSING)}
        return "Input(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

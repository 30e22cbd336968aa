"""A `predict()` signature as a JSON Schema (the function's typed inputs).

Read once in the instance at build: type hints, defaults and `Input(...)`
constraints (inputs.py; a cog-style `Input` is read by its attributes) become an
object schema whose properties are the keyword arguments. The gateway checks every
call against it before an instance is touched (gateway/inputs.py), so the schema
uses only what that check understands: type string/integer/number/boolean/array/
object, `items`, `anyOf` with null (Optional), `enum` (Literal, choices), minimum/
maximum, minLength/maxLength, pattern, default, description. A file (pathlib.Path,
cog's Path or File) is {"type": "string", "format": "uri"}, as cog writes it.

Handlers without type hints and without `Input` defaults get no schema: their calls
go through unchecked, as before. `__call__(request)` handlers take a request, not
keyword arguments, and get none either.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import types
import typing
from typing import Any

from .batching import BATCH_SIZE_ENV
from .files import FILE_SCHEMA, is_file_type
from .inputs import MISSING, Input

# The return hint's schema rides in the input schema under this key, which JSON Schema
# validators ignore (gateway/fndocs.py shows it as the answer's schema).
OUTPUT_KEY = "x-thaw-output"
# A schema past this is left out (the manifest and every gateway carry it).
MAX_SCHEMA_BYTES = 64 * 1024

_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
    bool: {"type": "boolean"}, dict: {"type": "object"}, list: {"type": "array"},
}
_JSON_SCALARS = (str, int, float, bool, type(None))


class UnsupportedType(TypeError):
    """A type hint that has no JSON Schema here (the function gets no schema)."""


def as_input(default: Any) -> Input | None:
    """The `Input` a parameter's default stands for: ours, or a cog/pydantic-style
    field read by its attributes; None for a plain default."""
    if isinstance(default, Input):
        return default
    if type(default).__name__ != "FieldInfo" or not hasattr(default, "default"):
        return None
    value = default.default
    if value is Ellipsis or type(value).__name__ == "PydanticUndefinedType":
        value = MISSING
    found: dict[str, Any] = {}
    for source in (default, *(getattr(default, "metadata", None) or ())):
        for key, attr in (("ge", "ge"), ("le", "le"), ("min_length", "min_length"),
                          ("max_length", "max_length"), ("regex", "regex"),
                          ("regex", "pattern"), ("choices", "choices")):
            got = getattr(source, attr, None)
            if got is not None and key not in found:
                found[key] = got
    extra = getattr(default, "json_schema_extra", None)
    if isinstance(extra, dict) and "choices" in extra and "choices" not in found:
        found["choices"] = extra["choices"]
    return Input(value, description=getattr(default, "description", None), **found)


def _admits_none(hint: Any) -> bool:
    if hint is inspect.Parameter.empty or hint is Any or hint is None or hint is type(None):
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(
        None) in typing.get_args(hint)


def read_input(default: Any, hint: Any) -> Input | None:
    """`as_input`, with cog's rule for its own `Input()`: no default given (None) on
    a type that does not admit None means the argument is required."""
    spec = as_input(default)
    if (spec is not None and spec.default is None and not _admits_none(hint)
            and type(default).__module__.split(".")[0] == "cog"):
        spec.default = MISSING
    return spec


def type_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema of one type hint; raises UnsupportedType."""
    if hint is inspect.Parameter.empty or hint is Any or hint is object:
        return {}
    if hint in _SCALARS:
        return dict(_SCALARS[hint])
    if is_file_type(hint):
        return dict(FILE_SCHEMA)  # pathlib.Path, cog's Path and File (files.py)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        if not all(isinstance(a, _JSON_SCALARS) for a in args):
            raise UnsupportedType(f"Literal{list(args)!r} holds a non-JSON value")
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        parts = [type_schema(a) for a in members]
        if len(args) != len(members):
            parts.append({"type": "null"})
        return parts[0] if len(parts) == 1 else {"anyOf": parts}
    if origin in (list, tuple, set, frozenset, typing.Sequence) or (
            origin is not None and getattr(origin, "__name__", "") == "Sequence"):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise UnsupportedType(f"{hint!r}: only tuple[X, ...] is supported")
        return {"type": "array", "items": type_schema(args[0]) if args else {}}
    if origin is dict:
        if args and args[0] is not str:
            raise UnsupportedType(f"{hint!r}: JSON object keys are strings")
        return {"type": "object"}
    raise UnsupportedType(f"{hint!r} has no JSON Schema")


def _constrain(schema: dict[str, Any], spec: Input) -> None:
    if spec.description:
        schema["description"] = str(spec.description)
    if spec.ge is not None:
        schema["minimum"] = spec.ge
    if spec.le is not None:
        schema["maximum"] = spec.le
    if spec.min_length is not None:
        schema["minLength"] = int(spec.min_length)
    if spec.max_length is not None:
        schema["maxLength"] = int(spec.max_length)
    if spec.regex is not None:
        schema["pattern"] = str(spec.regex)
    if spec.choices is not None:
        schema["enum"] = list(spec.choices)


def signature_schema(func: Any) -> dict[str, Any] | None:
    """The input schema of a predict-style callable (bound method or function), or
    None when it declares no types. Raises UnsupportedType for a hint with no schema."""
    try:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func)
    except (TypeError, ValueError, NameError):
        return None
    properties: dict[str, Any] = {}
    required: list[str] = []
    typed = False
    extra = False
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            extra = True
            continue
        if param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL):
            continue  # not reachable from a JSON object's keys
        hint = hints.get(name, inspect.Parameter.empty)
        spec = read_input(param.default, hint)
        typed = typed or spec is not None or hint is not inspect.Parameter.empty
        schema = type_schema(hint)
        default = spec.default if spec is not None else param.default
        if spec is not None:
            _constrain(schema, spec)
        if default is MISSING or default is inspect.Parameter.empty:
            required.append(name)
        elif _is_json(default):
            schema["default"] = default
        properties[name] = schema
    if not typed:
        return None
    document: dict[str, Any] = {"type": "object", "properties": properties,
                                "additionalProperties": extra}
    if required:
        document["required"] = required
    output = _output_schema(hints.get("return", inspect.Parameter.empty))
    if output is not None:
        document[OUTPUT_KEY] = output
    return document


def _output_schema(hint: Any) -> dict[str, Any] | None:
    """The return hint's schema, for the function's documents only (answers are not
    checked); None when there is none or it has no JSON form (a generator, bytes)."""
    if hint is inspect.Parameter.empty or hint is None or hint is type(None):
        return None
    try:
        return type_schema(hint)
    except UnsupportedType:
        return None


def _batching() -> bool:
    try:
        return int(os.environ.get(BATCH_SIZE_ENV, "1") or 1) > 1
    except ValueError:
        return False


def _is_json(value: Any) -> bool:
    """A default the schema can state (and the gateway fill in): JSON as it is."""
    if isinstance(value, float):
        return math.isfinite(value)  # JSON has no NaN or infinity
    if isinstance(value, _JSON_SCALARS):
        return True
    if not isinstance(value, (list, dict)):
        return False  # a tuple or set would reach the handler as a list
    try:
        return bool(json.loads(json.dumps(value, allow_nan=False)) == value)
    except (TypeError, ValueError, RecursionError):
        return False


def predict_of(handler: object) -> Any:
    """The method a call runs: predict(), or run() on a cog `BaseRunner` that defines
    run() (cog's own predict() there only forwards to it, taking *args/**kwargs, so
    its signature says nothing); None when there is neither."""
    if getattr(type(handler), "_run_owner", None) is not None:
        run = getattr(handler, "run", None)
        if callable(run):
            return run
    predict = getattr(handler, "predict", None)
    return predict if callable(predict) else None


def handler_schema(handler: object) -> str:
    """The handler's input schema as JSON text; "" when it has none (no predict(), no
    types, a type with no schema, or a schema past MAX_SCHEMA_BYTES)."""
    predict = predict_of(handler)
    if not callable(predict) or _batching():
        return ""  # a batching predict() takes a list of calls, not their arguments
    try:
        schema = signature_schema(predict)
        text = json.dumps(schema, allow_nan=False) if schema else ""
    except (UnsupportedType, ValueError, TypeError):
        return ""
    return text if len(text.encode()) <= MAX_SCHEMA_BYTES else ""


def refused_schema(handler: object) -> str:
    """`handler_schema` for a build whose capture was refused: any error the tenant's
    object raises reads as no schema (the build failed at capture, not here)."""
    try:
        return handler_schema(handler)
    except Exception:
        return ""


def call_defaults(func: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """For a call that bypasses the gateway's check: the values `Input` defaults stand
    for ({name: default}) and the names an `Input` marks required (no default)."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}, frozenset()
    try:
        hints = typing.get_type_hints(func)
    except (TypeError, ValueError, NameError):
        hints = {}
    defaults: dict[str, Any] = {}
    required: set[str] = set()
    for name, param in parameters.items():
        spec = read_input(param.default, hints.get(name, inspect.Parameter.empty))
        if spec is None:
            continue
        if spec.required:
            required.add(name)
        else:
            defaults[name] = spec.default
    return defaults, frozenset(required)

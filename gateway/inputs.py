"""Typed inputs: a call's JSON body checked against its function's input schema
before any instance is touched (docs/function-api.md).

The schema is read in the instance at build from predict()'s signature
(snapshotter/runtime/signature.py) and reaches the gateway with the function's
record (FunctionInfo.input_schema, cached in gateway/priority.py). Each distinct
schema becomes a pydantic validator once (`checker_of`); a call is then one
`validate_json` in pydantic-core. Wrong input answers 422 `invalid_input` with
`field` naming the path at fault ("n", "tags.2"); missing arguments with defaults
are filled in, so the handler and the logs see what ran. Functions without a
schema are not checked.

The schema comes from tenant code, so it is read defensively: anything this module
does not understand accepts any value, and patterns run on pydantic-core's regex
engine (linear time; a pattern it cannot compile is not checked at the gateway).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import structlog
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, Required, TypedDict

from thaw.gateway.errors import InputRejected

log = structlog.get_logger()

# Distinct schemas kept as validators (one per function version in use).
CHECKER_CACHE_ENTRIES = 1024
# The largest schema used (the runtime writes none larger: signature.py
# MAX_SCHEMA_BYTES; a larger one came from elsewhere and is ignored).
MAX_SCHEMA_BYTES = 64 * 1024
# Bodies past this are checked in a worker thread, off the event loop.
INLINE_CHECK_BYTES = 256 * 1024

_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float,
                          "boolean": bool, "null": type(None)}


@dataclass(frozen=True)
class InputChecker:
    """One function version's validator and the defaults it fills in."""

    adapter: TypeAdapter[Any]
    defaults: dict[str, Any]
    properties: tuple[str, ...]

    def check(self, body: bytes) -> bytes:
        """The body to send on (with defaults filled); raises InputRejected."""
        try:
            values = self.adapter.validate_json(body if body.strip() else b"{}")
        except ValidationError as exc:
            raise _rejection(exc) from None
        missing = {k: copy.deepcopy(v) for k, v in self.defaults.items() if k not in values}
        if not missing:
            return body
        # The values the caller sent are passed on as sent (the validator only checked
        # them; strict mode converts nothing but int to float).
        sent = json.loads(body) if body.strip() else {}
        return json.dumps({**sent, **missing}, separators=(",", ":"),
                          ensure_ascii=False).encode()


def _path(loc: tuple[int | str, ...]) -> str:
    # The input's name, then list indexes; the other strings pydantic adds name the
    # branch of a union tried (`x.int`), which is no part of the caller's body.
    if not loc:
        return ""
    return ".".join([str(loc[0]), *(str(p) for p in loc[1:] if isinstance(p, int))])


def _rejection(exc: ValidationError) -> InputRejected:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = _path(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if not where or kind in ("json_invalid", "json_type"):
        if kind == "json_invalid":
            return InputRejected(f"the request body is not valid JSON: {first['msg']}",
                                 field="body")
        return InputRejected("the request body must be a JSON object of the function's "
                             "inputs", field="body")
    if kind == "missing":
        return InputRejected(f"input {where!r} is required", field=where)
    if kind == "extra_forbidden":
        return InputRejected(f"the function takes no input {where!r}", field=where)
    # A union refused on every branch: each branch's reason.
    reasons = list(dict.fromkeys(e["msg"] for e in errors
                                 if _path(tuple(e.get("loc", ()))) == where))
    return InputRejected(f"input {where!r}: {'; or '.join(reasons)}", field=where)


def _constraints(schema: dict[str, Any], base: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if base in (int, float):
        for key, name in (("minimum", "ge"), ("maximum", "le")):
            if isinstance(schema.get(key), (int, float)) and not isinstance(
                    schema.get(key), bool):
                found[name] = schema[key]
    if base is str:
        for key, name in (("minLength", "min_length"), ("maxLength", "max_length")):
            if isinstance(schema.get(key), int) and not isinstance(schema.get(key), bool):
                found[name] = schema[key]
        if isinstance(schema.get("pattern"), str):
            found["pattern"] = schema["pattern"]
    return found


def _annotation(schema: Any, outer: dict[str, Any], patterns: bool) -> Any:
    """The Python type a schema node stands for; `outer` holds the property's own
    constraints (they apply to each branch of an Optional)."""
    if not isinstance(schema, dict):
        return Any
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(
            isinstance(v, (str, int, float, bool, type(None))) for v in enum):
        return Literal[tuple(enum)]
    branches = schema.get("anyOf")
    if isinstance(branches, list) and branches:
        parts = tuple(_annotation(b, outer, patterns) for b in branches)
        return Any if Any in parts else Union[parts]  # noqa: UP007 (a runtime tuple)
    kind = schema.get("type")
    if kind == "array":
        return list[_annotation(schema.get("items", {}), {}, patterns)]  # type: ignore[misc]
    if kind == "object":
        return dict[str, Any]
    base = _TYPES.get(kind) if isinstance(kind, str) else None
    if base is None:
        return Any
    limits = _constraints({**schema, **outer}, base)
    if not patterns:
        limits.pop("pattern", None)
    return Annotated[base, Field(**limits)] if limits else base


def _adapter(schema: dict[str, Any], patterns: bool) -> tuple[TypeAdapter[Any], dict[str, Any]]:
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = {r for r in schema.get("required", ()) if isinstance(r, str)} \
        if isinstance(schema.get("required"), list) else set()
    fields: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for name, prop in properties.items():
        prop = prop if isinstance(prop, dict) else {}
        own = {k: v for k, v in prop.items() if k not in ("anyOf", "enum", "type", "items")}
        kind = _annotation(prop, own if "anyOf" in prop else {}, patterns)
        fields[name] = Required[kind] if name in required else NotRequired[kind]
        if name not in required and "default" in prop:
            defaults[name] = prop["default"]
    extra: Literal["allow", "forbid"] = (
        "allow" if schema.get("additionalProperties") is not False else "forbid")
    # Built at run time from the schema's names, which need not be identifiers.
    make_typed_dict: Any = TypedDict
    inputs: Any = make_typed_dict("Inputs", fields)
    inputs.__pydantic_config__ = ConfigDict(strict=True, extra=extra)
    return TypeAdapter(inputs), defaults


def read_schema(schema_json: str) -> dict[str, Any] | None:
    """An input schema as a dict; None for "", for one past MAX_SCHEMA_BYTES or not
    an object schema (the function is then treated as declaring none)."""
    if not schema_json or len(schema_json) > MAX_SCHEMA_BYTES:
        return None
    try:
        schema = json.loads(schema_json)
    except (ValueError, RecursionError):
        log.warning("function input schema is not readable JSON; calls are not checked")
        return None
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return None
    return schema


@functools.lru_cache(maxsize=CHECKER_CACHE_ENTRIES)
def checker_of(schema_json: str) -> InputChecker | None:
    """The validator of one input schema (JSON text); None for "" or a schema this
    gateway cannot use (the calls then go through unchecked, as without a schema)."""
    schema = read_schema(schema_json)
    if schema is None:
        return None
    try:
        adapter, defaults = _adapter(schema, patterns=True)
    except Exception as exc:  # noqa: BLE001 (pydantic's schema errors: a bad pattern)
        log.warning("function input schema not fully usable; patterns not checked",
                    error=str(exc))
        try:
            adapter, defaults = _adapter(schema, patterns=False)
        except Exception as again:  # noqa: BLE001
            log.warning("function input schema unusable; calls are not checked",
                        error=str(again))
            return None
    return InputChecker(adapter, defaults, tuple(schema.get("properties") or ()))


async def checked_body(schema_json: str, body: bytes) -> bytes:
    """The body a call sends on: as given without a schema, else checked (422
    InputRejected) with defaults filled in."""
    checker = checker_of(schema_json)
    if checker is None:
        return body
    if len(body) > INLINE_CHECK_BYTES:
        return await asyncio.to_thread(checker.check, body)
    return checker.check(body)

"""Checking a call's body against its function's input schema (gateway/inputs.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import pytest

from thaw.gateway.errors import InputRejected, error_body, status_of
from thaw.gateway.inputs import INLINE_CHECK_BYTES, checked_body, checker_of
from thaw.snapshotter.runtime.inputs import Input
from thaw.snapshotter.runtime.signature import handler_schema


class Typed:
    def predict(self, text: str = Input(max_length=8, regex="^[a-z]+$"),
                n: int = Input(default=2, ge=1, le=5), mode: Literal["a", "b"] = "a",
                tags: list[str] | None = None, scale: float = 1.0, flag: bool = False
                ) -> None: ...


SCHEMA = handler_schema(Typed())


def check(body: bytes, schema: str = SCHEMA) -> bytes:
    return asyncio.run(checked_body(schema, body))


def rejected(body: bytes, schema: str = SCHEMA) -> InputRejected:
    with pytest.raises(InputRejected) as caught:
        check(body, schema)
    return caught.value


def test_a_valid_call_gets_its_defaults_filled_in() -> None:
    sent = json.loads(check(b'{"text": "abc", "scale": 2}'))
    assert sent == {"text": "abc", "scale": 2, "n": 2, "mode": "a", "tags": None,
                    "flag": False}


def test_a_call_naming_every_input_is_passed_on_byte_for_byte() -> None:
    body = b'{"text":"ab","n":1,"mode":"b","tags":["x"],"scale":0.5,"flag":true}'
    assert check(body) is body


@pytest.mark.parametrize(("body", "field", "words"), [
    (b'{"text": "abc", "n": 9}', "n", "less than or equal to 5"),
    (b'{"text": "abc", "n": "2"}', "n", "valid integer"),
    (b'{"text": "abc", "n": 2.5}', "n", "integer"),
    (b'{"text": "abc", "flag": 1}', "flag", "boolean"),
    (b'{"text": "abc", "mode": "c"}', "mode", "'a' or 'b'"),
    (b'{"text": "abc", "tags": ["x", 3]}', "tags.1", "string"),
    (b'{"text": "ABC"}', "text", "pattern"),
    (b'{"text": "abcdefghij"}', "text", "at most 8"),
    (b'{"n": 1}', "text", "required"),
    (b"", "text", "required"),
    (b'{"text": "abc", "other": 1}', "other", "takes no input"),
    (b"[1, 2]", "body", "JSON object"),
    (b"{nope", "body", "not valid JSON"),
])
def test_wrong_inputs_are_refused_naming_the_field(body: bytes, field: str,
                                                   words: str) -> None:
    exc = rejected(body)
    assert exc.field == field and words in exc.message, exc.message
    assert status_of(exc) == 422
    assert error_body(exc.code, exc.message, exc.field)["error"] == {
        "code": "invalid_input", "message": exc.message, "field": field}


def test_functions_without_a_schema_are_not_checked() -> None:
    assert check(b"not json at all", "") == b"not json at all"


@pytest.mark.parametrize("schema", ["{not json", '"a string"', '{"type": "array"}'])
def test_an_unreadable_schema_checks_nothing(schema: str) -> None:
    assert checker_of(schema) is None
    assert check(b"[1]", schema) == b"[1]"


def test_unknown_schema_parts_accept_any_value() -> None:
    schema = json.dumps({"type": "object", "properties": {
        "x": {"type": "mystery"}, "y": "nonsense", "z": {"anyOf": [{"type": "integer"}, {}]}},
        "required": ["x"], "additionalProperties": False})
    assert json.loads(check(b'{"x": [1], "y": {"a": 1}, "z": "s"}', schema))["x"] == [1]
    assert rejected(b"{}", schema).field == "x"


def test_a_pattern_the_linear_engine_refuses_is_left_unchecked() -> None:
    # Backreferences need backtracking, which the gateway never runs on tenant input.
    schema = json.dumps({"type": "object", "properties": {
        "s": {"type": "string", "pattern": "^(a+)\\1$", "maxLength": 3}}})
    assert check(b'{"s": "zz"}', schema) == b'{"s": "zz"}'
    assert rejected(b'{"s": "zzzz"}', schema).field == "s"  # the other limits hold


def test_additional_properties_allowed_by_var_keywords() -> None:
    class Open:
        def predict(self, a: int, **rest: Any) -> None: ...

    assert check(b'{"a": 1, "b": "x"}', handler_schema(Open())) == b'{"a": 1, "b": "x"}'


def test_large_bodies_are_checked_too() -> None:
    text = "a" * (INLINE_CHECK_BYTES + 10)
    schema = json.dumps({"type": "object", "properties": {"t": {"type": "string"}}})
    assert rejected(json.dumps({"t": 5, "pad": text}).encode(), schema).field == "t"
    assert json.loads(check(json.dumps({"t": text}).encode(), schema))["t"] == text


def test_oversized_or_absurdly_deep_schemas_check_nothing() -> None:
    # The schema is written inside the tenant's instance: the gateway must not choke.
    deep = ('{"type": "object", "properties": {"a": '
            + '{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000 + "}}")
    assert checker_of(deep) is None
    huge = json.dumps({"type": "object", "properties": {"a": {"description": "d" * 70_000}}})
    assert checker_of(huge) is None


def test_the_manifest_carries_only_a_bounded_schema() -> None:
    from thaw.proto import manifest_pb2
    from thaw.snapshotter.manifest import build_manifest, capture_json

    arena = manifest_pb2.Arena()

    def built(schema: object) -> manifest_pb2.SnapshotManifest:
        return build_manifest({"input_schema": schema}, function="t/f", version="1",
                              pickle=arena, host=arena, device=arena)

    assert built(SCHEMA).input_schema == SCHEMA
    assert capture_json(built(SCHEMA))["input_schema"] == SCHEMA
    assert built("x" * 70_000).input_schema == ""
    assert built(["not", "text"]).input_schema == ""


def test_a_union_refused_on_every_branch_names_the_input_and_each_reason() -> None:
    class Either:
        def predict(self, x: int | str = Input(max_length=2),
                    grid: list[list[int]] | None = None) -> None: ...

    schema = handler_schema(Either())
    exc = rejected(b'{"x": "abc"}', schema)
    assert exc.field == "x"
    assert "valid integer" in exc.message and "at most 2 characters" in exc.message
    assert rejected(b'{"x": 1, "grid": [[1], [2, "a"]]}', schema).field == "grid.1.1"

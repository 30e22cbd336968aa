"""predict()'s signature as a JSON Schema (snapshotter/runtime/signature.py), and the
runtime passing `Input` defaults' values, never the Input objects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal, Optional

import pytest

from thaw.snapshotter.runtime.handler import InvalidInput, Invoker, Request
from thaw.snapshotter.runtime.inputs import Input
from thaw.snapshotter.runtime.signature import (
    MAX_SCHEMA_BYTES,
    OUTPUT_KEY,
    UnsupportedType,
    handler_schema,
    signature_schema,
    type_schema,
)


@pytest.mark.parametrize(("hint", "schema"), [
    (str, {"type": "string"}),
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (bool, {"type": "boolean"}),
    (list[str], {"type": "array", "items": {"type": "string"}}),
    (tuple[int, ...], {"type": "array", "items": {"type": "integer"}}),
    (dict[str, Any], {"type": "object"}),
    (Any, {}),
    (Optional[int], {"anyOf": [{"type": "integer"}, {"type": "null"}]}),  # noqa: UP045
    (str | None, {"anyOf": [{"type": "string"}, {"type": "null"}]}),
    (int | str, {"anyOf": [{"type": "integer"}, {"type": "string"}]}),
    (Literal["fast", "slow"], {"enum": ["fast", "slow"]}),
    (list[Literal[1, 2]], {"type": "array", "items": {"enum": [1, 2]}}),
])
def test_type_hints_become_schemas(hint: Any, schema: dict[str, Any]) -> None:
    assert type_schema(hint) == schema


@pytest.mark.parametrize("hint", [bytes, dict[int, str], tuple[int, str], complex])
def test_hints_without_a_json_form_are_refused(hint: Any) -> None:
    with pytest.raises(UnsupportedType):
        type_schema(hint)


class Typed:
    def predict(self, text: str, n: int = Input(default=1, ge=1, le=16, description="How many"),
                mode: Literal["a", "b"] = "a", tags: list[str] | None = None,
                scale: float = 0.5, flag: bool = False,
                word: str = Input(regex="^[a-z]+$", min_length=1, max_length=8),
                pick: str = Input(default="x", choices=["x", "y"])) -> dict[str, Any]:
        return {"text": text, "n": n, "mode": mode, "tags": tags, "scale": scale,
                "flag": flag, "word": word, "pick": pick}


def test_a_typed_signature_becomes_an_object_schema() -> None:
    schema = json.loads(handler_schema(Typed()))
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["text", "word"]
    props = schema["properties"]
    assert list(props) == ["text", "n", "mode", "tags", "scale", "flag", "word", "pick"]
    assert props["text"] == {"type": "string"}
    assert props["n"] == {"type": "integer", "default": 1, "minimum": 1, "maximum": 16,
                          "description": "How many"}
    assert props["mode"] == {"enum": ["a", "b"], "default": "a"}
    assert props["tags"]["default"] is None
    assert props["scale"] == {"type": "number", "default": 0.5}
    assert props["flag"] == {"type": "boolean", "default": False}
    assert props["word"] == {"type": "string", "pattern": "^[a-z]+$", "minLength": 1,
                             "maxLength": 8}
    assert props["pick"] == {"type": "string", "enum": ["x", "y"], "default": "x"}


def test_untyped_and_request_handlers_get_no_schema() -> None:
    class Untyped:
        def predict(self, text, n=1):  # type: ignore[no-untyped-def]
            return text

    class Call:
        def __call__(self, request: Request) -> str:
            return "x"

    assert handler_schema(Untyped()) == ""
    assert handler_schema(Call()) == ""


def test_var_keywords_allow_other_inputs_and_positional_only_are_left_out() -> None:
    def predict(a: int, /, b: str, **rest: Any) -> None: ...
    schema = signature_schema(predict)
    assert schema is not None
    assert schema["additionalProperties"] is True and list(schema["properties"]) == ["b"]


def test_a_hint_without_schema_or_a_huge_schema_gives_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Raw:
        def predict(self, data: bytes) -> None: ...

    assert handler_schema(Raw()) == ""

    class Long:
        def predict(self, x: str = Input(description="d" * MAX_SCHEMA_BYTES)) -> None: ...

    assert handler_schema(Long()) == ""


def test_batching_functions_get_no_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_MAX_BATCH_SIZE", "4")
    assert handler_schema(Typed()) == ""


def test_cog_style_field_objects_are_read_by_their_attributes() -> None:
    class FieldInfo:  # what cog's and pydantic's Input() return, by shape
        def __init__(self) -> None:
            self.default = Ellipsis
            self.description = "prompt"
            self.ge = None
            self.le = None
            self.metadata = [type("MaxLen", (), {"max_length": 5})()]

    class Cog:
        def predict(self, prompt: str = FieldInfo()) -> str:  # type: ignore[assignment]
            return prompt

    schema = json.loads(handler_schema(Cog()))
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["prompt"] == {"type": "string", "description": "prompt",
                                              "maxLength": 5}


def test_input_refuses_contradictions() -> None:
    with pytest.raises(ValueError, match="ge is above le"):
        Input(ge=2, le=1)
    with pytest.raises(ValueError, match="choices"):
        Input(choices=[])


def test_the_runtime_passes_input_defaults_not_input_objects() -> None:
    invoker = Invoker(Typed())
    reply = invoker.invoke(Request("POST", "", "", {}, b'{"text": "t", "word": "w"}'))
    body = json.loads(reply.body)  # type: ignore[union-attr]
    assert body["n"] == 1 and body["pick"] == "x"
    with pytest.raises(InvalidInput, match="'word'"):
        invoker.invoke(Request("POST", "", "", {}, b'{"text": "t"}'))


def test_the_return_hint_rides_along_for_the_documents_only() -> None:
    class Listing:
        def predict(self, x: int) -> list[float]:
            return [float(x)]

    class Streaming:
        def predict(self, x: int) -> Iterator[str]:
            yield str(x)

    assert json.loads(handler_schema(Listing()))[OUTPUT_KEY] == {
        "type": "array", "items": {"type": "number"}}
    assert OUTPUT_KEY not in json.loads(handler_schema(Streaming()))


def test_defaults_are_stated_only_when_json_keeps_them_as_they_are() -> None:
    class Defaults:
        def predict(self, sizes: list[int] = [1024], pair: tuple[int, ...] = (1, 2),  # noqa: B006
                    table: dict[str, Any] = {"a": [1]}, odd: Any = object(),  # noqa: B006,B008
                    limit: float = float("inf")) -> None: ...

    props = json.loads(handler_schema(Defaults()))["properties"]
    assert props["sizes"]["default"] == [1024] and props["table"]["default"] == {"a": [1]}
    # Left to the handler's own default: JSON would turn a tuple into a list.
    assert "default" not in props["pair"] and "default" not in props["odd"]
    assert "default" not in props["limit"]
    assert "required" not in json.loads(handler_schema(Defaults()))


def test_pydantic_fields_are_read_like_input() -> None:
    from pydantic import Field

    class Fields:
        def predict(self, a: int = Field(default=3, ge=1, le=5, description="d"),
                    b: str = Field(description="req", pattern="^x", max_length=4,
                                   json_schema_extra={"choices": ["xa", "xb"]})) -> None: ...

    schema = json.loads(handler_schema(Fields()))
    assert schema["required"] == ["b"]
    assert schema["properties"]["a"] == {"type": "integer", "default": 3, "minimum": 1,
                                         "maximum": 5, "description": "d"}
    assert schema["properties"]["b"] == {"type": "string", "description": "req",
                                         "pattern": "^x", "maxLength": 4,
                                         "enum": ["xa", "xb"]}

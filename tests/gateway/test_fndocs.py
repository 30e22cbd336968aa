"""A function's own OpenAPI document and docs page (gateway/fndocs.py)."""

from __future__ import annotations

import asyncio
import json

from thaw.gateway.fndocs import docs_page, function_document
from thaw.gateway.inputs import checked_body, read_schema
from thaw.snapshotter.runtime.inputs import Input
from thaw.snapshotter.runtime.signature import handler_schema


class Typed:
    def predict(self, text: str = Input(description="<script>alert(1)</script>"),
                n: int = Input(default=2, ge=1, le=5), tags: list[str] | None = None
                ) -> None: ...


SCHEMA = read_schema(handler_schema(Typed()))


def test_the_document_carries_the_input_schema_as_the_body() -> None:
    doc = function_document("acme", "sum", SCHEMA, "https://fn.example")
    op = doc["paths"]["/fn/acme/sum"]["post"]
    assert op["requestBody"]["required"] is True
    assert op["requestBody"]["content"]["application/json"]["schema"] == SCHEMA
    assert op["responses"]["422"]["content"]["application/json"]["schema"]["required"] == [
        "error"]
    assert doc["servers"] == [{"url": "https://fn.example"}]
    json.dumps(doc)  # a JSON document, all through


def test_an_untyped_function_documents_any_body_and_no_422() -> None:
    op = function_document("acme", "raw", None, "x")["paths"]["/fn/acme/raw"]["post"]
    assert op["requestBody"]["required"] is False
    assert op["requestBody"]["content"]["application/json"]["schema"] == {}
    assert "422" not in op["responses"]


def test_the_page_lists_inputs_and_escapes_what_the_tenant_wrote() -> None:
    page = docs_page("acme", "sum", SCHEMA)
    assert "<td>text</td><td>string</td><td>yes</td>" in page
    assert "<td>n</td><td>integer</td><td>no</td><td>2</td><td>≥ 1; ≤ 5</td>" in page
    assert "<td>tags</td><td>array of string or null</td>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "no typed inputs" in docs_page("acme", "raw", None)


def test_the_return_type_is_the_answer_schema_and_not_an_input() -> None:
    class Returns:
        def predict(self, x: int) -> list[str]: ...

    schema = read_schema(handler_schema(Returns()))
    op = function_document("acme", "r", schema, "x")["paths"]["/fn/acme/r"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert "x-thaw-output" not in body and body["required"] == ["x"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "type": "array", "items": {"type": "string"}}
    assert "Returns: array of string" in docs_page("acme", "r", schema)
    # The gateway's check ignores it: any answer shape, the inputs still checked.
    assert asyncio.run(checked_body(handler_schema(Returns()), b'{"x": 1}')) == b'{"x": 1}'

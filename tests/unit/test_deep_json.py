"""JSON nested past what a parser can take never becomes a 500: a stored result too
deep to inline is served as base64, and a function's request body too deep to parse is
the caller's bad input."""

from __future__ import annotations

import base64

import pytest

from thaw.gateway.stored.views import inline_result
from thaw.snapshotter.runtime.handler import InvalidInput, Invoker, Request

DEEP = b"[" * 200_000 + b"]" * 200_000


def test_a_stored_result_too_deep_to_inline_is_served_as_base64() -> None:
    out: dict[str, object] = {}
    inline_result(out, "application/json", DEEP)
    assert "result" not in out and base64.b64decode(str(out["result_base64"])) == DEEP
    shallow: dict[str, object] = {}
    inline_result(shallow, "application/json", b'{"a": [1, 2]}')
    assert shallow["result"] == {"a": [1, 2]}


def test_a_request_body_too_deep_to_parse_is_invalid_input() -> None:
    request = Request("POST", "/", "", {}, DEEP)
    with pytest.raises(InvalidInput, match="nests too deeply"):
        request.json()
    with pytest.raises(InvalidInput, match="nests too deeply"):
        Invoker._parse_inputs(b'{"a": ' + DEEP + b"}")

"""`Response` (snapshotter/runtime/response.py): what a handler may answer with, checked
when it is built, and the reply each body becomes (handler.py:to_reply)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thaw.snapshotter.runtime import Response
from thaw.snapshotter.runtime.handler import FileReply, Payload, Stream, to_reply
from thaw.snapshotter.runtime.response import MAX_HEADER_BYTES, MAX_HEADERS


def test_each_body_becomes_its_reply() -> None:
    text = to_reply(Response("é", status=201, headers={"Location": "/x"}))
    assert text == Payload("text/plain; charset=utf-8", "é".encode(), 201,
                           (("Location", "/x"),))
    raw = to_reply(Response(b"\x00", content_type="image/png"))
    assert raw == Payload("image/png", b"\x00", 200, ())
    value = to_reply(Response({"a": [1]}, status=418))
    assert value == Payload("application/json", b'{"a":[1]}', 418, ())
    stream = to_reply(Response(iter([b"a", "b"]), content_type="text/plain"))
    assert isinstance(stream, Stream) and stream.content_type == "text/plain"
    assert list(stream.items) == [b"a", "b"]
    page = to_reply(Response(Path("/srv/page.html"), headers=[("X-A", "1"), ("X-A", "2")]))
    assert page == FileReply("/srv/page.html", "text/html", 200,
                             (("X-A", "1"), ("X-A", "2")))


def test_a_plain_return_value_is_unchanged() -> None:
    assert to_reply({"a": 1}) == Payload("application/json", b'{"a":1}')
    assert to_reply(b"x") == Payload("application/octet-stream", b"x")
    plain = to_reply(iter([{"n": 1}]))
    assert isinstance(plain, Stream) and plain.content_type is None


def test_the_platforms_headers_are_dropped() -> None:
    kept = Response(headers={"Set-Cookie": "a=b", "Connection": "close",
                             "X-Thaw-Error": "tenant", "Content-Length": "1",
                             "ETag": '"v1"'}).headers
    assert kept == (("ETag", '"v1"'),)


@pytest.mark.parametrize("status", [99, 100, 101, 199, 502, 504, 507, 600, True, "200"])
def test_a_status_the_platform_cannot_answer_is_refused(status: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        Response(status=status)  # type: ignore[arg-type]


@pytest.mark.parametrize("headers", [
    {"X-Split": "a\r\nInjected: yes"}, {"X-Nul": "a\x00"}, {"Bad Name": "v"},
    {"": "v"}, {"X-Big": "v" * MAX_HEADER_BYTES}, {"X-Num": 1},
    {f"X-{i}": "v" for i in range(MAX_HEADERS + 1)}, {"X-Emoji": "\u2603"}])
def test_a_header_that_cannot_go_on_the_wire_is_refused(headers: dict[str, object]
                                                         ) -> None:
    with pytest.raises((ValueError, TypeError)):
        Response(headers=headers)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Response(content_type="text/plain\r\nX: y")

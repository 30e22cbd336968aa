"""Dispatch to predict()/__call__() and the mapping of return values to replies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thaw.snapshotter.runtime.handler import (
    HandlerRef,
    InvalidInput,
    Invoker,
    Payload,
    Request,
    Stream,
    to_reply,
)


def request(body: bytes = b"", path: str = "") -> Request:
    return Request("POST", path, "", {}, body)


@pytest.mark.parametrize(
    ("value", "body"),
    [({"a": [1, 2.5]}, b'{"a":[1,2.5]}'), ([None, True], b"[null,true]"), ("hé", b'"h\xc3\xa9"'),
     (3, b"3"), (None, b"null"), ((1, 2), b"[1,2]")],
)
def test_json_values_become_json(value: Any, body: bytes) -> None:
    assert to_reply(value) == Payload("application/json", body)


def test_bytes_become_octet_stream() -> None:
    assert to_reply(b"\x00\x01") == Payload("application/octet-stream", b"\x00\x01")
    assert to_reply(bytearray(b"ab")).body == b"ab"  # type: ignore[union-attr]


def test_values_with_tolist_are_encoded() -> None:
    numpy = pytest.importorskip("numpy")
    reply = to_reply({"v": numpy.arange(3), "s": numpy.float32(1.5)})
    assert reply == Payload("application/json", b'{"v":[0,1,2],"s":1.5}')


def test_unencodable_value_raises() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        to_reply(object())


def test_generator_is_primed_then_streamed() -> None:
    produced: list[int] = []

    def generate() -> Iterator[int]:
        for i in range(3):
            produced.append(i)
            yield i

    reply = to_reply(generate())
    assert isinstance(reply, Stream)
    assert produced == [0]  # the first item exists before any header is sent
    assert list(reply.items) == [0, 1, 2]


def test_generator_failing_before_first_item_raises_at_once() -> None:
    def generate() -> Iterator[int]:
        raise KeyError("early")
        yield 1

    with pytest.raises(KeyError):
        to_reply(generate())


def test_empty_generator_is_an_empty_stream() -> None:
    reply = to_reply(iter([]))
    assert isinstance(reply, Stream) and list(reply.items) == []


class Predictor:
    def predict(self, text: str, top_k: int = 1) -> dict[str, Any]:
        return {"text": text, "top_k": top_k}


class Caller:
    def __call__(self, request: Request) -> str:
        return request.path


def test_predict_takes_body_keys_as_kwargs() -> None:
    invoker = Invoker(Predictor())
    assert invoker.invoke(request(b'{"text": "x", "top_k": 3}')).body == (  # type: ignore[union-attr]
        b'{"text":"x","top_k":3}')


@pytest.mark.parametrize("body", [b"{", b"[1]", b'"s"', b'{"top_k": 2}', b'{"text": 1, "x": 2}'])
def test_predict_rejects_bodies_that_do_not_fit(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        Invoker(Predictor()).invoke(request(body))


def test_call_receives_the_request() -> None:
    assert Invoker(Caller()).invoke(request(path="/a/b")).body == b'"/a/b"'  # type: ignore[union-attr]


def test_request_json_raises_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        request(b"{nope").json()
    assert request(b'{"a": 1}').json() == {"a": 1}


def test_handler_without_predict_or_call_is_refused() -> None:
    with pytest.raises(TypeError, match="neither"):
        Invoker(object())


@pytest.mark.parametrize("spec", ["app", "app:", ":Cls", ""])
def test_handler_ref_needs_module_and_class(spec: str) -> None:
    with pytest.raises(ValueError):
        HandlerRef.parse("/tmp", spec)


def test_handler_ref_resolves_the_bundle() -> None:
    ref = HandlerRef.parse(".", "pkg.app:Outer.Inner")
    assert ref.bundle == Path(".").resolve()
    assert (ref.module, ref.qualname) == ("pkg.app", "Outer.Inner")

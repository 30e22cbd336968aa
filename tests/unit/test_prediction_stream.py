"""Streaming predictions' own logic (gateway/prediction_stream.py) with a fake
dispatcher: NDJSON lines split across chunks, the runtime's error line, the output
bound, a JSON answer as one item, an error status, cancel; and the events' wire form."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from thaw.gateway.prediction_stream import (
    NDJSON,
    LiveStreams,
    event,
    item_text,
    stream_error,
)


class FakeExchange:
    def __init__(self, chunks: list[bytes], status: int = 200,
                 content_type: str = NDJSON, gate: asyncio.Event | None = None) -> None:
        self._chunks, self.status, self.content_type = chunks, status, content_type
        self.gate = gate
        self.lease = SimpleNamespace(version=3)

    async def __aenter__(self) -> FakeExchange:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(self) -> bytes:
        return b"".join(self._chunks)

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
            if self.gate is not None:
                await self.gate.wait()


class FakeDispatcher:
    def __init__(self, exchange: FakeExchange) -> None:
        self.exchange = exchange

    async def open(self, call: Any) -> FakeExchange:
        return self.exchange


CALL = SimpleNamespace(tenant="dev")


def _run(exchange: FakeExchange, max_bytes: int = 1 << 20) -> Any:
    async def go() -> Any:
        streams = LiveStreams()
        live = streams.start(FakeDispatcher(exchange), CALL, "dev/m", {},  # type: ignore[arg-type]
                             max_bytes)
        assert live.status == "starting" and live.id.startswith("stream_")
        assert live.task is not None
        await live.task
        assert streams.get("dev", live.id) is live
        return live
    return asyncio.run(go())


def test_lines_split_across_chunks_are_items_in_order() -> None:
    live = _run(FakeExchange([b'"a"\n"b', b'"\n{"k": [1', b", 2]}\n", b"3"]))
    assert live.status == "succeeded" and live.items == ["a", "b", {"k": [1, 2]}, 3]
    assert live.version == "3" and live.completed >= live.started > 0


def test_the_runtimes_error_line_fails_it_after_the_items() -> None:
    live = _run(FakeExchange([b'"a"\n{"error": {"code": "handler_error", '
                              b'"message": "boom"}}\n']))
    assert live.status == "failed" and live.items == ["a"] and live.error == "boom"
    # An item that merely has an "error" key is an item.
    assert stream_error({"error": "x"}) is None
    assert stream_error({"error": {"code": "c", "message": "m"}, "other": 1}) is None


def test_output_past_the_bound_fails_it_and_other_answers() -> None:
    live = _run(FakeExchange([b'"aaaa"\n"bbbb"\n'], ), max_bytes=8)
    assert live.status == "failed" and "max_body_bytes" in (live.error or "")
    assert live.items == ["aaaa"]
    whole = _run(FakeExchange([b'{"x": 1}'], content_type="application/json"))
    assert whole.status == "succeeded" and whole.items == [{"x": 1}]
    refused = _run(FakeExchange([b'{"error": {"code": "c", "message": "no"}}'],
                                status=503, content_type="application/json"))
    assert refused.status == "failed" and refused.error == "no"


def test_cancel_stops_it_mid_stream() -> None:
    async def go() -> Any:
        gate = asyncio.Event()
        streams = LiveStreams()
        live = streams.start(FakeDispatcher(FakeExchange([b'"a"\n', b'"b"\n'], gate=gate)),
                             CALL, "dev/m", {}, 1 << 20)  # type: ignore[arg-type]
        while not live.items:
            await asyncio.sleep(0)
        streams.cancel(live)
        assert live.task is not None
        await asyncio.wait({live.task})
        return live
    live = asyncio.run(go())
    assert live.status == "canceled" and live.items == ["a"]


def test_events_on_the_wire() -> None:
    assert event("output", 0, "hi") == b"event: output\nid: 0\ndata: hi\n\n"
    assert event("output", 4, "a\nb") == b"event: output\nid: 4\ndata: a\ndata: b\n\n"
    assert item_text("x") == "x" and item_text({"a": [1]}) == '{"a":[1]}'

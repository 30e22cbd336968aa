"""Streaming predictions: Replicate's `stream=True` (docs/cog.md, "Streaming").

A prediction created with `"stream": true` runs at once, in the gateway that created
it, as a call through the one invocation path; its answer is read as it arrives (a
predictor returning `Iterator[...]`/`ConcatenateIterator` answers NDJSON, one line an
item) and kept in memory. The prediction names `urls.stream`, where a client reads it
as server-sent events the way Replicate serves them: an `output` event per item (a
string item as itself, anything else as JSON), then `error` (the predictor raised)
and `done` (`{}`, or `{"reason": "canceled"}`). A reader that comes late gets the
items so far first. `GET /v1/predictions/{id}` answers it with the items so far as
`output`, and cancel stops it. Streams live in this gateway's memory while they run
and for KEEP_SECONDS after, at most MAX_LIVE of them; another gateway replica does
not know them (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from thaw.core.errors import NotFound, ThawError, Unavailable
from thaw.gateway import jsonbody
from thaw.gateway.dispatch import Call, Dispatcher
from thaw.gateway.errors import PayloadTooLarge

PREFIX = "stream_"
KEEP_SECONDS = 600.0
MAX_LIVE = 1024
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class LivePrediction:
    """A streaming prediction while it runs, and a while after."""

    id: str
    tenant: str
    model: str
    inputs: dict[str, Any]
    created: float
    started: float = 0.0
    completed: float = 0.0
    version: str = ""
    status: str = "starting"
    items: list[Any] = field(default_factory=list)
    error: str | None = None
    size: int = 0
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        """Wake every reader; each waits on a fresh event next."""
        self.changed.set()
        self.changed = asyncio.Event()


def _now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


def stream_error(line: Any) -> str | None:
    """The runtime's error line ending a stream whose handler raised
    (`{"error": {"code", "message"}}`), as its message; None for an item."""
    if isinstance(line, dict) and line.keys() == {"error"}:
        error = line["error"]
        if isinstance(error, dict) and {"code", "message"} <= error.keys():
            return str(error["message"])
    return None


class LiveStreams:
    """This gateway's streaming predictions."""

    def __init__(self) -> None:
        self.live: dict[str, LivePrediction] = {}

    def start(self, dispatcher: Dispatcher, call: Call, model: str,
              inputs: dict[str, Any], max_bytes: int) -> LivePrediction:
        """Run `call` now, its answer kept as it arrives (at most `max_bytes`)."""
        self._forget_old()
        if len(self.live) >= MAX_LIVE:
            raise Unavailable(f"this gateway holds {MAX_LIVE} streaming predictions; "
                                    "try again shortly", field="stream")
        live = LivePrediction(id=PREFIX + uuid.uuid4().hex, tenant=call.tenant,
                              model=model, inputs=inputs, created=_now())
        live.task = asyncio.ensure_future(self._run(live, dispatcher, call, max_bytes))
        self.live[live.id] = live
        return live

    def get(self, tenant: str, pid: str) -> LivePrediction:
        live = self.live.get(pid)
        if live is None or live.tenant != tenant:
            raise NotFound(f"streaming prediction {pid[:80]} not found (streams are kept "
                           f"by the gateway that ran them, {KEEP_SECONDS:g}s after they "
                           "end)", field="id")
        return live

    def cancel(self, live: LivePrediction) -> None:
        if live.status not in TERMINAL and live.task is not None:
            live.task.cancel()

    async def close(self) -> None:
        """Stop every running stream (the gateway is stopping)."""
        tasks = [t for t in (live.task for live in self.live.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget_old(self) -> None:
        cutoff = _now() - KEEP_SECONDS
        for pid in [p for p, live in self.live.items()
                    if live.status in TERMINAL and live.completed < cutoff]:
            del self.live[pid]

    async def _run(self, live: LivePrediction, dispatcher: Dispatcher, call: Call,
                   max_bytes: int) -> None:
        try:
            async with await dispatcher.open(call) as ex:
                live.started, live.status = _now(), "processing"
                live.version = str(ex.lease.version or "")
                live.notify()
                if ex.status != 200:
                    live.error = jsonbody.error_message(ex.status, await ex.read())
                elif ex.content_type.split(";")[0].strip().lower() == NDJSON:
                    await self._read_lines(live, ex.chunks(), max_bytes)
                else:
                    body = await ex.read()
                    self._add(live, jsonbody.loads(body) if body.strip() else None,
                              len(body), max_bytes)
        except asyncio.CancelledError:
            live.status = "canceled"
        except ThawError as exc:
            live.error = exc.message
        except ValueError as exc:
            live.error = f"the function's answer is not valid JSON: {exc}"
        finally:
            if live.status != "canceled":
                live.status = "failed" if live.error is not None else "succeeded"
            live.completed = _now()
            live.notify()

    async def _read_lines(self, live: LivePrediction, chunks: AsyncIterator[bytes],
                          max_bytes: int) -> None:
        pending = b""
        async for chunk in chunks:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    self._line(live, line, max_bytes)
        if pending.strip():
            self._line(live, pending, max_bytes)

    def _line(self, live: LivePrediction, line: bytes, max_bytes: int) -> None:
        item = jsonbody.loads(line)
        error = stream_error(item)
        if error is not None:
            live.error = error
            return
        self._add(live, item, len(line), max_bytes)

    @staticmethod
    def _add(live: LivePrediction, item: Any, size: int, max_bytes: int) -> None:
        live.size += size
        if live.size > max_bytes:
            raise PayloadTooLarge(f"the streamed output passed {max_bytes} bytes "
                                    "(max_body_bytes)", field="output")
        live.items.append(item)
        live.notify()


def event(kind: str, number: int, data: str) -> bytes:
    """One server-sent event; every line of `data` its own `data:` field."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {kind}\nid: {number}\n{lines}\n".encode()


def item_text(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))


async def serve(request: web.Request, live: LivePrediction) -> web.StreamResponse:
    """The prediction's events, from its first item to its end."""
    response = web.StreamResponse(headers={"Content-Type": SSE,
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    sent = 0
    while True:
        changed = live.changed
        while sent < len(live.items):
            await response.write(event("output", sent, item_text(live.items[sent])))
            sent += 1
        if live.status in TERMINAL:
            break
        await changed.wait()
    if live.status == "failed":
        await response.write(event("error", sent, live.error or "the prediction failed"))
        sent += 1
    done = {"reason": "canceled"} if live.status == "canceled" else {}
    await response.write(event("done", sent, json.dumps(done)))
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response

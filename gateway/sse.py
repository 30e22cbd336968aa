"""The stream formats a generator handler answers in (thaw.snapshotter.runtime.server):

- SSE (`Accept: text/event-stream`): each item `data: <json>\\n\\n`; a failure midway
  `event: error\\ndata: {"error": {...}}\\n\\n` as the last event; the end of a
  complete stream `event: done\\ndata: {}\\n\\n`.
- NDJSON (otherwise): one JSON value a line; a failure midway `{"error": {...}}`.

The gateway passes both through byte for byte; when the stream breaks on its side
(the node went away, the client's deadline passed) it ends it the same way the runtime
would, so a client has one format to handle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

SSE_CONTENT_TYPE = "text/event-stream"
NDJSON_CONTENT_TYPE = "application/x-ndjson"
# Bytes of one SSE event kept while waiting for its end; a handler's single item can
# be large (an image), this only bounds a stream that never ends an event.
MAX_EVENT_BYTES = 64 * 1024 * 1024


def error_json(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}},
                      separators=(",", ":")).encode()


def error_chunk(content_type: str, code: str, message: str) -> bytes | None:
    """The stream's last item saying why it ended early; None for a format without one."""
    if content_type.startswith(SSE_CONTENT_TYPE):
        return b"event: error\ndata: " + error_json(code, message) + b"\n\n"
    if content_type.startswith(NDJSON_CONTENT_TYPE):
        return error_json(code, message) + b"\n"
    return None


@dataclass(frozen=True)
class Event:
    event: str | None
    data: str


class EventParser:
    """Incremental SSE parser (the subset the runtime writes, plus CRLF line ends)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[Event]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                if len(self._buffer) > MAX_EVENT_BYTES:
                    raise ValueError("an SSE event larger than the gateway accepts")
                return
            block, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            event: str | None = None
            data: list[str] = []
            for line in block.decode("utf-8", errors="replace").split("\n"):
                if line.startswith(":"):
                    continue  # a comment (keep-alive)
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
            if event is not None or data:
                yield Event(event, "\n".join(data))

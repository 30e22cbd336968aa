"""Server-Sent Events read line by line: each event's `data` payload, in order.

An `event: error` ends the stream with an error (the function failed midway) and an
`event: done` ends it cleanly, as the gateway sends them (gateway/sse.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from thaw.client.errors import ServerError, error_body

SSE_TYPE = "text/event-stream"


@dataclass
class EventReader:
    """Feed it lines; `feed` answers an event's payload once its blank line arrives."""

    event: str = "message"
    data: list[str] = field(default_factory=list)
    done: bool = False

    def feed(self, line: str) -> str | None:
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
        elif not line:
            payload, event = "\n".join(self.data), self.event
            self.data, self.event = [], "message"
            if event == "error":
                raise _failed(payload)
            if event == "done":
                self.done = True
                return None
            return payload or None
        return None


def _failed(payload: str) -> ServerError:
    """The error an `event: error` carries ({"error": {"code", "message"}}, or text)."""
    try:
        code, message, field = error_body(json.loads(payload))
    except ValueError:
        code, message, field = "", "", None
    return ServerError(f"the function failed midway: {message or payload}",
                       code=code or "stream_error", field=field)

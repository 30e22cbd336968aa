"""Per-call logs on a node: the lines an instance printed while it served one call
(marked by the runtime, snapshotter/runtime/calllog.py; the mark parsed in
platform/logs.py), kept per function and request id beyond the function's ring so
`GET /logs?function=…&request=…` can answer with exactly one call's lines.

Bounded twice: a call keeps at most MAX_CALL_LINES lines and MAX_CALL_BYTES bytes
(then one runtime line says the rest is not kept), and a function's calls are kept
as long as the retention says (`CallLogRetention`: an age and a byte total per
function on the node, applied by gc.select_call_logs on every add past the total and
on each periodic collection). Kept in the agent's memory: an agent restart forgets
them, as it does the ring.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from thaw.core.errors import InvalidArgument
from thaw.platform.gc import CallLogEntry, select_call_logs

# A call's own lines kept, whatever the retention: a handler printing in a loop costs
# the node a known amount per call. docs/logs.md states both bounds.
MAX_CALL_LINES = 10_000
MAX_CALL_BYTES = 1024 * 1024
# Retention defaults: a day, and 8 MiB of calls' lines per function on a node.
DEFAULT_MAX_AGE_SECONDS = 24 * 3600.0
DEFAULT_MAX_BYTES_PER_FUNCTION = 8 * 1024 * 1024
# The agent's environment sets the retention (read once, when the agent starts).
MAX_AGE_ENV = "THAW_CALL_LOGS_MAX_AGE_SECONDS"
MAX_BYTES_ENV = "THAW_CALL_LOGS_MAX_BYTES"
LineT = TypeVar("LineT")
TRUNCATED_TEXT = (f"output of this call past {MAX_CALL_LINES} lines or "
                  f"{MAX_CALL_BYTES // (1024 * 1024)} MiB is not kept")


@dataclass(frozen=True)
class CallLogRetention:
    """How long, and how much of, a function's calls' lines a node keeps."""

    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS
    """Calls that last printed longer ago than this are dropped (0: kept until the
    byte total pushes them out)."""
    max_bytes_per_function: int = DEFAULT_MAX_BYTES_PER_FUNCTION
    """The most bytes of lines kept for one function's calls; the oldest calls go
    first."""

    def __post_init__(self) -> None:
        if self.max_age_seconds < 0:
            raise InvalidArgument("call log retention must be >= 0 seconds",
                                  field=MAX_AGE_ENV)
        if self.max_bytes_per_function < MAX_CALL_BYTES:
            raise InvalidArgument(
                f"call log retention must keep at least one call ({MAX_CALL_BYTES} bytes)",
                field=MAX_BYTES_ENV)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> CallLogRetention:
        env = dict(os.environ) if env is None else env
        try:
            age = float(env.get(MAX_AGE_ENV, DEFAULT_MAX_AGE_SECONDS))
        except ValueError as exc:
            raise InvalidArgument(f"{MAX_AGE_ENV} must be a number of seconds",
                                  field=MAX_AGE_ENV) from exc
        try:
            size = int(env.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES_PER_FUNCTION))
        except ValueError as exc:
            raise InvalidArgument(f"{MAX_BYTES_ENV} must be a number of bytes",
                                  field=MAX_BYTES_ENV) from exc
        return cls(age, size)


@dataclass
class _Call(Generic[LineT]):
    lines: list[LineT] = field(default_factory=list)
    """The call's lines (platform/logs.py LogLine), oldest first."""
    bytes: int = 0
    last_time: float = 0.0
    truncated: bool = False


class CallLogs(Generic[LineT]):
    """The kept lines of each function's calls on this node."""

    def __init__(self, retention: CallLogRetention | None = None) -> None:
        self.retention = retention if retention is not None else CallLogRetention()
        self._calls: dict[str, dict[str, _Call[LineT]]] = {}
        self._bytes: dict[str, int] = {}

    def add(self, function: str, request: str, line: LineT, text: str, time: float,
            truncated_line: Callable[[], LineT]) -> None:
        """Keep `line` (whose text is `text`) as one of the call's; past the call's
        bounds, `truncated_line()` is kept once instead and the rest dropped."""
        calls = self._calls.setdefault(function, {})
        call = calls.get(request)
        if call is None:
            call = calls[request] = _Call[LineT]()
        if call.truncated:
            return
        size = len(text) + 1
        call.last_time = time
        # The marker line counts among the call's MAX_CALL_LINES.
        if len(call.lines) >= MAX_CALL_LINES - 1 or call.bytes + size > MAX_CALL_BYTES:
            call.truncated = True
            line, size = truncated_line(), len(TRUNCATED_TEXT) + 1
        call.lines.append(line)
        call.bytes += size
        total = self._bytes[function] = self._bytes.get(function, 0) + size
        if total > self.retention.max_bytes_per_function:
            self._collect_function(function, time)

    def lines(self, function: str, request: str) -> list[LineT]:
        call = self._calls.get(function, {}).get(request)
        return list(call.lines) if call is not None else []

    def collect(self, now: float) -> int:
        """Apply the retention to every function; returns how many calls went."""
        return sum(self._collect_function(f, now) for f in list(self._calls))

    def _collect_function(self, function: str, now: float) -> int:
        calls = self._calls[function]
        gone = select_call_logs(
            (CallLogEntry(r, c.last_time, c.bytes) for r, c in calls.items()),
            now=now, max_age=self.retention.max_age_seconds or float("inf"),
            max_bytes=self.retention.max_bytes_per_function)
        for request in gone:
            self._bytes[function] -= calls.pop(request).bytes
        if not calls:
            del self._calls[function]
            del self._bytes[function]
        return len(gone)

    def bytes_of(self, function: str) -> int:
        return self._bytes.get(function, 0)

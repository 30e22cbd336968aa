"""Per-call log lines: what a handler prints while it serves a call is marked with that
call's request id, so the agent can file those lines under the call.

The instance's stdout and stderr stay the tenant's log file (platform/logs.py follows
it). While a call runs (`calling(request_id)` around it, in the connection's thread)
every complete line written through `sys.stdout` or `sys.stderr` goes out as
`MARK + request_id + SEPARATOR + line`; the agent strips the mark and keeps the id as
a field beside the line, never inside it. Output outside a call (imports, setup, a
background thread) goes through unchanged, as before.

What is attributed: writes through `sys.stdout`/`sys.stderr` (print, logging's stream
handlers, tracebacks) from the thread serving the call, and from code the handler runs
with `contextvars.copy_context().run(...)` or asyncio tasks it starts (both copy the
context). Not attributed: threads the handler starts with `threading.Thread` (a new
thread starts with an empty context), the batcher's thread (one run serves several
calls), writes to `sys.stdout.buffer` or to descriptors 1 and 2 directly (C
extensions, subprocesses).

Stdlib only: this runs inside every instance.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

# The mark ahead of a call's line, then the request id, then SEPARATOR: the ASCII unit
# separator, which no ordinary output holds and str.splitlines does not split at (the
# record separator, \x1e, it does). platform/logs.py parses the
# same bytes (CALL_MARK, CALL_SEPARATOR there): keep the two in sync.
MARK = "\x1fthaw-call:"
SEPARATOR = "\x1f"
# Request ids the gateway sends (gateway/app.py REQUEST_ID_PATTERN, and stored
# invocations' "inv_..." ids); anything else is not a call's id and is not marked.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}$")
# A call's text without a newline is held until one comes, at most this much: past it
# the text goes out as a line of its own (a progress bar redrawn with \r).
MAX_PENDING_CHARS = 4096

_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "thaw_call_request_id", default=None)


def current_request_id() -> str | None:
    """The request id of the call this code runs for, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def calling(request_id: str | None) -> Iterator[None]:
    """Mark what is printed inside as the call's (an id that is not a request id the
    gateway makes marks nothing); the call's unfinished line goes out at the end."""
    if not request_id or not REQUEST_ID_PATTERN.match(request_id):
        yield
        return
    token = _CURRENT.set(request_id)
    try:
        yield
    finally:
        _CURRENT.reset(token)
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, CallTaggedWriter):
                stream.end_call(request_id)


class CallTaggedWriter:
    """A text stream over another that marks each complete line written during a call
    with the call's request id. Every other attribute is the wrapped stream's."""

    def __init__(self, inner: TextIO, lock: threading.RLock | None = None) -> None:
        self.inner = inner
        # Shared by stdout's and stderr's writers: both go to one file, and a marked
        # line must reach it whole. Reentrant: a signal handler may print mid-write.
        self._lock = lock if lock is not None else threading.RLock()
        self._pending: dict[str, str] = {}

    def write(self, text: str) -> int:
        request_id = _CURRENT.get()
        if request_id is None:
            with self._lock:
                return self.inner.write(text)
        with self._lock:
            data = self._pending.pop(request_id, "") + text
            complete, newline, rest = data.rpartition("\n")
            if len(rest) > MAX_PENDING_CHARS:
                complete, newline, rest = data, "\n", ""
            if rest:
                self._pending[request_id] = rest
            if newline:
                prefix = f"{MARK}{request_id}{SEPARATOR}"
                self.inner.write("".join(f"{prefix}{line}\n"
                                         for line in complete.split("\n")))
                # Whole lines reach the file now: a block-buffered stdout would cut
                # one where its buffer fills, and the other stream could land inside.
                self.inner.flush()
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def end_call(self, request_id: str) -> None:
        """Write out what the call left without a newline, as its last line."""
        with self._lock:
            rest = self._pending.pop(request_id, "")
            if rest:
                self.inner.write(f"{MARK}{request_id}{SEPARATOR}{rest}\n")
                self.inner.flush()

    def flush(self) -> None:
        self.inner.flush()

    def after_fork(self, lock: threading.RLock) -> None:
        """In a forked child: a fresh lock (another thread may have held the parent's
        at the fork) and none of the parent's calls."""
        self._lock = lock
        self._pending = {}

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy or unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def install() -> None:
    """Wrap sys.stdout and sys.stderr (once; a forked child keeps its parent's). Done
    before the function's modules are imported, so a logging handler they make holds
    the wrapper rather than the stream under it."""
    if isinstance(sys.stdout, CallTaggedWriter) or sys.stdout is None or sys.stderr is None:
        return
    lock = threading.RLock()
    sys.stdout = CallTaggedWriter(sys.stdout, lock)
    sys.stderr = CallTaggedWriter(sys.stderr, lock)
    os.register_at_fork(after_in_child=_after_fork)


def _after_fork() -> None:
    lock = threading.RLock()
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, CallTaggedWriter):
            stream.after_fork(lock)

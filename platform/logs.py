"""Function logs on a node: what instances print, and what the agent did to them,
kept per function in a bounded ring buffer and served by the data plane
(GET /logs, dataplane.py).

Both runtimes send an instance's stdout and stderr into one file (so their order is
kept): the process runtime by inheriting the descriptors, templates' children by
dup2, containers through `>>log 2>&1`. One task follows those files here; their
lines carry stream "output". The agent's own records of an instance (started,
failed, stopped) carry stream "runtime".

A line the runtime marked as printed during a call (CALL_MARK, request id,
CALL_SEPARATOR, then the text) is kept with the mark stripped and the request id as
its `request` field, in the ring and in the node's per-call logs (platform/calllogs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from thaw.platform.calllogs import TRUNCATED_TEXT, CallLogRetention, CallLogs
from thaw.platform.sandbox.areas import open_tenant_file

# Lines kept per function on a node: the newest win. Bounded so a chatty function
# costs at most about LINES x MAX_LINE_BYTES of agent memory.
DEFAULT_MAX_LINES = 2000
# Longer lines are cut (a progress bar without newlines, a dumped tensor).
MAX_LINE_BYTES = 4096
# How often the instances' log files are read for new output.
POLL_SECONDS = 0.2
# Read at most this much of one file per poll: one flood does not stall the others.
READ_BYTES_PER_POLL = 256 * 1024
# Output of one build kept and shown: past it the build's lines are dropped (one line
# says so). Bounded so a build printing in a loop costs the node a known amount.
MAX_BUILD_LOG_BYTES = 1024 * 1024
# A followed log file on disk past this size is emptied once read (as logrotate's
# copytruncate): its writers append with O_APPEND, so they go on at its new start.
# docs/limits.md ("Logs and failure reasons") states both bounds.
MAX_LOG_FILE_BYTES = 16 * 1024 * 1024

# How often the per-call logs' retention is applied (besides on each add past a
# function's byte total).
CALL_LOGS_COLLECT_SECONDS = 60.0
# The runtime's mark ahead of a call's line (snapshotter/runtime/calllog.py MARK and
# SEPARATOR: keep them in sync), and the longest request id it carries.
CALL_MARK = "\x1fthaw-call:"
CALL_SEPARATOR = "\x1f"
MAX_REQUEST_ID_CHARS = 128

OUTPUT = "output"
RUNTIME = "runtime"


@dataclass(frozen=True)
class LogLine:
    seq: int
    """Increasing per node: a follower resumes after the last one it saw."""
    time: float
    function: str
    instance: str
    stream: str
    line: str
    request: str = ""
    """The request id of the call that printed it ("" outside calls)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Followed:
    function: str
    path: str
    offset: int = 0
    partial: bytes = b""
    budget: int | None = None
    """Bytes still kept of this file's output (None: no bound but the ring's)."""


@dataclass(frozen=True)
class _Read:
    data: bytes
    emptied: int = 0
    """The file was past MAX_LOG_FILE_BYTES and emptied: how many bytes were not read."""
    truncated: bool = False


@dataclass
class _Buffer:
    lines: deque[LogLine]
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class FunctionLogs:
    """Per-function ring buffers and the follower of instances' log files."""

    def __init__(self, max_lines: int = DEFAULT_MAX_LINES,
                 clock: Callable[[], float] = time.time,
                 retention: CallLogRetention | None = None) -> None:
        self.max_lines = max_lines
        self._clock = clock
        self.calls: CallLogs[LogLine] = CallLogs(
            retention if retention is not None else CallLogRetention.from_env())
        self._collected = clock()
        self._buffers: dict[str, _Buffer] = {}
        self._followed: dict[str, _Followed] = {}
        self._seq = 0
        self._closed = False

    def _buffer(self, function: str) -> _Buffer:
        buf = self._buffers.get(function)
        if buf is None:
            buf = self._buffers[function] = _Buffer(deque(maxlen=self.max_lines))
        return buf

    def append(self, function: str, instance: str, stream: str, text: str) -> None:
        buf = self._buffer(function)
        now = self._clock()
        for raw in text.splitlines() or [""]:
            self._seq += 1
            buf.lines.append(LogLine(self._seq, now, function, instance, stream,
                                     raw[:MAX_LINE_BYTES]))
        self._wake(buf)

    @staticmethod
    def _wake(buf: _Buffer) -> None:
        # Wake the followers, then arm the event again for the next lines.
        buf.changed.set()
        buf.changed = asyncio.Event()

    def _append_output(self, function: str, instance: str, text: str) -> None:
        """An instance's output: each line the runtime marked is filed under its call
        too, with the mark stripped."""
        buf = self._buffer(function)
        now = self._clock()
        for raw in text.splitlines() or [""]:
            request, raw = split_call_mark(raw)
            self._seq += 1
            line = LogLine(self._seq, now, function, instance, OUTPUT,
                           raw[:MAX_LINE_BYTES], request)
            buf.lines.append(line)
            if request:
                self.calls.add(function, request, line, line.line, now,
                               functools.partial(self._truncated, function, instance,
                                                 request, now))
        self._wake(buf)

    def _truncated(self, function: str, instance: str, request: str, now: float
                   ) -> LogLine:
        self._seq += 1
        line = LogLine(self._seq, now, function, instance, RUNTIME, TRUNCATED_TEXT, request)
        self._buffer(function).lines.append(line)
        return line

    def lines(self, function: str, since: float = 0.0, after_seq: int = 0,
              tail: int | None = None, request: str = "") -> list[LogLine]:
        """The kept lines of a function or, with `request`, of one of its calls (kept
        apart from the ring, so a busy function's ring does not push them out)."""
        if request:
            kept: Iterable[LogLine] = self.calls.lines(function, request)
        else:
            buf = self._buffers.get(function)
            if buf is None:
                return []
            kept = buf.lines
        found = [ln for ln in kept if ln.time >= since and ln.seq > after_seq]
        return found[-tail:] if tail is not None else found

    async def follow(self, function: str, since: float = 0.0, tail: int | None = None
                     ) -> AsyncIterator[LogLine]:
        """The kept lines (from `since`, the last `tail`), then each new one as it
        arrives; ends only when the caller stops iterating."""
        last = 0
        for ln in self.lines(function, since, tail=tail):
            last = ln.seq
            yield ln
        while not self._closed:
            changed = self._buffer(function).changed
            await changed.wait()
            for ln in self.lines(function, since, after_seq=last):
                last = ln.seq
                yield ln

    def close(self) -> None:
        """End every follower (the data plane is shutting down)."""
        self._closed = True
        for buf in self._buffers.values():
            buf.changed.set()

    # ---- instances' log files ------------------------------------------------------

    def watch(self, instance_id: str, function: str, path: str,
              max_bytes: int | None = None) -> None:
        """Follow an instance's (or a build's) log file from its current end (a new
        file: from 0), keeping at most `max_bytes` of what it writes."""
        try:
            offset = os.path.getsize(path)
        except OSError:
            offset = 0
        self._followed[instance_id] = _Followed(function, path, offset, budget=max_bytes)

    async def unwatch_in_thread(self, instance_id: str) -> None:
        """unwatch(), with the last read off the event loop."""
        followed = self._followed.pop(instance_id, None)
        if followed is not None:
            read = await asyncio.to_thread(_read_from, followed.path, followed.offset)
            self._take(instance_id, followed, read, final=True)

    def unwatch(self, instance_id: str) -> None:
        """Read what the instance wrote last, then stop following its file."""
        followed = self._followed.pop(instance_id, None)
        if followed is not None:
            self._read_new(instance_id, followed, final=True)

    def poll(self) -> None:
        for instance_id, followed in list(self._followed.items()):
            self._read_new(instance_id, followed, final=False)

    async def poll_in_thread(self) -> None:
        """poll(), with the files read off the event loop (the agent's loop also serves
        every invocation; a chatty instance's 256 KiB read does not belong there)."""
        todo = [(instance_id, followed, followed.offset)
                for instance_id, followed in self._followed.items()]
        if not todo:
            return
        reads = await asyncio.to_thread(
            lambda: [_read_from(f.path, offset) for _, f, offset in todo])
        for (instance_id, followed, offset), read in zip(todo, reads, strict=True):
            # Unwatched meanwhile (its last lines were read then) or already read on.
            if self._followed.get(instance_id) is followed and followed.offset == offset:
                self._take(instance_id, followed, read, final=False)

    def _read_new(self, instance_id: str, followed: _Followed, final: bool) -> None:
        self._take(instance_id, followed, _read_from(followed.path, followed.offset), final)

    def _take(self, instance_id: str, followed: _Followed, read: _Read, final: bool) -> None:
        data = read.data
        followed.offset = 0 if read.truncated else followed.offset + len(data)
        data = followed.partial + data
        complete, _, rest = data.rpartition(b"\n")
        if final and rest:
            complete, rest = data, b""
        elif not complete and len(rest) > MAX_LINE_BYTES:
            complete, rest = rest, b""  # a line with no end: keep it as it comes
        followed.partial = rest
        spent = False
        if complete and followed.budget is not None:
            if len(complete) > followed.budget:
                spent = followed.budget > 0
                complete = complete[:followed.budget]
            followed.budget -= len(complete)
        if complete:
            self._append_output(followed.function, instance_id,
                                complete.decode(errors="replace"))
        if spent:
            self.append(followed.function, instance_id, RUNTIME,
                        "output past this point is not kept (at most "
                        f"{MAX_BUILD_LOG_BYTES // 1024} KiB per build)")
        if read.truncated:
            followed.partial = b""
            self.append(followed.function, instance_id, RUNTIME,
                        f"log file passed {MAX_LOG_FILE_BYTES // (1024 * 1024)} MiB and was "
                        f"emptied ({read.emptied} bytes of output not read)")

    async def run(self, interval: float = POLL_SECONDS) -> None:
        """Read the followed files until cancelled."""
        while True:
            with contextlib.suppress(Exception):
                await self.poll_in_thread()
            now = self._clock()
            if now - self._collected >= CALL_LOGS_COLLECT_SECONDS:
                self._collected = now
                self.calls.collect(now)
            await asyncio.sleep(interval)


def strip_call_marks(text: str) -> str:
    """An instance's raw output as printed: each line's call mark taken out (for the
    tail of a log file quoted in a failure's reason)."""
    if CALL_MARK not in text:
        return text
    return "\n".join(split_call_mark(line)[1] for line in text.split("\n"))


def split_call_mark(raw: str) -> tuple[str, str]:
    """(request id, text) of a line of output; ("", the line) when it is unmarked or
    its mark is malformed (then it is kept whole, as printed)."""
    if not raw.startswith(CALL_MARK):
        return "", raw
    request, sep, text = raw[len(CALL_MARK):].partition(CALL_SEPARATOR)
    if not sep or not request or len(request) > MAX_REQUEST_ID_CHARS:
        return "", raw
    return request, text


def _read_from(path: str, offset: int) -> _Read:
    """What a log file holds past `offset` (at most READ_BYTES_PER_POLL); a file past
    MAX_LOG_FILE_BYTES is emptied after this read (blocking: call from a thread)."""
    try:
        # In the tenant's area: a link or FIFO planted there is never followed.
        with open(open_tenant_file(path), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(offset)
            data = handle.read(READ_BYTES_PER_POLL)
    except OSError:
        return _Read(b"")
    if size <= MAX_LOG_FILE_BYTES:
        return _Read(data)
    try:
        fd = open_tenant_file(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    except OSError:  # not ours to empty (a read-only area): read on
        return _Read(data)
    return _Read(data, emptied=max(0, size - offset - len(data)), truncated=True)

"""Bounded text for what a failure reports: the reason in a status event or an error
body, and the traceback printed into the instance's log.

A tenant's exception can carry anything (a 40 MiB bytes object as its message, a
recursion ten thousand frames deep). What reaches the agent, the caller and the log is
cut to a few KiB, so that no failure costs the node more than that to carry, parse or
show. Tracebacks are the standard library's, without local variables.
"""

from __future__ import annotations

import sys
import traceback
from typing import TextIO

# Characters of a failure's reason (`<ExcType>: <message>`), in status events and error
# bodies. The agent cuts what it reads to the same bound (thaw.platform.agent), and the
# docs state it (docs/limits.md): keep the three in sync.
MAX_REASON_CHARS = 2048
# Characters of one line of a printed traceback (its last line holds the message).
MAX_TRACEBACK_LINE_CHARS = 2048
# Characters of one printed traceback, chained exceptions included: its head and tail
# are kept (the innermost frames and the message are at the end).
MAX_TRACEBACK_CHARS = 32 * 1024


def cut(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and a note of how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} characters cut]"


def _message(exc: BaseException) -> str:
    """str(exc) without building a huge string first: a single long str or bytes
    argument is cut before it is turned into text."""
    args = exc.args
    if len(args) == 1 and type(exc).__str__ is BaseException.__str__:
        arg = args[0]
        if isinstance(arg, str) and len(arg) > MAX_REASON_CHARS:
            return cut(arg, MAX_REASON_CHARS)
        if isinstance(arg, (bytes, bytearray)) and len(arg) > MAX_REASON_CHARS:
            return (f"{bytes(arg[:MAX_REASON_CHARS])!r}... "
                    f"[{len(arg) - MAX_REASON_CHARS} bytes cut]")
    try:
        return str(exc)
    except Exception:  # a tenant's __str__ that raises
        return f"<unprintable {type(exc).__name__}>"


def describe_exception(exc: BaseException) -> str:
    """The `reason` form used in every failure: `<ExcType>: <message>`, at most
    MAX_REASON_CHARS characters (and the note of the cut)."""
    return cut(f"{type(exc).__name__}: {_message(exc)}", MAX_REASON_CHARS)


def format_exception(exc: BaseException) -> str:
    """The exception's traceback as the standard library prints it (no locals), each
    line and the whole bounded."""
    try:
        # The formatter turns each message into text whole (the tenant's process pays
        # for that); only what it prints is bounded.
        chunks = traceback.TracebackException.from_exception(
            exc, capture_locals=False).format()
        lines = [cut(line.rstrip("\n"), MAX_TRACEBACK_LINE_CHARS)
                 for chunk in chunks for line in chunk.splitlines()]
    except Exception:  # formatting itself failed: say what we can
        lines = [describe_exception(exc)]
    text = "\n".join(lines)
    if len(text) > MAX_TRACEBACK_CHARS:
        half = MAX_TRACEBACK_CHARS // 2
        text = (f"{text[:half]}\n... [{len(text) - 2 * half} characters of the "
                f"traceback cut]\n{text[-half:]}")
    return text + "\n"


def print_exception(exc: BaseException | None = None, file: TextIO | None = None) -> None:
    """traceback.print_exc(), bounded: the exception being handled (or `exc`) goes to
    stderr (the instance's log)."""
    exc = exc if exc is not None else sys.exc_info()[1]
    if exc is None:
        return
    out = file if file is not None else sys.stderr
    out.write(format_exception(exc))
    out.flush()

"""structlog set-up shared by every service: console lines, or JSON with THAW_LOG_JSON.

Every record is bounded before it is rendered: tracebacks are the standard library's
plain ones, never with local variables (a frame's locals can hold a whole bundle, and
rendering them once stalled an agent for minutes), cut per line and in all; a long
string or bytes value is cut too. A log line costs at most a few tens of KiB, whatever
the code logs.
"""

from __future__ import annotations

import logging
import reprlib
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from google.protobuf.message import Message

# Characters of one logged value (a failure's reason, a tenant's message).
MAX_VALUE_CHARS = 4096
# Characters of a failure's reason as the agent and the scheduler pass it on (a failed
# build or start, shown to the tenant). The in-instance runtime cuts what it sends to
# the same bound (snapshotter/runtime/bounded.py), docs/limits.md states it.
MAX_REASON_CHARS = 2048
# Characters of one line of a logged traceback, and of the whole traceback (its head
# and tail are kept: the innermost frames and the message are at the end).
MAX_TRACEBACK_LINE_CHARS = 1024
MAX_TRACEBACK_CHARS = 16 * 1024
# Keys whose values are already bounded here or are the renderer's own.
_OWN_KEYS = frozenset({"exception", "exc_info", "_record", "_from_structlog"})
_PLAIN = (int, float, bool, type(None))

_short_repr = reprlib.Repr()
_short_repr.maxstring = 256
_short_repr.maxother = 256
_short_repr.maxlevel = 3


def cut(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and a note of how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} characters cut]"


def bound_reason(reason: object) -> str:
    """A failure's reason as a service passes it on: at most MAX_REASON_CHARS
    characters (and the note of the cut), whatever the instance or exception said."""
    return cut(str(reason), MAX_REASON_CHARS)


def format_exception(exc: BaseException) -> str:
    """The exception's plain traceback (no locals), each line and the whole bounded."""
    try:
        chunks = traceback.TracebackException.from_exception(
            exc, capture_locals=False).format()
        lines = [cut(line, MAX_TRACEBACK_LINE_CHARS)
                 for chunk in chunks for line in chunk.rstrip("\n").split("\n")]
    except Exception:  # formatting itself failed (a __str__ that raises, ...)
        lines = [f"{type(exc).__name__}: <the traceback could not be formatted>"]
    text = "\n".join(lines)
    if len(text) > MAX_TRACEBACK_CHARS:
        half = MAX_TRACEBACK_CHARS // 2
        text = (f"{text[:half]}\n... [{len(text) - 2 * half} characters of the "
                f"traceback cut]\n{text[-half:]}")
    return text


def _exception_of(exc_info: Any) -> BaseException | None:
    """What `exc_info=` holds, as structlog and logging accept it."""
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1] if len(exc_info) == 3 else None
    if exc_info:
        return sys.exc_info()[1]
    return None


def bounded_exception(logger: Any, method: str,
                      event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A processor in place of structlog's format_exc_info: `exc_info` becomes the
    bounded plain traceback under "exception"."""
    exc_info = event_dict.pop("exc_info", None)
    exc = _exception_of(exc_info)
    if exc is not None:
        event_dict["exception"] = format_exception(exc)
    return event_dict


def _small(value: Any, budget: int) -> int:
    """What remains of `budget` after a rough size of `value` (negative: too big).
    Stops walking as soon as the budget is spent."""
    if isinstance(value, (str, bytes, bytearray)):
        return budget - len(value)
    if isinstance(value, Mapping):
        for key, item in value.items():
            budget = _small(item, _small(key, budget - 2))
            if budget < 0:
                break
        return budget
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            budget = _small(item, budget - 2)
            if budget < 0:
                break
        return budget
    return budget - 8


def bound_value(value: Any) -> Any:
    """`value`, or a bounded text in its place: long strings are cut, bytes and large
    containers shown by a short repr, exceptions by their bounded message."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, str):
        return cut(value, MAX_VALUE_CHARS)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value if len(value) <= 64 else f"<{len(value)} bytes>"
    if isinstance(value, BaseException):
        try:
            return cut(f"{type(value).__name__}: {value}", MAX_VALUE_CHARS)
        except Exception:  # a __str__ that raises
            return f"<unprintable {type(value).__name__}>"
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return value if _small(value, MAX_VALUE_CHARS) >= 0 else _short_repr.repr(value)
    if isinstance(value, Message):
        # A message's repr is its text format: seconds for one holding a bundle.
        size = value.ByteSize()
        return value if size <= MAX_VALUE_CHARS // 4 else f"<{type(value).__name__}: {size} bytes>"
    return value


def bounded_values(logger: Any, method: str,
                   event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A processor cutting every value of a record to a few KiB (bound_value)."""
    for key, value in event_dict.items():
        if key not in _OWN_KEYS and not isinstance(value, _PLAIN):
            event_dict[key] = bound_value(value)
    return event_dict


def configure_logging(component: str, level: str = "info", as_json: bool = False) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json
        # bounded_exception leaves no exc_info for the console's own formatter; the
        # plain one is named anyway: the default (rich) shows every frame's locals.
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback))
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    # Records of the standard library's loggers (aiohttp, grpc, asyncio) go out in the
    # same format, with the same context (component, request_id), not as bare text.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    bounded_exception, bounded_values, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[*shared, bounded_exception, bounded_values, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        # Module-level loggers are lazy proxies; without caching each log call on the
        # invocation path re-binds one (a measurable share of a warm call).
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)

"""A call's trace context inside the instance, so that a handler's own OpenTelemetry
spans join the platform's trace (docs/tracing.md).

The node sends each call with a W3C `traceparent` header (its parent: the gateway's
`run` span). When the function's environment has `opentelemetry-api`, the first traced
call sets a small recording TracerProvider as the global one (unless the function set
its own), and each call runs with the caller's context attached: a handler's
`trace.get_tracer(...).start_as_current_span(...)` is then a child of the call. The
spans that end during the call go back with the answer, in one header of compact JSON
(SPANS_HEADER), which the gateway adds to the trace and exports with the rest.

Without opentelemetry in the environment nothing happens (one failed import, once).
Only the stdlib is imported here; opentelemetry lazily, from the function's own
environment. A function that installed its own provider keeps it: its spans still
join the trace (the context is attached) and go where its provider sends them.
Spans of a streamed or file answer, and of batched handlers (their calls run on the
batcher's thread), are not sent back: the head of such an answer leaves before they end.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import random
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
SPANS_HEADER = "X-Thaw-Spans"
# Bounds on what one answer carries back: a handler that opens spans in a loop sends
# its first ones.
MAX_SPANS = 64
MAX_SPANS_BYTES = 16 * 1024
MAX_ATTRIBUTES = 32

_COLLECTOR: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "thaw_call_spans", default=None)
_setup: Any = None
# Calls run in threads: the first traced ones may race to install the provider.
_SETUP_LOCK = threading.Lock()
"""None: not tried yet; False: no opentelemetry here; else the trace API module."""


def _parse(value: str) -> tuple[int, int, int] | None:
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, flags


def _api() -> Any:
    """opentelemetry.trace with the recording provider installed, or False."""
    global _setup
    if _setup is not None:
        return _setup
    with _SETUP_LOCK:
        if _setup is None:
            try:
                from opentelemetry import trace as otel_trace
            except ImportError:
                _setup = False
                return _setup
            provider = otel_trace.get_tracer_provider()
            if isinstance(provider, otel_trace.ProxyTracerProvider):
                otel_trace.set_tracer_provider(_recording_provider(otel_trace))
            _setup = otel_trace
    return _setup


@contextlib.contextmanager
def call_context(headers: Mapping[str, str]) -> Iterator[list[dict[str, Any]] | None]:
    """Run a call inside the trace its headers name; yields the list its finished spans
    are collected in (None: the call is not traced here)."""
    value = headers.get(TRACEPARENT) if _setup is not False else None
    parsed = _parse(value) if value else None
    otel: Any = _api() if parsed is not None else False
    if not otel or parsed is None:
        yield None
        return
    from opentelemetry import context as otel_context

    trace_id, span_id, flags = parsed
    state = otel.TraceState.from_header([headers[TRACESTATE]]) if TRACESTATE in headers \
        else None
    parent = otel.NonRecordingSpan(otel.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=otel.TraceFlags(flags),
        trace_state=state))
    collected: list[dict[str, Any]] = []
    token = otel_context.attach(otel.set_span_in_context(parent))
    mine = _COLLECTOR.set(collected)
    try:
        yield collected
    finally:
        _COLLECTOR.reset(mine)
        otel_context.detach(token)


def spans_header(collected: list[dict[str, Any]] | None) -> str:
    """The head line carrying `collected` back ("" for none)."""
    if not collected:
        return ""
    kept = collected[:MAX_SPANS]
    text = json.dumps(kept, separators=(",", ":"), default=str)
    while len(text) > MAX_SPANS_BYTES and kept:
        kept = kept[:len(kept) // 2]
        text = json.dumps(kept, separators=(",", ":"), default=str)
    return f"{SPANS_HEADER}: {text}\r\n" if kept else ""


def _recording_provider(otel: Any) -> Any:
    """A TracerProvider whose spans are collected for the answer of the call they
    began in (spans begun outside a call are not kept)."""
    rng = random.Random()

    class _Span(otel.Span):  # type: ignore[misc]
        def __init__(self, name: str, context: Any, parent_id: int,
                     attributes: Mapping[str, Any] | None, start_time: int | None) -> None:
            self._name = name
            self._context = context
            self._parent = parent_id
            self._attributes: dict[str, Any] = dict(attributes or {})
            self._start = start_time or time.time_ns()
            self._error = ""
            self._ended = False
            self._collected = _COLLECTOR.get()

        def get_span_context(self) -> Any:
            return self._context

        def is_recording(self) -> bool:
            return not self._ended

        def set_attribute(self, key: str, value: Any) -> None:
            if len(self._attributes) < MAX_ATTRIBUTES or key in self._attributes:
                self._attributes[key] = value

        def set_attributes(self, attributes: Mapping[str, Any]) -> None:
            for key, value in attributes.items():
                self.set_attribute(key, value)

        def add_event(self, name: str, attributes: Any = None,
                      timestamp: int | None = None) -> None:
            pass  # events are not carried back

        def add_link(self, context: Any, attributes: Any = None) -> None:
            pass

        def update_name(self, name: str) -> None:
            self._name = name

        def set_status(self, status: Any, description: str | None = None) -> None:
            code = getattr(status, "status_code", status)
            if getattr(code, "name", "") == "ERROR":
                self._error = description or getattr(status, "description", "") or "error"

        def record_exception(self, exception: BaseException, attributes: Any = None,
                             timestamp: int | None = None, escaped: bool = False) -> None:
            self._error = f"{type(exception).__name__}: {exception}"[:500]

        def end(self, end_time: int | None = None) -> None:
            if self._ended:
                return
            self._ended = True
            if self._collected is None or len(self._collected) >= MAX_SPANS:
                return
            self._collected.append({
                "n": self._name, "s": f"{self._context.span_id:016x}",
                "p": f"{self._parent:016x}" if self._parent else None,
                "b": self._start, "e": end_time or time.time_ns(),
                "a": {k: v for k, v in self._attributes.items()
                      if isinstance(v, (str, int, float, bool))},
                "x": self._error or None})

    class _Tracer(otel.Tracer):  # type: ignore[misc]
        def start_span(self, name: str, context: Any = None, kind: Any = None,
                       attributes: Any = None, links: Any = None,
                       start_time: int | None = None, record_exception: bool = True,
                       set_status_on_exception: bool = True) -> Any:
            parent = otel.get_current_span(context).get_span_context()
            if not parent.is_valid:
                return otel.INVALID_SPAN  # outside any call: nothing to join
            context_ = otel.SpanContext(parent.trace_id, rng.getrandbits(64) or 1,
                                        is_remote=False, trace_flags=parent.trace_flags,
                                        trace_state=parent.trace_state)
            return _Span(name, context_, parent.span_id, attributes, start_time)

        @contextlib.contextmanager
        def start_as_current_span(self, name: str, context: Any = None, kind: Any = None,
                                  attributes: Any = None, links: Any = None,
                                  start_time: int | None = None,
                                  record_exception: bool = True,
                                  set_status_on_exception: bool = True,
                                  end_on_exit: bool = True) -> Iterator[Any]:
            span = self.start_span(name, context, kind, attributes, links, start_time)
            with otel.use_span(span, end_on_exit=end_on_exit,
                               record_exception=record_exception,
                               set_status_on_exception=set_status_on_exception) as current:
                yield current

    class _Provider(otel.TracerProvider):  # type: ignore[misc]
        def get_tracer(self, instrumenting_module_name: str, *args: Any,
                       **kwargs: Any) -> Any:
            return _Tracer()

    return _Provider()

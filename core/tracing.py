"""Traces of invocations: the W3C trace context (`traceparent`, `tracestate`), the spans
of one call as small records, the gateway's ring of recent traces, and their export
over OTLP (the OpenTelemetry SDK) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. docs/tracing.md.

A call's spans are made from the measurements the platform takes anyway (the
Server-Timing stages the scheduler and the agent return with a lease, the gateway's
own clock, the instance's spans sent back with its answer): nothing is timed twice, and
the invocation path only appends one record to a deque. SDK span objects are built
off the event loop, in the exporter's thread, and only when OTLP export is on.
"""

from __future__ import annotations

import collections
import contextvars
import os
import queue
import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = structlog.get_logger()

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# W3C trace context, level 1: version-traceid-parentid-flags, lower-case hex.
_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})"
                             r"(-.*)?$")
_INVALID_TRACE_ID = "0" * 32
_INVALID_SPAN_ID = "0" * 16
# tracestate: at most 32 list members (the spec's bound), passed on unchanged.
TRACESTATE_MAX_BYTES = 512
SAMPLED = 0x01

Attribute = str | int | float | bool


@dataclass(frozen=True, slots=True)
class TraceParent:
    """One hop's trace context: the trace, the span that is the parent of the next
    hop's spans, the flags, and the vendors' `tracestate` passed on untouched."""

    trace_id: str
    span_id: str
    flags: int = SAMPLED
    state: str = ""

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def child(self, span_id: str) -> TraceParent:
        """The same trace with `span_id` as the parent of the next hop."""
        return TraceParent(self.trace_id, span_id, self.flags, self.state)

    def headers(self) -> dict[str, str]:
        out = {TRACEPARENT: self.header()}
        if self.state:
            out[TRACESTATE] = self.state
        return out


def parse_traceparent(value: str | None, state: str | None = None) -> TraceParent | None:
    """A `traceparent` header as W3C trace context reads it; None for a missing or
    invalid one (the receiver then starts a new trace, as the spec says)."""
    if not value:
        return None
    match = _TRACEPARENT_RE.match(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _INVALID_TRACE_ID or span_id == _INVALID_SPAN_ID:
        return None
    kept = (state or "").strip()
    if len(kept) > TRACESTATE_MAX_BYTES:
        kept = ""  # the spec lets a receiver drop a tracestate it cannot keep whole
    return TraceParent(trace_id, span_id, int(flags, 16), kept)


# The trace context a component is serving a call in (gRPC metadata taken by
# core/grpctrace.py); the calls it makes meanwhile carry it on.
REMOTE: contextvars.ContextVar[TraceParent | None] = contextvars.ContextVar(
    "thaw_remote_trace", default=None)

# Trace and span ids need to be unique, not secret: the fast generator (seeded from
# os.urandom), not a system call per id.
_random = random.Random()


def new_trace_id() -> str:
    return f"{_random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{_random.getrandbits(64) or 1:016x}"


@dataclass(slots=True)
class SpanRecord:
    """One finished span: times in Unix nanoseconds, ids in hex. `component` is the
    part of the platform that did the work (gateway, scheduler, agent, instance)."""

    name: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    component: str = "gateway"
    attributes: dict[str, Attribute] = field(default_factory=dict)
    error: str = ""
    kind: str = "internal"
    """internal | server | client, as OpenTelemetry's SpanKind."""

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "span_id": self.span_id,
                "parent_id": self.parent_id or None, "start_ns": self.start_ns,
                "end_ns": self.end_ns, "duration_ms": (self.end_ns - self.start_ns) / 1e6,
                "component": self.component, "kind": self.kind,
                "attributes": self.attributes, "error": self.error or None}


# Builds the records of pending spans: a trace may be read on the event loop and
# exported on the exporter's thread at once, and its span ids are made when it is built.
_BUILD_LOCK = threading.Lock()


@dataclass(slots=True)
class Trace:
    """The spans of one trace the gateway took part in, with whose it is. A call adds
    its spans as `pending` builders, run when the trace is first read or exported:
    the invocation path only stores its measurements."""

    trace_id: str
    tenant: str
    function: str
    remote_parent: str
    """The caller's span id ("" when the trace began here)."""
    spans: list[SpanRecord] = field(default_factory=list)
    pending: list[Callable[[], list[SpanRecord]]] = field(default_factory=list)

    def records(self) -> list[SpanRecord]:
        """Every span, the pending ones built first (at most MAX_SPANS_PER_TRACE)."""
        if self.pending:
            with _BUILD_LOCK:
                while self.pending:
                    self.spans.extend(self.pending.pop(0)())
                del self.spans[MAX_SPANS_PER_TRACE:]
        return self.spans

    @property
    def start_ns(self) -> int:
        return min((s.start_ns for s in self.records()), default=0)

    @property
    def end_ns(self) -> int:
        return max((s.end_ns for s in self.records()), default=0)

    def summary(self) -> dict[str, Any]:
        spans = self.records()
        root = next((s for s in spans if s.parent_id == self.remote_parent), None)
        return {"trace_id": self.trace_id, "function": self.function,
                "start_ns": self.start_ns,
                "duration_ms": (self.end_ns - self.start_ns) / 1e6,
                "spans": len(spans),
                "start": (root.attributes.get("thaw.start") if root else None),
                "error": next((s.error for s in spans if s.error), None)}

    def as_json(self) -> dict[str, Any]:
        return {**self.summary(), "tenant": self.tenant,
                "parent_span_id": self.remote_parent or None,
                "spans": [s.as_json() for s in sorted(self.records(),
                                                       key=lambda s: s.start_ns)]}


# A trace's spans past this many are dropped (a handler that opens spans in a loop).
MAX_SPANS_PER_TRACE = 256
DEFAULT_TRACES_KEPT = 1000


class TraceRing:
    """The last `capacity` traces, newest last: bounded memory (capacity times
    MAX_SPANS_PER_TRACE spans at most). Only the event loop touches it."""

    def __init__(self, capacity: int = DEFAULT_TRACES_KEPT) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._traces: collections.OrderedDict[str, Trace] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, trace: Trace) -> None:
        if self.capacity == 0:
            return
        kept = self._traces.get(trace.trace_id)
        if kept is None:
            self._traces[trace.trace_id] = trace
            del trace.spans[MAX_SPANS_PER_TRACE:]
            while len(self._traces) > self.capacity:
                self._traces.popitem(last=False)
            return
        # A caller's trace may hold several calls: one entry, their spans together
        # (a call adds at least one span: past the bound, calls are left out).
        if len(kept.spans) + len(kept.pending) < MAX_SPANS_PER_TRACE:
            kept.spans.extend(trace.spans)
            del kept.spans[MAX_SPANS_PER_TRACE:]
            kept.pending.extend(trace.pending)
        self._traces.move_to_end(trace.trace_id)

    def get(self, trace_id: str) -> Trace | None:
        return self._traces.get(trace_id)

    def recent(self, tenant: str | None = None, function: str | None = None,
               limit: int = 50) -> list[Trace]:
        """Newest first; `tenant` None: every tenant's."""
        out: list[Trace] = []
        for trace in reversed(self._traces.values()):
            if tenant is not None and trace.tenant != tenant:
                continue
            if function is not None and trace.function != function:
                continue
            out.append(trace)
            if len(out) >= limit:
                break
        return out


def otlp_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the standard OpenTelemetry variables ask for OTLP export of traces."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() in ("none", ""):
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


# Traces waiting for the exporter's thread past this many are dropped (a collector that
# is down must never grow the gateway's memory or slow a call).
EXPORT_QUEUE_MAX = 4096


class OtlpExport:
    """Hands finished traces to the OpenTelemetry SDK off the event loop: a thread turns
    each record into an SDK span and gives it to a BatchSpanProcessor, which batches
    and exports (`OTLPSpanExporter` reads the standard OTEL_EXPORTER_OTLP_* variables;
    tests pass their own exporter)."""

    def __init__(self, exporter: SpanExporter, schedule_delay_millis: float | None = None
                 ) -> None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.processor = BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_millis)
        self._queue: queue.SimpleQueue[Trace | threading.Event | None] = queue.SimpleQueue()
        self._pending = 0
        self.dropped = 0
        self._resources: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="thaw-otlp-export",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> OtlpExport | None:
        if not otlp_configured():
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls(OTLPSpanExporter())

    def submit(self, trace: Trace) -> None:
        """Never blocks: a trace past EXPORT_QUEUE_MAX waiting is dropped and counted."""
        # A soft bound: the count is kept without a lock across the two threads.
        if self._pending >= EXPORT_QUEUE_MAX:
            self.dropped += 1
            return
        self._pending += 1
        self._queue.put(trace)

    def _run(self) -> None:
        while True:
            trace = self._queue.get()
            if trace is None:
                return
            if isinstance(trace, threading.Event):
                trace.set()
                continue
            self._pending -= 1
            try:
                for span in self.sdk_spans(trace):
                    self.processor.on_end(span)
            except Exception:  # a bad record must not stop the exporter
                log.exception("trace export failed", trace_id=trace.trace_id)

    def sdk_spans(self, trace: Trace) -> list[Any]:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        kinds = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT,
                 "internal": SpanKind.INTERNAL}
        trace_id = int(trace.trace_id, 16)
        flags = TraceFlags(TraceFlags.SAMPLED)
        scope = InstrumentationScope("thaw")
        out = []
        for s in trace.records():
            parent = (SpanContext(trace_id, int(s.parent_id, 16), is_remote=False,
                                  trace_flags=flags) if s.parent_id else None)
            status = (Status(StatusCode.ERROR, s.error) if s.error
                      else Status(StatusCode.UNSET))
            out.append(ReadableSpan(
                s.name, SpanContext(trace_id, int(s.span_id, 16), is_remote=False,
                                    trace_flags=flags),
                parent=parent, resource=self._resource(s.component),
                attributes=s.attributes, kind=kinds.get(s.kind, SpanKind.INTERNAL),
                status=status, start_time=s.start_ns, end_time=s.end_ns,
                instrumentation_scope=scope))
        return out

    def _resource(self, component: str) -> Any:
        resource = self._resources.get(component)
        if resource is None:
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource

            # OTEL_RESOURCE_ATTRIBUTES is merged in; each component is a service.
            base = os.environ.get("OTEL_SERVICE_NAME", "thaw")
            resource = Resource.create({SERVICE_NAME: f"{base}-{component}"})
            self._resources[component] = resource
        return resource

    def flush(self, timeout_millis: int = 10_000) -> bool:
        """Wait until every trace submitted so far is exported (tests, shutdown)."""
        reached = threading.Event()
        self._queue.put(reached)
        if not reached.wait(timeout_millis / 1000):
            return False
        return bool(self.processor.force_flush(timeout_millis))

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(5.0)
        self.processor.shutdown()  # type: ignore[no-untyped-call]


class TraceSink:
    """Where the gateway's finished traces go: the ring (always; GET /v1/traces and the
    dashboard read it) and OTLP export when configured."""

    def __init__(self, ring: TraceRing | None = None, export: OtlpExport | None = None
                 ) -> None:
        self.ring = ring if ring is not None else TraceRing()
        self.export = export

    def record(self, trace: Trace) -> None:
        self.ring.add(trace)
        if self.export is not None:
            self.export.submit(trace)


def instance_spans(payload: str, parent_id: str) -> list[SpanRecord]:
    """The spans an instance sent back with its answer (snapshotter/runtime/trace.py's
    compact JSON), as records; anything malformed is left out, never raised: the
    handler wrote them."""
    import json

    try:
        items = json.loads(payload)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    out: list[SpanRecord] = []
    for item in items[:MAX_SPANS_PER_TRACE]:
        try:
            attrs = item.get("a") or {}
            out.append(SpanRecord(
                name=str(item["n"])[:200], span_id=_hex(item["s"], 16),
                parent_id=_hex(item.get("p") or parent_id, 16),
                start_ns=int(item["b"]), end_ns=int(item["e"]), component="instance",
                attributes={str(k)[:100]: v for k, v in attrs.items()
                            if isinstance(v, (str, int, float, bool))},
                error=str(item.get("x") or "")[:500]))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return out


def _hex(value: object, width: int) -> str:
    text = str(value)
    if len(text) != width or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"not {width} hex digits")
    return text


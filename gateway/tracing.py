"""One call's trace at the gateway: the caller's `traceparent` read (or a new trace
begun) at the edge, the context handed to each hop (gRPC metadata to the scheduler,
headers to the node's data plane and on to the instance), and the call's spans made
when its exchange settles, from the measurements the gateway already has (its clock,
the stages a lease brings back, the spans the instance returns with its answer).
docs/tracing.md.

The call's context lives in a ContextVar: the route sets it, and the tasks the route
starts (the dispatch of the call) inherit it, so no signature on the invocation path
changes. The finished trace goes to the process's TraceSink (the ring that
GET /v1/traces reads, and OTLP export when configured).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

from aiohttp import web

from thaw.core.errors import ThawError
from thaw.core.tracing import (
    DEFAULT_TRACES_KEPT,
    TRACEPARENT,
    TRACESTATE,
    Attribute,
    OtlpExport,
    SpanRecord,
    Trace,
    TraceParent,
    TraceRing,
    TraceSink,
    instance_spans,
    new_span_id,
    new_trace_id,
    parse_traceparent,
)
from thaw.gateway.errors import status_of


class Exchange(Protocol):
    """What the spans are made from: gateway/dispatch.py's Exchange (named here by its
    shape, so that dispatch may import this module)."""

    call: Any
    lease: Any
    upstream: Any
    start: str
    stages: list[tuple[str, float]]
    started: float
    sent: float
    opened: float
    run_span: str

    @property
    def status(self) -> int: ...


# The instance's spans ride its answer in this header (snapshotter/runtime/trace.py
# names the same); the gateway's relay never passes X-Thaw-* headers on.
SPANS_HEADER = "X-Thaw-Spans"
# A cold start's stages by the component that measured them (the rest are the agent's).
SCHEDULER_STAGES = frozenset(("queue", "placement"))


class CallTrace:
    """The trace context of one call through the gateway, and its spans' ids."""

    __slots__ = ("trace_id", "root_id", "flags", "state", "remote_parent", "begun_ns",
                 "begun", "tenant", "name", "finished")

    def __init__(self, parent: TraceParent | None) -> None:
        if parent is None:
            self.trace_id, self.flags, self.state, self.remote_parent = (
                new_trace_id(), 1, "", "")
        else:
            self.trace_id, self.flags, self.state, self.remote_parent = (
                parent.trace_id, parent.flags, parent.state, parent.span_id)
        self.root_id = new_span_id()
        self.begun_ns = time.time_ns()
        self.begun = time.perf_counter()
        self.tenant = ""
        self.name = ""
        self.finished = False

    def traceparent(self, span_id: str | None = None) -> str:
        """The header naming this call's root span (or `span_id`) as the parent."""
        return f"00-{self.trace_id}-{span_id or self.root_id}-{self.flags:02x}"

    def hop(self, span_id: str) -> dict[str, str]:
        """Headers (or gRPC metadata) for the next hop, under `span_id`."""
        out = {TRACEPARENT: self.traceparent(span_id)}
        if self.state:
            out[TRACESTATE] = self.state
        return out

    def wall_ns(self, perf: float) -> int:
        """A perf_counter reading as Unix nanoseconds (the gateway's two clocks are
        tied once, when the call began)."""
        return self.begun_ns + int((perf - self.begun) * 1e9)

    def admitted(self, tenant: str, name: str) -> None:
        """The caller may call tenant/name: from here the trace is kept."""
        self.tenant, self.name = tenant, name


CURRENT: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar(
    "thaw_call_trace", default=None)
# The call's trace on its request, for the answer's header when the route raised (the
# middleware answers the error) and for work the route's task does not run (MCP's).
TRACE_KEY = web.RequestKey("trace", CallTrace)
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]

_sink: TraceSink | None = None
# The gateway's settings (core/config_fields.py: tracing, traces_kept), given by
# make_app; a process that made no app (a unit test) traces with the defaults.
_enabled = True
_kept = DEFAULT_TRACES_KEPT


def configure(on: bool, kept: int) -> None:
    """Apply the gateway's tracing settings: tracing on or off, and how many traces
    the ring keeps (a ring of another size is made anew; the same size is kept, so
    apps made in one process share their traces)."""
    global _sink, _enabled, _kept
    _enabled, _kept = on, kept
    if _sink is not None and _sink.ring.capacity != kept:
        _sink = None


def enabled() -> bool:
    return _enabled


def sink() -> TraceSink:
    """The process's sink: a ring of the last `traces_kept` traces, and OTLP export
    when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    global _sink
    if _sink is None:
        _sink = TraceSink(TraceRing(_kept), OtlpExport.from_env())
    return _sink


def set_sink(new: TraceSink | None, tracing_on: bool = True) -> None:
    """Replace the process's sink (tests; None: a new one from the settings)."""
    global _sink, _enabled
    _sink = new
    _enabled = tracing_on


def begin(headers: Mapping[str, str]) -> CallTrace | None:
    """The call's trace: the caller's when its traceparent is valid, else a new one
    (the route sets it as CURRENT). None when tracing is off."""
    if not enabled():
        return None
    return CallTrace(parse_traceparent(headers.get(TRACEPARENT), headers.get(TRACESTATE)))


def admitted(tenant: str, name: str) -> None:
    """The current call's caller may call tenant/name: its trace is kept from here
    (an unauthenticated call leaves no trace in a tenant's list)."""
    trace = CURRENT.get()
    if trace is not None:
        trace.admitted(tenant, name)


def hop_headers(headers: dict[str, str]) -> str:
    """Add the trace context of a request to a node to `headers`; the new span's id
    (the data plane's call: its `run` span, parent of the instance's spans), or ""."""
    trace = CURRENT.get()
    if trace is None:
        return ""
    span_id = new_span_id()
    headers.update(trace.hop(span_id))
    return span_id


def grpc_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current call's context as gRPC metadata for the scheduler (its Acquire and
    the cold start it makes), under the call's root span; None without one."""
    trace = CURRENT.get()
    if trace is None:
        return None
    return tuple(trace.hop(trace.root_id).items())


class Settled:
    """The measurements of a settled exchange, copied (the exchange and its answer are
    not kept): its spans are made from them when the trace is first read or exported,
    once (the ring and the exporter share them)."""

    __slots__ = ("trace", "function", "request_id", "version", "instance", "node", "start",
                 "stages", "status", "started", "sent", "opened", "settled", "run_span",
                 "carried", "how", "_spans")

    def __init__(self, trace: CallTrace, ex: Exchange, settled: float, how: str) -> None:
        self.trace = trace
        self.function: str = ex.call.function
        self.request_id: str = ex.call.request_id
        self.version = int(ex.lease.version)
        self.instance: str = ex.lease.instance_id
        self.node: str = ex.lease.node_id
        self.start = ex.start
        self.stages = ex.stages
        self.status = ex.status
        self.started, self.sent, self.opened, self.settled = (
            ex.started, ex.sent, ex.opened, settled)
        self.run_span = ex.run_span
        self.carried: str = ex.upstream.headers.get(SPANS_HEADER) or ""
        self.how = how
        self._spans: list[SpanRecord] | None = None

    def spans(self) -> list[SpanRecord]:
        if self._spans is None:
            self._spans = exchange_spans(self)
        return self._spans


def exchange_spans(ex: Settled) -> list[SpanRecord]:
    """The spans of a settled exchange, from its measurements: admission (arrival to
    dispatch), acquire (dispatch to the request's send: the queue, placement and the
    start's stages the lease carries, laid end to end in the order they ran; placement
    is the part of the wait no reported stage covers), run (the request to the answer's
    head) with the instance's own spans under it, relay (the answer to the client)."""
    trace = ex.trace
    attrs: dict[str, Attribute] = {
        "thaw.function": ex.function, "thaw.version": ex.version,
        "thaw.instance": ex.instance, "thaw.start": ex.start, "thaw.node": ex.node}
    wall = trace.wall_ns
    root = trace.root_id
    status = ex.status
    error = "" if status < 500 else f"status {status}"
    spans = [
        SpanRecord(f"invoke {ex.function}", root, trace.remote_parent,
                   trace.begun_ns, wall(ex.settled), "gateway",
                   {**attrs, "http.response.status_code": status,
                    "thaw.request_id": ex.request_id, "thaw.outcome": ex.how},
                   error, "server"),
        SpanRecord("admission", new_span_id(), root, trace.begun_ns, wall(ex.started),
                   "gateway", attrs),
    ]
    acquire_id = new_span_id()
    spans.append(SpanRecord("acquire", acquire_id, root, wall(ex.started), wall(ex.sent),
                            "gateway", attrs, kind="client"))
    scheduled = [(s, d) for s, d in ex.stages if s in SCHEDULER_STAGES]
    started = [(s, d) for s, d in ex.stages if s not in SCHEDULER_STAGES]
    at = ex.started
    component = "gateway" if ex.start == "warm" else "scheduler"
    for stage, seconds in scheduled:
        spans.append(SpanRecord(stage, new_span_id(), acquire_id, wall(at),
                                wall(at + seconds), component, attrs))
        at += seconds
    if started:  # a cold start: placement, then the agent's start and its stages
        reported = sum(seconds for _, seconds in ex.stages)
        placement = max(ex.sent - ex.started - reported, 0.0)
        spans.append(SpanRecord("placement", new_span_id(), acquire_id, wall(at),
                                wall(at + placement), "scheduler",
                                {**attrs, "thaw.measured": "unreported remainder"}))
        at += placement
        start_id = new_span_id()
        total = sum(seconds for _, seconds in started)
        spans.append(SpanRecord(f"start {ex.start}", start_id, acquire_id, wall(at),
                                wall(at + total), "agent", attrs, kind="server"))
        for stage, seconds in started:
            spans.append(SpanRecord(stage, new_span_id(), start_id, wall(at),
                                    wall(at + seconds), "agent", attrs))
            at += seconds
    run_id = ex.run_span or new_span_id()
    spans.append(SpanRecord("run", run_id, root, wall(ex.sent), wall(ex.opened), "gateway",
                            attrs, error, "client"))
    if ex.carried:
        spans.extend(instance_spans(ex.carried, run_id))
    spans.append(SpanRecord("relay", new_span_id(), root, wall(ex.opened), wall(ex.settled),
                            "gateway", attrs))
    return spans


def settled(ex: Exchange, how: str) -> None:
    """Record the call's trace once its exchange settles (the first one to settle: a
    call refused and sent again records the exchange that answered). Only the
    measurements are stored here; the spans are made when the trace is read."""
    trace = CURRENT.get()
    if trace is None or trace.finished or not trace.tenant:
        return
    trace.finished = True
    measured = Settled(trace, ex, time.perf_counter(), how)
    sink().record(Trace(trace.trace_id, ex.call.tenant, ex.call.function,
                        trace.remote_parent, pending=[measured.spans]))


def failed(trace: CallTrace | None, code: str, status: int) -> None:
    """Record a call that ended before any exchange settled (a refusal, a deadline, no
    instance): its root and admission spans, the error named."""
    if trace is None or trace.finished or not trace.tenant:
        return
    trace.finished = True
    now = time.time_ns()
    function = f"{trace.tenant}/{trace.name}"
    attrs: dict[str, Attribute] = {"thaw.function": function}
    spans = [SpanRecord(f"invoke {function}", trace.root_id, trace.remote_parent,
                        trace.begun_ns, now, "gateway",
                        {**attrs, "http.response.status_code": status}, code, "server")]
    sink().record(Trace(trace.trace_id, trace.tenant, function, trace.remote_parent,
                        spans))


def unsettled(trace: CallTrace | None, status: int) -> None:
    """A call answered without an exchange (stored for later: 202): its root span."""
    if trace is None or trace.finished or not trace.tenant:
        return
    trace.finished = True
    function = f"{trace.tenant}/{trace.name}"
    spans = [SpanRecord(f"invoke {function}", trace.root_id, trace.remote_parent,
                        trace.begun_ns, time.time_ns(), "gateway",
                        {"thaw.function": function, "http.response.status_code": status},
                        kind="server")]
    sink().record(Trace(trace.trace_id, trace.tenant, function, trace.remote_parent,
                        spans))


def traced(route: Route) -> Route:
    """A route that calls functions, inside the call's trace: the caller's context read
    (or a trace begun), CURRENT for the route and the tasks it starts, the answer's
    `traceparent` naming the call's root span (a streamed answer's from its head, by
    `on_response_prepare`; an error's from errors_middleware), and a call that ends
    without a settled exchange recorded as its root span."""

    @functools.wraps(route)
    async def call_route(request: web.Request) -> web.StreamResponse:
        trace = begin(request.headers)
        if trace is None:
            return await route(request)
        request[TRACE_KEY] = trace
        token = CURRENT.set(trace)
        try:
            response = await route(request)
        except ThawError as exc:
            failed(trace, exc.code, status_of(exc))
            raise
        finally:
            # The connection's task serves its next request without this call's
            # context (the tasks this call started keep their copy).
            CURRENT.reset(token)
        if not response.prepared:
            response.headers[TRACEPARENT] = trace.traceparent()
            unsettled(trace, response.status)
        return response

    return call_route


def answer_traceparent(request: web.Request) -> str | None:
    """The `traceparent` an answer carries: its call's root span on a traced route,
    else a span of the caller's trace (or of a new one) for a route that calls no
    function; None when tracing is off."""
    if not enabled():
        return None
    trace = request.get(TRACE_KEY) or CURRENT.get()
    if trace is not None:
        return trace.traceparent()
    parent = parse_traceparent(request.headers.get(TRACEPARENT))
    if parent is None:
        return f"00-{new_trace_id()}-{new_span_id()}-01"
    return f"00-{parent.trace_id}-{new_span_id()}-{parent.flags:02x}"


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer aiohttp sends carries a `traceparent` (the fast lane's answers get
    theirs from the route and errors_middleware)."""
    if TRACEPARENT not in response.headers:
        value = answer_traceparent(request)
        if value is not None:
            response.headers[TRACEPARENT] = value


def stored_headers(headers: dict[str, str]) -> dict[str, str]:
    """A stored invocation's headers with the current call's context, so that its run,
    wherever and whenever it happens, joins the caller's trace under the call's root."""
    trace = CURRENT.get()
    if trace is None:
        return headers
    kept = {k: v for k, v in headers.items() if k.lower() not in (TRACEPARENT, TRACESTATE)}
    return {**kept, **trace.hop(trace.root_id)}


def trace_id_of(headers: Mapping[str, str]) -> str:
    """The trace id a stored invocation's headers carry, or ""."""
    parent = parse_traceparent(headers.get(TRACEPARENT))
    return parent.trace_id if parent is not None else ""


@contextlib.contextmanager
def stored_run(tenant: str, name: str, headers: Mapping[str, str]) -> Iterator[None]:
    """The context in which a stored invocation's run is started (the task copies it):
    a call of its own in the trace its headers carry (stored_headers), a new trace
    for one that carries none (a schedule's run)."""
    trace = begin(headers)
    if trace is None:
        yield
        return
    trace.admitted(tenant, name)
    token = CURRENT.set(trace)
    try:
        yield
    finally:
        CURRENT.reset(token)

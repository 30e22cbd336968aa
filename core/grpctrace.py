"""W3C trace context over internal gRPC: a server interceptor that takes a call's
`traceparent`/`tracestate` metadata into core/tracing.py's REMOTE context (and the
log context, so the scheduler's and the agent's log lines of a call carry its trace
id), and a client interceptor that passes that context on to the calls made while
serving it (the scheduler's StartInstance to an agent during a cold start, an agent's
chunk fetches from its peers). A call without the metadata is served untouched: the
handler is not even wrapped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import structlog

from thaw.core.grpcwrap import Around, AroundEach
from thaw.core.tracing import REMOTE, TRACEPARENT, TRACESTATE, TraceParent, parse_traceparent


def _metadata_parent(metadata: Any) -> TraceParent | None:
    value = state = None
    for key, item in metadata or ():
        if key == TRACEPARENT:
            value = item
        elif key == TRACESTATE:
            state = item
    return parse_traceparent(value if isinstance(value, str) else None,
                             state if isinstance(state, str) else None)


def _in_trace(parent: TraceParent) -> Around:
    """A call's context with `parent` as the remote context (and its trace id in the
    log context)."""
    @asynccontextmanager
    async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        REMOTE.set(parent)
        with structlog.contextvars.bound_contextvars(trace_id=parent.trace_id):
            yield
    return around


class TraceServer(AroundEach):
    """Serve a call that carries trace context inside it (REMOTE, the log context)."""

    def around(self, details: grpc.HandlerCallDetails) -> Around | None:
        parent = _metadata_parent(details.invocation_metadata)
        return None if parent is None else _in_trace(parent)


class TraceClient(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Pass the remote context being served on to a unary call made meanwhile, unless
    the caller set its own."""

    async def intercept_unary_unary(self, continuation: Callable[..., Any],
                                    client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        parent = REMOTE.get()
        if parent is not None:
            given = list(client_call_details.metadata or ())
            if not any(key == TRACEPARENT for key, _ in given):
                given.extend(parent.headers().items())
                client_call_details = client_call_details._replace(
                    metadata=grpc.aio.Metadata(*given))
        return await continuation(client_call_details, request)

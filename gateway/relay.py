"""The response writer at the end of the invocation path: the node's answer relayed
to the client as it arrives (whole when it is small, else chunk by chunk), with the
platform's headers (X-Thaw-Start, X-Thaw-Node, X-Thaw-Version, Server-Timing)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from thaw.core.errors import ThawError
from thaw.core.tracing import TRACEPARENT
from thaw.gateway import tracing
from thaw.gateway.cost import add_cost, wants_cost
from thaw.gateway.dispatch import TENANT_ERROR_HEADER, Exchange, Settlement, StreamBroken
from thaw.gateway.lane import stream_response
from thaw.gateway.sse import error_chunk
from thaw.gateway.state import ERROR_CODE_KEY, TENANT_ERROR_KEY
from thaw.gateway.stream_metrics import stream_kind

# The platform's headers of the node's answer the client gets (X-Thaw-Error tells an
# error the handler raised itself from the platform's); every other X-Thaw-* is the
# platform's own and stays behind.
PASSTHROUGH_HEADERS = ("Content-Type", "Cache-Control", "X-Thaw-Instance", TENANT_ERROR_HEADER)
_PLATFORM_KEPT = frozenset(("x-thaw-instance", TENANT_ERROR_HEADER.lower()))
# Headers of the node's answer never passed on: each hop's framing, what the gateway
# sets itself, and cookies (every tenant's functions share the function origin;
# docs/function-api.md). The runtime drops the same from a handler's Response.
DROPPED_ANSWER_HEADERS = frozenset((
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization", "content-length",
    "date", "server", "server-timing", "set-cookie", "retry-after"))


def answer_headers(ex: Exchange, buffered: bool) -> dict[str, str]:
    upstream = ex.upstream.headers
    headers: dict[str, str] = {}
    for name, value in upstream.items():
        lower = name.lower()
        if lower in DROPPED_ANSWER_HEADERS or (
                lower.startswith("x-thaw-") and lower not in _PLATFORM_KEPT):
            continue
        previous = headers.get(name)
        headers[name] = value if previous is None else f"{previous}, {value}"
    if ex.tenant_error and "Retry-After" in upstream:
        # A handler's own 429/503 says when to retry (HTTPError(retry_after=...)).
        headers["Retry-After"] = upstream["Retry-After"]
    headers["X-Thaw-Start"] = ex.start
    # The call's id on a streamed answer too (its head goes out before the middleware
    # could add it): what `thaw fn logs --request` asks for.
    headers["X-Request-ID"] = ex.call.request_id
    headers["X-Thaw-Node"] = ex.lease.node_id
    if ex.lease.version:
        headers["X-Thaw-Version"] = str(ex.lease.version)  # the version that answered
    headers["Server-Timing"] = ex.server_timing(total=buffered)
    trace = tracing.CURRENT.get()
    if trace is not None:  # the call's trace (a stream's head is sent from here)
        headers[TRACEPARENT] = trace.traceparent()
    if not buffered:
        # Tell a buffering reverse proxy (nginx) to pass the stream on as it comes.
        headers["X-Accel-Buffering"] = "no"
    return headers


async def relay(request: web.Request, ex: Exchange) -> web.StreamResponse:
    """Answer the client with the node's answer, as it arrives."""
    if ex.tenant_error:
        request[TENANT_ERROR_KEY] = True
    if ex.buffered:
        body = await ex.read()
        headers = answer_headers(ex, True)
        if wants_cost(request):
            await add_cost(request, ex, headers)
        return web.Response(status=ex.status, body=body, headers=headers)
    out = stream_response(request, ex.status, answer_headers(ex, False))
    if ex.upstream.content_length is not None:
        out.content_length = ex.upstream.content_length
    await out.prepare(request)
    clock = ex.dispatcher.metrics.streams.clock(ex.call.function,
                                                stream_kind(ex.content_type), ex.started)
    try:
        async for chunk in ex.chunks():
            if clock is not None:
                clock.tick()
            await out.write(chunk)
    except ThawError as exc:
        # The head is sent: the failure becomes the stream's last item.
        ex.settle(Settlement.BROKEN if isinstance(exc, StreamBroken) else Settlement.ABORTED)
        request[ERROR_CODE_KEY] = exc.code
        last = error_chunk(ex.content_type, exc.code, exc.message)
        if last is None:
            raise  # no in-band error for this format: the connection is cut
        await finish_stream(out, last)
        return out
    except ConnectionError:
        ex.settle(Settlement.ABORTED)  # the client went away: stop the generator
        return out
    await finish_stream(out)
    return out


async def finish_stream(out: web.StreamResponse, last: bytes = b"") -> None:
    """Write the last bytes and end the stream; a client already gone is no error."""
    try:
        if last:
            await out.write(last)
        await out.write_eof()
    except ConnectionError:
        pass


async def done_within(task: asyncio.Future[Any], limit: float | None) -> bool:
    """Whether `task` is done within `limit` seconds (None: waits for it); it is not
    cancelled. asyncio.wait does the same for a set of futures at about twice the
    cost, and this runs on every sync call."""
    if task.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(limit, wake) if limit is not None else None
    task.add_done_callback(wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        task.remove_done_callback(wake)
    return task.done()

"""Function URLs: `POST /fn/{tenant}/{name}[/{path}]` (DESIGN.md §9).

The body reaches the handler as sent (JSON or raw bytes, up to the function's
`[limits] max_body`, capped by the gateway's max_body_bytes); the
answer comes back as the handler gave it: a complete body, or a stream (SSE with
`Accept: text/event-stream`, else NDJSON) relayed chunk by chunk as it is produced.
`X-Thaw-Timeout: <seconds>` is the client's own deadline: past it the answer is 504.
"""

from __future__ import annotations

import math
from urllib.parse import quote

from aiohttp import web

from thaw.core.errors import InvalidArgument, NotFound, ThawError
from thaw.core.priority import PRIORITY_DEFAULT
from thaw.gateway import invocations
from thaw.gateway.auth import require
from thaw.gateway.dispatch import Call, Exchange, Settlement, StreamBroken
from thaw.gateway.errors import PayloadTooLarge
from thaw.gateway.lane import stream_response
from thaw.gateway.priority import body_limit, call_priority
from thaw.gateway.sse import error_chunk
from thaw.gateway.state import (
    ERROR_CODE_KEY,
    FUNCTION_KEY,
    GATEWAY_KEY,
    PRINCIPAL_KEY,
    RECEIVED_KEY,
    REQUEST_ID_KEY,
    Gateway,
)
from thaw.gateway.tenancy import anonymous_principal
from thaw.proto import scheduler_pb2

TIMEOUT_HEADER = "X-Thaw-Timeout"
# Longest deadline a client may ask for: a day; the function's own timeout and the
# wait for placement bound a call well before that.
MAX_CLIENT_TIMEOUT_SECONDS = 86_400.0
# Characters left as they are when a sub-path is encoded again (RFC 3986 pchar and /).
PATH_SAFE = "/:@!$&'()*+,;=-._~"
# Headers of the node's answer the client gets.
PASSTHROUGH_HEADERS = ("Content-Type", "Cache-Control", "X-Thaw-Instance")


def client_timeout(request: web.Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_CLIENT_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"{TIMEOUT_HEADER} must be a number of seconds in (0, "
            f"{MAX_CLIENT_TIMEOUT_SECONDS:g}], got {raw!r}", field=TIMEOUT_HEADER)
    return seconds


async def read_body(request: web.Request, limit: int, described: str = "") -> bytes:
    """The whole body, refusing it (413) as soon as it is known to pass `limit`
    (from Content-Length before reading, else as a chunked body arrives)."""
    described = described or f"this gateway's limit of {limit} bytes (max_body_bytes)"
    too_large = PayloadTooLarge(f"the request body is larger than {described}",
                                field="body")
    length = request.content_length
    if length is not None:
        if length > limit:
            raise too_large
        return await request.read()
    body = bytearray()
    while chunk := await request.content.readany():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def admit(request: web.Request, gw: Gateway) -> scheduler_pb2.Principal:
    """Who is calling, allowed to invoke, within the key's rate."""
    if "Authorization" not in request.headers:
        # A public function's URL needs no key (rate-limited by client address).
        anonymous = await anonymous_principal(request, gw)
        if anonymous is not None:
            return anonymous
    p = await gw.auth.principal(request.headers.get("Authorization", ""))
    require(p, "invoke")
    await gw.limiter.check(p.key_id or p.tenant)
    request[PRINCIPAL_KEY] = p
    return p


def forwarded_path(request: web.Request) -> str:
    """The sub-path and query the handler gets, encoded again for the request line
    (match_info holds it decoded: "a b", not "a%20b")."""
    sub_path = request.match_info.get("path", "")
    path = "/" + quote(sub_path, safe=PATH_SAFE) if sub_path else ""
    query = request.rel_url.raw_query_string
    return f"{path}?{query}" if query else path


def new_call(request: web.Request, gw: Gateway, tenant: str, name: str, path: str,
             body: bytes, headers: dict[str, str], timeout: float | None,
             priority: int = PRIORITY_DEFAULT) -> Call:
    return Call(tenant=tenant, name=name, path=path, body=body, headers=headers,
                request_id=request[REQUEST_ID_KEY], timeout=timeout,
                received=request[RECEIVED_KEY], key_id=_key_id(request), priority=priority)


def _key_id(request: web.Request) -> str:
    p = request.get(PRINCIPAL_KEY)
    return p.key_id if p is not None else ""


def answer_headers(ex: Exchange, buffered: bool) -> dict[str, str]:
    upstream = ex.upstream.headers
    headers = {h: upstream[h] for h in PASSTHROUGH_HEADERS if h in upstream}
    headers["X-Thaw-Start"] = ex.start
    headers["X-Thaw-Node"] = ex.lease.node_id
    if ex.lease.version:
        headers["X-Thaw-Version"] = str(ex.lease.version)  # the version that answered
    headers["Server-Timing"] = ex.server_timing(total=buffered)
    if not buffered:
        # Tell a buffering reverse proxy (nginx) to pass the stream on as it comes.
        headers["X-Accel-Buffering"] = "no"
    return headers


async def relay(request: web.Request, ex: Exchange) -> web.StreamResponse:
    """Answer the client with the node's answer, as it arrives."""
    if ex.buffered:
        body = await ex.read()
        return web.Response(status=ex.status, body=body, headers=answer_headers(ex, True))
    out = stream_response(request, ex.status, answer_headers(ex, False))
    if ex.upstream.content_length is not None:
        out.content_length = ex.upstream.content_length
    await out.prepare(request)
    try:
        async for chunk in ex.chunks():
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


async def invoke(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    tenant, name = request.match_info["tenant"], request.match_info["name"]
    p = await admit(request, gw)
    if p.tenant != tenant:
        # Not 403: another tenant's function names are not disclosed.
        raise NotFound(f"function {tenant}/{name} not found", field="name")
    timeout = client_timeout(request)
    priority = await call_priority(request, gw, p, tenant, name)
    # The function's own limit (thaw.toml [limits] max_body), capped by the gateway's.
    body = await read_body(request, *await body_limit(request, gw, tenant, name))
    headers = {h: request.headers[h] for h in ("Content-Type", "Accept", "Idempotency-Key")
               if h in request.headers}
    call = new_call(request, gw, tenant, name, forwarded_path(request), body, headers, timeout,
                    priority)
    request[FUNCTION_KEY] = call.function
    # Async, Idempotency-Key, webhook: a stored invocation (gateway/invocations.py).
    stored = await invocations.intercept(request, gw, p, call)
    if stored is not None:
        return stored
    return await invocations.relay_within_limit(request, gw, p, call, relay)

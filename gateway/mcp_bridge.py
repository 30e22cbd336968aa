"""Serve an ASGI application (the MCP SDK's streamable HTTP transport) from an aiohttp
handler, for one request whose body has already been read and bounded.

The gateway is aiohttp; the `mcp` SDK's HTTP server is ASGI. Rather than a second
server on another port, one aiohttp route hands its request to the ASGI app through
this bridge: the scope is built from the aiohttp request (with the request itself
under `AIOHTTP_REQUEST` so that the app's handlers reach the gateway's state, the
admitted principal and the invocation path), `receive` gives the body once and then
waits for the end of the exchange, and `send` writes the app's answer through an
aiohttp response: a single-message answer as one `web.Response`, anything longer
(an SSE stream) streamed as it is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

AIOHTTP_REQUEST = "thaw.aiohttp_request"
"""The scope key of the aiohttp request the ASGI app serves."""

# Hop-by-hop or length headers aiohttp sets itself for the answer it writes.
_DROPPED = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def scope_of(request: web.Request, path: str) -> Scope:
    """The ASGI HTTP scope of `request`, served at `path`."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": path,
        "raw_path": path.encode(),
        "query_string": request.rel_url.raw_query_string.encode(),
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
        "server": tuple(sock[:2]) if isinstance(sock, tuple) else None,
        "state": {},
        AIOHTTP_REQUEST: request,
    }


class _Answer:
    """The ASGI app's answer, written through aiohttp as it comes."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.status = 500
        self.headers: list[tuple[str, str]] = []
        self.started = False
        self.response: web.StreamResponse | None = None

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = [(k.decode("latin-1"), v.decode("latin-1"))
                            for k, v in message.get("headers", ())
                            if k.lower() not in _DROPPED]
            self.started = True
            return
        if kind != "http.response.body" or not self.started:
            return
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        if self.response is None and not more:
            # The whole answer in one message: one plain response (aiohttp sets its
            # length and the gateway's headers when the handler returns it).
            self.response = web.Response(status=self.status, body=body)
            self._copy_headers(self.response)
            return
        if self.response is None:
            self.response = web.StreamResponse(status=self.status)
            self._copy_headers(self.response)
            await self.response.prepare(self.request)
        if body:
            await self.response.write(body)
        if not more and self.response.prepared:
            await self.response.write_eof()

    def _copy_headers(self, response: web.StreamResponse) -> None:
        for name, value in self.headers:
            response.headers.add(name, value)


async def serve(app: ASGIApp, request: web.Request, body: bytes, path: str
                ) -> web.StreamResponse:
    """`request` (whose body is `body`) answered by the ASGI `app`."""
    done = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        # Nothing more comes from the client: the next message is the end of the
        # exchange (the app's answer written, or the handler cancelled).
        await done.wait()
        return {"type": "http.disconnect"}

    answer = _Answer(request)
    try:
        await app(scope_of(request, path), receive, answer.send)
    finally:
        done.set()
    if answer.response is None:
        # The app ended without a body message: its status, empty.
        response = web.Response(status=answer.status if answer.started else 500)
        answer._copy_headers(response)
        return response
    return answer.response

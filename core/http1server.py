"""The HTTP/1.1 server of the invocation path's two hops: the node's data plane
(platform/dataplane.py) and the gateway's fast lane for function calls (gateway/lane.py).

Hand-rolled on httptools' parser (the one uvicorn uses) on purpose, like the client in
core/http1.py: aiohttp's server costs about 0.13 ms more per request than this on the
warm path of a two-core machine (a hello-world round trip of 0.46 ms against 0.33 ms;
request and response objects, middlewares, the payload writer), and the added-latency
budget of a warm call is 1 ms for both hops together (`thaw bench overhead`).

What it serves, and what it does not:
- HTTP/1.1 with keep-alive (HTTP/1.0 and `Connection: close` close after the answer),
  request bodies by Content-Length or chunked, `Expect: 100-continue`, a bound on the
  body (413) and on the head: the request target, each header, their number and the
  whole head (431; core/http1limits.py), 400 for what the parser refuses;
- timeouts (HTTPLimits): a head must arrive within header_timeout (a new connection's
  from its opening), a body may not pause longer than body_timeout (408 for either, if
  part of the request came; then the connection closes), a kept-alive connection
  closes after idle_timeout without a request; with `cap` (AddressCap), an address
  past its open connections is answered 429 and closed at once;
- requests on a connection are answered one at a time, in order (pipelining works; a
  request that arrives while another is handled waits, and reading pauses; a refusal
  of a malformed one comes after the answers before it);
- an answer is a `Response` (whole body, one write when small), a `Streaming`
  (chunked transfer-encoding, written as produced, with the transport's flow
  control), or written by the handler itself (`Request.start_response`, then SENT);
- a client that leaves mid-stream ends the stream: the chunk iterator is closed, or
  cancelled if it is waiting. A handler still computing a whole answer is not cancelled
  (its work is the instance's call; it finishes and frees its slot);
- with `claim` and `fallback` (HTTPServer), requests it does not claim, and protocol
  upgrades (WebSocket), are handed with their connection to another server's protocol
  (aiohttp's), from their first byte; without them, upgrades get 400;
- TLS when given an ssl context (core/httptls.py: mutual TLS under the platform's CA;
  the handshake refuses a client without a certificate from it), and then, with
  `callers`, only those components' certificates are served: another's requests get
  403 at their head and the connection closes.

This module is the listening socket; each connection is an `HTTPProtocol`
(core/http1protocol.py), and requests, answers and routes are core/http1messages.py's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from thaw.core.http1limits import FORWARDED_LIMITS, AddressCap, HTTPLimits
from thaw.core.http1messages import (
    SENT,
    Answer,
    Claim,
    Connection,
    Handler,
    Request,
    Response,
    ResponseWriter,
    Router,
    Streaming,
    error_response,
    json_response,
)
from thaw.core.http1protocol import (
    KEEPALIVE_SECONDS,
    MAX_BODY_BYTES,
    SINGLE_WRITE_MAX_BYTES,
    HTTPProtocol,
)

__all__ = [
    "KEEPALIVE_SECONDS", "MAX_BODY_BYTES", "SENT", "SINGLE_WRITE_MAX_BYTES", "Answer",
    "Claim", "Connection", "HTTPProtocol", "HTTPServer", "Handler", "Request", "Response",
    "ResponseWriter", "Router", "Streaming", "error_response", "json_response",
]


class HTTPServer:
    """A listening socket serving `router`; `close()` stops accepting, lets the answers
    in progress finish (up to `grace` seconds) and closes every connection.

    With `claim` and `fallback`, it answers only the requests `claim` accepts (judged on
    the head) and hands every other connection, from that request's first byte, to the
    protocol `fallback()` makes (another server's, e.g. aiohttp's): the hot route is
    served here, the rest of an API by a full framework, on one port.

    With `tls` (core/httptls.py server_ssl_context) it speaks TLS only; `callers` then
    names the components (core/pki.py) whose client certificates it serves.

    `limits` bound each connection's heads and pauses (core/http1limits.py; None:
    FORWARDED_LIMITS, for a server only platform components call). `cap` counts
    connections per address; a connection handed to `fallback` must be released from
    the cap by the protocol it goes to."""

    def __init__(self, router: Router, max_body: int = MAX_BODY_BYTES,
                 claim: Claim | None = None,
                 fallback: Callable[[], asyncio.Protocol] | None = None,
                 tls: ssl.SSLContext | None = None,
                 callers: frozenset[str] | None = None,
                 limits: HTTPLimits | None = None,
                 cap: AddressCap | None = None) -> None:
        if (claim is None) != (fallback is None):
            raise ValueError("claim and fallback go together")
        if callers is not None and tls is None:
            raise ValueError("callers are told apart by their certificates: give tls")
        self.tls = tls
        self.callers = callers
        self.router = router
        self.max_body = max_body
        self.claim = claim
        self.fallback = fallback
        self.limits = limits or FORWARDED_LIMITS
        self.cap = cap
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[HTTPProtocol] = set()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HTTPProtocol(self.router, self.max_body, connections=self._connections,
                                 claim=self.claim, fallback=self.fallback,
                                 callers=self.callers, limits=self.limits,
                                 cap=self.cap),
            host, port, ssl=self.tls)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, grace: float = 5.0, linger: float = 0.0) -> None:
        """Stop listening, answer what is under way, and close: each connection winds
        down (HTTPProtocol.wind_down: its answers say `Connection: close`, and an idle
        one closes after `linger` seconds); whatever is still open after the longer of
        `grace` and `linger` is cut."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._connections):
            conn.wind_down(linger)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(grace, linger)
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            if conn._serving is not None:
                conn._serving.cancel()
            conn._abort()
        await self._server.wait_closed()
        self._server = None

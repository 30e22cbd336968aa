"""The HTTP/1.1 server of the node's data plane (platform/dataplane.py): the hop every
invocation crosses between the gateway and the instance.

Hand-rolled on httptools' parser (the one uvicorn uses) on purpose, like the client in
core/http1.py: aiohttp's server costs about 0.13 ms more per request than this on the
warm path of a two-core machine (a hello-world round trip of 0.46 ms against 0.33 ms;
request and response objects, middlewares, the payload writer), and the added-latency
budget of a warm call is 1 ms for both hops together (`thaw bench overhead`).

What it serves, and what it does not:
- HTTP/1.1 with keep-alive (HTTP/1.0 and `Connection: close` close after the answer),
  request bodies by Content-Length or chunked, `Expect: 100-continue`, a bound on the
  body (413) and on the head (431 or 400 from the parser);
- requests on a connection are answered one at a time, in order (pipelining works; a
  request that arrives while another is handled waits, and reading pauses);
- an answer is a `Response` (whole body, one write when small) or a `Streaming`
  (chunked transfer-encoding, written as produced, with the transport's flow control);
- a client that leaves mid-stream ends the stream: the chunk iterator is closed, or
  cancelled if it is waiting. A handler still computing a whole answer is not cancelled
  (its work is the instance's call; it finishes and frees its slot);
- no upgrades (WebSocket), no TLS: the data plane is reached by the gateway only.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools
import structlog

log = structlog.get_logger()

# aiohttp's default keep-alive timeout: an idle connection is closed after this long.
KEEPALIVE_SECONDS = 75.0
MAX_BODY_BYTES = 256 * 1024 * 1024
# Bodies up to this size go out with their head in one write (one syscall).
SINGLE_WRITE_MAX_BYTES = 256 * 1024
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


class Request:
    """One parsed request: method, path (undecoded, without the query), query string,
    headers (names lower-case), body, and the peer's address."""

    __slots__ = ("method", "path", "query_string", "headers", "body", "peer")

    def __init__(self, method: str, path: str, query_string: str, headers: dict[str, str],
                 body: bytes, peer: Any) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.peer = peer

    @property
    def query(self) -> dict[str, str]:
        """The query's parameters (the last of a repeated name wins)."""
        return dict(parse_qsl(self.query_string, keep_blank_values=True))


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int = 200, body: bytes = b"",
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else {}


class Streaming:
    """An answer sent as its chunks come (chunked transfer-encoding). An exception from
    `chunks` after the head is out cuts the connection: the client sees the stream end
    unfinished, never a second answer."""

    __slots__ = ("status", "headers", "chunks")

    def __init__(self, chunks: AsyncIterator[bytes], status: int = 200,
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.chunks = chunks
        self.headers = headers if headers is not None else {}


Answer = Response | Streaming
Handler = Callable[[Request], Awaitable[Answer]]


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode(),
                    {"Content-Type": "application/json; charset=utf-8"})


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status)


class Router:
    """Exact paths, and path prefixes whose handler gets the rest of the path."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._prefixes: list[tuple[str, dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._exact.setdefault(path, {})[method] = handler

    def add_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        for known, handlers in self._prefixes:
            if known == prefix:
                handlers[method] = handler
                return
        self._prefixes.append((prefix, {method: handler}))

    def resolve(self, method: str, path: str) -> Handler | Response:
        handlers = self._exact.get(path)
        if handlers is None:
            for prefix, by_method in self._prefixes:
                if path.startswith(prefix):
                    handlers = by_method
                    break
        if handlers is None:
            return error_response(404, "not_found", f"no route for {path}")
        handler = handlers.get(method)
        if handler is None:
            return error_response(405, "method_not_allowed",
                                  f"{method} is not allowed on {path}")
        return handler


class _Reject(Exception):
    """The request cannot be taken: answered with this status, then the connection
    closes (its remaining bytes cannot be trusted)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HTTPProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, router: Router, max_body: int = MAX_BODY_BYTES,
                 keepalive: float = KEEPALIVE_SECONDS,
                 connections: set[HTTPProtocol] | None = None) -> None:
        self._router = router
        self._max_body = max_body
        self._keepalive = keepalive
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer: Any = None
        # The request being parsed.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        # Parsed requests not answered yet: (request, keep_alive).
        self._pending: deque[tuple[Request, bool]] = deque()
        self._serving: asyncio.Task[None] | None = None
        self._streaming = False
        self._closed = False
        self._write_ready: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        if self._connections is not None:
            self._connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._connections is not None:
            self._connections.discard(self)
        self._disarm_idle_timer()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_exception(ConnectionResetError("the client went away"))
        if self._serving is not None and self._streaming:
            self._serving.cancel()  # a stream waiting for its next chunk ends now

    def data_received(self, data: bytes) -> None:
        self._disarm_idle_timer()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not served here")
        except httptools.HttpParserCallbackError as exc:
            # httptools keeps what a callback raised as the error's context.
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status, str(cause))
            else:
                log.error("request parsing failed", error=repr(cause))
                self._reject(400, "malformed request")
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")

    def pause_writing(self) -> None:
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise _Reject(413, f"the request body is larger than {self._max_body} bytes")
        if self._headers.get("expect", "").lower() == "100-continue":
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            raise _Reject(413, f"the request body is larger than {self._max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        request = Request(
            self._parser.get_method().decode("ascii"), url.path.decode("latin-1"),
            (url.query or b"").decode("latin-1"), self._headers,
            b"".join(self._body) if len(self._body) != 1 else self._body[0], self._peer)
        self._pending.append((request, self._parser.should_keep_alive()))
        if self._serving is None:
            self._serving = self._loop.create_task(self._serve())
        elif self._transport is not None:
            self._transport.pause_reading()  # one waiting request is enough

    # Serving

    async def _serve(self) -> None:
        try:
            while self._pending and not self._closed:
                request, keep_alive = self._pending.popleft()
                keep_alive = await self._answer(request, keep_alive)
                if not keep_alive:
                    self._close()
                    return
                if self._transport is not None and not self._closed:
                    self._transport.resume_reading()
        finally:
            self._serving = None
            if not self._closed and not self._pending:
                self._arm_idle_timer()

    async def _answer(self, request: Request, keep_alive: bool) -> bool:
        """Answer one request; whether the connection may serve another."""
        route = self._router.resolve(request.method, request.path)
        if isinstance(route, Response):
            self._send(route, keep_alive)
            return keep_alive
        try:
            answer = await route(request)
        except Exception:  # a bug in a handler: 500, the connection survives
            log.exception("unexpected error in a data plane handler", path=request.path)
            self._send(error_response(500, "internal", "internal error"), keep_alive)
            return keep_alive
        if isinstance(answer, Response):
            self._send(answer, keep_alive)
            return keep_alive
        return await self._stream(answer, keep_alive)

    def _head(self, status: int, headers: dict[str, str], keep_alive: bool,
              length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {length}" if length is not None
                     else "Transfer-Encoding: chunked")
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, response: Response, keep_alive: bool) -> None:
        if self._closed or self._transport is None:
            return
        body = response.body
        head = self._head(response.status, response.headers, keep_alive, len(body))
        if len(body) <= SINGLE_WRITE_MAX_BYTES:
            self._transport.write(head + body)
        else:
            self._transport.writelines((head, body))

    async def _stream(self, answer: Streaming, keep_alive: bool) -> bool:
        chunks = answer.chunks
        transport = self._transport
        if self._closed or transport is None:
            await _close_iterator(chunks)
            return False
        transport.write(self._head(answer.status, answer.headers, keep_alive, None))
        self._streaming = True
        try:
            async for chunk in chunks:
                if self._closed:
                    break
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await self._drain()
        except asyncio.CancelledError:
            if not self._closed:
                raise  # not the client leaving: the server is stopping
            return False
        except ConnectionError:
            return False
        except Exception:
            log.exception("a streamed answer broke off", status=answer.status)
            self._abort()
            return False
        finally:
            self._streaming = False
            await _close_iterator(chunks)
        if self._closed:
            return False
        transport.write(b"0\r\n\r\n")
        return keep_alive

    async def _drain(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            await self._write_ready
        if self._closed:
            raise ConnectionResetError("the client went away")

    # Connection state

    def _reject(self, status: int, message: str) -> None:
        if self._transport is None or self._closed:
            return
        code = {413: "payload_too_large"}.get(status, "bad_request")
        self._send(error_response(status, code, message), keep_alive=False)
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.close()
        self._closed = True

    def _abort(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.abort()
        self._closed = True

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is None and not self._closed:
            self._idle_timer = self._loop.call_later(self._keepalive, self._close)

    def _disarm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


async def _close_iterator(chunks: AsyncIterator[bytes]) -> None:
    closer = getattr(chunks, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


class HTTPServer:
    """A listening socket serving `router`; `close()` stops accepting, lets the answers
    in progress finish (up to `grace` seconds) and closes every connection."""

    def __init__(self, router: Router, max_body: int = MAX_BODY_BYTES) -> None:
        self.router = router
        self.max_body = max_body
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[HTTPProtocol] = set()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HTTPProtocol(self.router, self.max_body, connections=self._connections),
            host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, grace: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while (any(c._serving is not None for c in self._connections)
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            if conn._serving is not None:
                conn._serving.cancel()
            conn._abort()
        await self._server.wait_closed()
        self._server = None

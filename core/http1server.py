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
  body (413) and on the head (431 or 400 from the parser);
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
- no TLS.
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

    __slots__ = ("method", "path", "query_string", "headers", "body", "peer", "_protocol",
                 "_keep_alive")

    def __init__(self, method: str, path: str, query_string: str, headers: dict[str, str],
                 body: bytes, peer: Any, protocol: HTTPProtocol | None = None,
                 keep_alive: bool = True) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.peer = peer
        self._protocol = protocol
        self._keep_alive = keep_alive

    def start_response(self, status: int, headers: dict[str, str],
                       content_length: int | None = None) -> ResponseWriter:
        """Send the head now and write the body through the returned writer; the
        handler then returns SENT. With `content_length` the body is sent as is (exactly
        that many bytes), else chunked."""
        assert self._protocol is not None, "a request parsed by HTTPProtocol"
        return self._protocol._start_response(status, headers, content_length,
                                              self._keep_alive)

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


class _Sent:
    """The handler wrote its answer itself (Request.start_response)."""


SENT = _Sent()
Answer = Response | Streaming | _Sent


class ResponseWriter:
    """The body of an answer whose head is out (Request.start_response)."""

    def __init__(self, protocol: HTTPProtocol, chunked: bool, length: int | None) -> None:
        self._protocol = protocol
        self._chunked = chunked
        self._left = length
        self.ended = False

    async def write(self, data: bytes) -> None:
        """Raises ConnectionResetError once the client is gone."""
        protocol = self._protocol
        if protocol._closed or protocol._transport is None:
            raise ConnectionResetError("the client went away")
        if not data:
            return
        if self._chunked:
            protocol._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            if self._left is not None:
                if len(data) > self._left:
                    raise ValueError("more bytes than the announced Content-Length")
                self._left -= len(data)
            protocol._transport.write(data)
        await protocol._drain()

    async def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        protocol = self._protocol
        if protocol._closed or protocol._transport is None:
            raise ConnectionResetError("the client went away")
        if self._chunked:
            protocol._transport.write(b"0\r\n\r\n")
        elif self._left:
            # Fewer bytes than announced: the client must not take the next answer
            # for the rest of this one.
            protocol._abort()
Handler = Callable[[Request], Awaitable[Answer]]
Claim = Callable[[str, str, dict[str, str]], bool]
"""(method, path, headers) -> whether this server answers the request; if not, the
connection is handed to the fallback protocol (see HTTPServer)."""


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


class _Handoff(Exception):
    """The request goes to the fallback protocol (HTTPServer's `claim` said no)."""


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
                 connections: set[HTTPProtocol] | None = None,
                 claim: Claim | None = None,
                 fallback: Callable[[], asyncio.Protocol] | None = None) -> None:
        self._router = router
        self._claim = claim
        self._fallback = fallback
        self._max_body = max_body
        self._keepalive = keepalive
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._peer: Any = None
        # The request being parsed.
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] = {}
        self._parsed_url: Any = None
        self._method = ""
        self._body: list[bytes] = []
        self._body_size = 0
        # Parsed requests not answered yet: (request, keep_alive).
        # Parsed requests not answered yet: (request, keep_alive); a Response in the
        # queue is a refusal, sent in its turn before the connection closes.
        self._pending: deque[tuple[Request | Response, bool]] = deque()
        self._refused = False
        self._serving: asyncio.Task[None] | None = None
        self._streaming = False
        self._closed = False
        self._write_ready: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._writer: ResponseWriter | None = None
        # The bytes of the message being parsed, from its first byte, for a hand-off
        # (kept only when `claim` is set, and only while the message begins a chunk:
        # a message pipelined behind another one mid-chunk cannot be handed off).
        self._chunk = b""
        self._raw: list[bytes] = []
        self._in_message = False
        self._completed_here = False
        self._aligned = True
        self.handed_off = False

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
        if self._refused:
            return
        self._disarm_idle_timer()
        if self._claim is not None:
            self._chunk = data
            self._completed_here = False
            if self._in_message and self._aligned:
                self._raw.append(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not served here")
        except httptools.HttpParserCallbackError as exc:
            # httptools keeps what a callback raised as the error's context.
            cause = exc.__context__
            if isinstance(cause, _Handoff):
                self._hand_off()
            elif isinstance(cause, _Reject):
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
        if self._claim is not None:
            self._in_message = True
            self._aligned = not self._completed_here
            self._raw = [self._chunk] if self._aligned else []
        self._url = b""
        self._raw_headers = []
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Decoded all at once when the head is complete: one callback per header is on
        # every request's path, so it only keeps the bytes.
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers = self._headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in self._raw_headers}
        if len(headers) != len(self._raw_headers):  # a repeated name: values joined
            headers.clear()
            for raw_name, raw_value in self._raw_headers:
                key, text = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
                previous = headers.get(key)
                headers[key] = text if previous is None else f"{previous}, {text}"
        url = self._parsed_url = httptools.parse_url(self._url)
        self._method = self._parser.get_method().decode("ascii")
        if self._parser.should_upgrade():  # a WebSocket, h2c...: never served here
            if self._fallback is not None:
                raise _Handoff
            raise _Reject(400, "protocol upgrades are not served here")
        if self._claim is not None:
            if not self._claim(self._method, url.path.decode("latin-1"), headers):
                raise _Handoff
            # Claimed: its bytes will never be handed off, so they are not kept (the
            # body is kept once, in _body).
            self._raw = []
            self._aligned = False
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
        self._in_message = False
        self._completed_here = True
        self._raw = []
        if self._closed:
            return
        url = self._parsed_url
        keep_alive = self._parser.should_keep_alive()
        request = Request(
            self._method, url.path.decode("latin-1"),
            (url.query or b"").decode("latin-1"), self._headers,
            b"".join(self._body) if len(self._body) != 1 else self._body[0], self._peer,
            self, keep_alive)
        self._pending.append((request, keep_alive))
        if self._serving is None:
            self._serving = self._loop.create_task(self._serve())
        elif self._transport is not None:
            self._transport.pause_reading()  # one waiting request is enough

    # Serving

    async def _serve(self) -> None:
        try:
            while self._pending and not self._closed:
                request, keep_alive = self._pending.popleft()
                if isinstance(request, Response):  # a refusal, after the answers before it
                    self._send(request, keep_alive=False)
                    self._close()
                    return
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
            log.exception("unexpected error in a handler", path=request.path)
            if self._writer is not None:  # its head is out: the answer is cut
                self._writer = None
                self._abort()
                return False
            self._send(error_response(500, "internal", "internal error"), keep_alive)
            return keep_alive
        if isinstance(answer, _Sent):
            writer, self._writer = self._writer, None
            return keep_alive and writer is not None and writer.ended and not self._closed
        if self._writer is not None:
            # The handler started its own answer, then returned another (an error once
            # its stream broke): the client has a head and part of a body, so the only
            # honest end is a cut connection.
            self._writer = None
            log.warning("a handler answered twice; the connection is cut",
                        path=request.path)
            self._abort()
            return False
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

    def _start_response(self, status: int, headers: dict[str, str],
                        content_length: int | None, keep_alive: bool) -> ResponseWriter:
        if self._writer is not None:
            raise RuntimeError("an answer was already started for this request")
        writer = ResponseWriter(self, content_length is None, content_length)
        self._writer = writer
        if not self._closed and self._transport is not None:
            self._transport.write(self._head(status, headers, keep_alive, content_length))
        return writer

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

    def _hand_off(self) -> None:
        """Give the connection, from this message's first byte, to the fallback."""
        transport = self._transport
        if transport is None or self._closed:
            return
        if self._fallback is None or not self._aligned or self._serving is not None \
                or self._pending:
            self._reject(400, "this request was pipelined behind another one on the "
                              "connection and cannot be served; send it after the "
                              "answer to the one before, or on its own connection")
            return
        raw = b"".join(self._raw)
        self.handed_off = True
        self._closed = True  # for this protocol: the fallback owns the transport now
        self._disarm_idle_timer()
        if self._connections is not None:
            self._connections.discard(self)
        protocol = self._fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if raw:
            protocol.data_received(raw)

    def _reject(self, status: int, message: str) -> None:
        """Refuse the request being parsed and close the connection, after the answers
        to the requests before it (in order: pipelined clients match them up so)."""
        if self._transport is None or self._closed or self._refused:
            return
        self._refused = True  # the parser is in error: nothing more is read
        code = {413: "payload_too_large"}.get(status, "bad_request")
        refusal = error_response(status, code, message)
        if self._serving is None and not self._pending:
            self._send(refusal, keep_alive=False)
            self._close()
            return
        self._pending.append((refusal, False))
        self._transport.pause_reading()

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
    in progress finish (up to `grace` seconds) and closes every connection.

    With `claim` and `fallback`, it answers only the requests `claim` accepts (judged on
    the head) and hands every other connection, from that request's first byte, to the
    protocol `fallback()` makes (another server's, e.g. aiohttp's): the hot route is
    served here, the rest of an API by a full framework, on one port."""

    def __init__(self, router: Router, max_body: int = MAX_BODY_BYTES,
                 claim: Claim | None = None,
                 fallback: Callable[[], asyncio.Protocol] | None = None) -> None:
        if (claim is None) != (fallback is None):
            raise ValueError("claim and fallback go together")
        self.router = router
        self.max_body = max_body
        self.claim = claim
        self.fallback = fallback
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[HTTPProtocol] = set()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HTTPProtocol(self.router, self.max_body, connections=self._connections,
                                 claim=self.claim, fallback=self.fallback),
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

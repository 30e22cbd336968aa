"""The requests, answers and routes of core/http1server.py's HTTP/1.1 server.

A handler takes a `Request` and returns its answer: a `Response` (whole body), a
`Streaming` (chunks as produced) or `SENT`, after writing it itself through the
`ResponseWriter` that `Request.start_response` returns. A `Router` maps method and path
to handlers. The connection that parses requests and writes answers is
core/http1protocol.py's `HTTPProtocol`; this module knows it only through `Connection`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl


class Connection(Protocol):
    """What a handler writing its own answer needs of its client connection
    (HTTPProtocol): the transport while the client is there, flow control, a cut."""

    _closed: bool
    _transport: asyncio.Transport | None

    async def _drain(self) -> None: ...

    def _abort(self) -> None: ...

    def _start_response(self, status: int, headers: dict[str, str],
                        content_length: int | None, keep_alive: bool) -> ResponseWriter: ...


class Request:
    """One parsed request: method, path (undecoded, without the query), query string,
    headers (names lower-case), body, and the peer's address."""

    __slots__ = ("method", "path", "query_string", "headers", "body", "peer", "_protocol",
                 "_keep_alive")

    def __init__(self, method: str, path: str, query_string: str, headers: dict[str, str],
                 body: bytes, peer: Any, protocol: Connection | None = None,
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

    def __init__(self, protocol: Connection, chunked: bool, length: int | None) -> None:
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


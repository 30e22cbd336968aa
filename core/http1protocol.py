"""One client connection of core/http1server.py's HTTP/1.1 server: httptools parses
the requests, they are answered one at a time and in order, and a request the server
does not claim (or a protocol upgrade) is handed with the connection, from its first
byte, to the fallback protocol. See core/http1server.py for what is served."""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httptools
import structlog

from thaw.core.http1limits import LINGER_SECONDS, AddressCap, HTTPLimits, refusal_bytes
from thaw.core.http1messages import (
    Claim,
    Request,
    Response,
    ResponseWriter,
    Router,
    Streaming,
    _Sent,
    error_response,
)
from thaw.core.httptls import peer_component

log = structlog.get_logger()

# aiohttp's former keep-alive timeout: an idle connection is closed after this long.
KEEPALIVE_SECONDS = 75.0
# Where a connection is (what its timer guards): a request's head or body arriving,
# or between requests (idle, or its requests being answered).
_HEAD, _BODY, _BETWEEN = "head", "body", "between"
MAX_BODY_BYTES = 256 * 1024 * 1024
# Bodies up to this size go out with their head in one write (one syscall).
SINGLE_WRITE_MAX_BYTES = 256 * 1024
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}

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
                 fallback: Callable[[], asyncio.Protocol] | None = None,
                 callers: frozenset[str] | None = None,
                 limits: HTTPLimits | None = None,
                 cap: AddressCap | None = None) -> None:
        self._router = router
        # Head sizes, timeouts (core/http1limits.py); `cap`: connections per address.
        self._limits = limits or HTTPLimits(idle_timeout=keepalive)
        self._cap = cap
        self._phase = _BETWEEN
        self._timer_phase = ""
        self._head_size = 0
        self._header_count = 0
        self._head_received = 0
        self._begun = 0  # messages begun on the connection
        self._body_seen = 0.0
        self._body_began = 0.0  # its head's end: body_deadline counts from it
        # With TLS: the components whose certificates are served; another's requests
        # are refused with 403 at their head (`_forbidden`, judged once per connection).
        self._callers = callers
        self._forbidden: str | None = None
        self._claim = claim
        self._fallback = fallback
        self._max_body = max_body
        self._keepalive = self._limits.idle_timeout
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
        self._winding = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        if self._cap is not None and not self._cap.admit(transport):
            self._refused = True  # past its address's cap: told, then closed
            self._transport.write(refusal_bytes(self._cap.most))
            self._linger()
            return
        if self._callers is not None:
            caller = peer_component(transport)
            if caller not in self._callers:
                self._forbidden = (
                    f"the {caller or 'unknown'} component's certificate may not call "
                    f"this server; callers: {', '.join(sorted(self._callers)) or 'none'}")
        if self._connections is not None:
            self._connections.add(self)
        # A new connection has header_timeout to send its first head.
        self._arm_timer(_HEAD, self._limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._cap is not None and self._transport is not None:
            self._cap.release(self._transport)
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
        # A head begun in an earlier chunk (the same one still, after parsing: see
        # _after_chunk).
        continued = self._begun if self._phase == _HEAD else -1
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
        else:
            self._after_chunk(len(data), continued)

    def _after_chunk(self, size: int, continued: int) -> None:
        """Bound the head still arriving and arm the timer the connection's phase
        needs, once a chunk is parsed (`continued`: the count of messages begun when
        the chunk came, if a head was arriving then)."""
        phase = self._phase
        if phase == _HEAD:
            if continued == self._begun:  # all head (httptools holds a partial header)
                self._head_received += size
                if self._head_received > self._limits.max_head_bytes:
                    self._reject(431, "the request head is larger than "
                                      f"{self._limits.max_head_bytes} bytes")
                    return
            if self._timer_phase != _HEAD:  # from the head's first chunk on
                self._arm_timer(_HEAD, self._limits.header_timeout)
        elif phase == _BODY:
            self._body_seen = self._loop.time()
            if self._timer_phase != _BODY:
                self._arm_timer(_BODY, self._body_wait())
        elif self._idle_timer is not None:
            self._disarm_idle_timer()  # answering; idle again once answered

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
        self._phase = _HEAD
        self._begun += 1
        self._head_size = self._header_count = self._head_received = 0
        self._url = b""
        self._raw_headers = []
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_request_line_bytes:
            raise _Reject(431, "the request target is longer than "
                               f"{self._limits.max_request_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Decoded all at once when the head is complete: one callback per header is on
        # every request's path, so it only keeps the bytes.
        self._raw_headers.append((name, value))
        size = len(name) + len(value)
        self._head_size += size
        self._header_count += 1
        limits = self._limits
        if size > limits.max_header_bytes:
            raise _Reject(431, f"the header {name[:64].decode('latin-1')!r} is longer "
                               f"than {limits.max_header_bytes} bytes")
        if self._header_count > limits.max_headers:
            raise _Reject(431, f"the request has more than {limits.max_headers} headers")
        if self._head_size + len(self._url) > limits.max_head_bytes:
            raise _Reject(431, f"the request head is larger than {limits.max_head_bytes} "
                               "bytes")

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._body_began = self._loop.time()
        if self._forbidden is not None:
            raise _Reject(403, self._forbidden)
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
        self._phase = _BETWEEN
        self._in_message = False
        self._completed_here = True
        self._raw = []
        if self._closed:
            return
        url = self._parsed_url
        keep_alive = self._parser.should_keep_alive() and not self._winding
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
                    self._linger()
                    return
                keep_alive = await self._answer(request, keep_alive and not self._winding)
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

    def wind_down(self, linger: float) -> None:
        """Stop keeping the connection alive, as its server closes: a request being
        answered, or one arriving within `linger` seconds, is answered with
        `Connection: close` and the connection closes after it; one idle that long
        closes then. A request a client sends on a kept connection just as the server
        closes it is lost on the way, and neither side can tell whether it ran; the
        linger lets such a request land on a connection still open."""
        self._winding = True
        if self._closed or self._serving is not None or self._pending \
                or self._phase != _BETWEEN:
            return
        self._arm_timer(_BETWEEN, linger)

    def _reject(self, status: int, message: str) -> None:
        """Refuse the request being parsed and close the connection, after the answers
        to the requests before it (in order: pipelined clients match them up so)."""
        if self._transport is None or self._closed or self._refused:
            return
        self._refused = True  # the parser is in error: nothing more is read
        code = {403: "permission_denied", 408: "request_timeout",
                413: "payload_too_large", 431: "headers_too_large"}.get(status,
                                                                        "bad_request")
        refusal = error_response(status, code, message)
        if self._serving is None and not self._pending:
            self._send(refusal, keep_alive=False)
            self._linger()
            return
        self._pending.append((refusal, False))
        self._transport.pause_reading()

    def _linger(self) -> None:
        """Close after a refusal once the client has had LINGER_SECONDS to stop
        sending: what it sends meanwhile is dropped (`_refused`), so a close with its
        bytes unread (a reset) does not destroy the answer on its way."""
        self._disarm_idle_timer()
        if self._transport is None or self._closed:
            return
        self._transport.resume_reading()
        self._idle_timer = self._loop.call_later(LINGER_SECONDS, self._close)

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
            self._arm_timer(_BETWEEN, self._keepalive)

    def _arm_timer(self, phase: str, seconds: float) -> None:
        """One timer per connection, guarding the phase it is in (see _timed_out)."""
        self._disarm_idle_timer()
        if not self._closed:
            self._timer_phase = phase
            self._idle_timer = self._loop.call_later(seconds, self._timed_out)

    def _disarm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._timer_phase = ""

    def _body_wait(self) -> float:
        """Seconds the body may still take from its last byte: body_timeout, or less
        once the whole body's deadline is nearer."""
        limits = self._limits
        return min(limits.body_timeout,
                   self._body_began + limits.body_deadline - self._body_seen)

    def _timed_out(self) -> None:
        """The connection's timer ran out: idle, or its head or body too slow."""
        phase, self._idle_timer, self._timer_phase = self._timer_phase, None, ""
        limits = self._limits
        if phase == _BODY:
            left = self._body_seen + self._body_wait() - self._loop.time()
            if left > 0:  # a byte came since: the wait counts from it
                self._arm_timer(_BODY, left)
                return
        if phase == _BETWEEN or self._phase == _BETWEEN:
            self._close()  # nothing of a request arrived: no answer owed
            return
        if phase == _HEAD:
            message = f"the request's head did not arrive within {limits.header_timeout:g} s"
        elif self._loop.time() >= self._body_began + limits.body_deadline:
            message = (f"the request's body did not arrive whole within "
                       f"{limits.body_deadline:g} s (body_deadline_seconds)")
        else:
            message = f"the request's body did not arrive within {limits.body_timeout:g} s"
        self._reject(408, message)


async def _close_iterator(chunks: AsyncIterator[bytes]) -> None:
    closer = getattr(chunks, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


"""The HTTP/1.1 client of the invocation path: the gateway's to node data planes (TCP)
and the node agent's to instances (unix sockets). Keep-alive connections per target,
one request at a time on each.

Hand-rolled on purpose, like the instance's server (snapshotter/runtime/server.py): on
the warm path aiohttp's client costs about a quarter of a millisecond a call
(request objects, URL parsing, timers, tracing hooks, a task per request body), and a
warm call crosses two such hops. Both ends are ours and speak plain HTTP/1.1
(Content-Length or chunked answers), so the client needs little: write the request in
one go, read the head, then the body whole or as it arrives.

With an ssl context (core/httptls.py client_ssl_context) it speaks mutual TLS to
https:// URLs only, and verifies `server_hostname` (the component it means to reach)
on the server's certificate, whatever address it dials; the handshake is paid once
per kept connection. Without one it speaks plaintext to http:// URLs only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from thaw.core.unixpeer import check_peer

# Must stay below the data plane's keep-alive timeout (aiohttp's default, 75 s): an
# idle connection is dropped here before the node closes it under a request.
IDLE_SECONDS = 30.0
# How often kept connections past IDLE_SECONDS are looked for and closed: one is closed
# at most IDLE_SECONDS + SWEEP_SECONDS after its last use.
SWEEP_SECONDS = IDLE_SECONDS / 2
CONNECT_TIMEOUT_SECONDS = 5.0
MAX_HEAD_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024
# Bodies up to this size are sent with their head in one write (one syscall).
SINGLE_WRITE_MAX_BYTES = 64 * 1024


class NodeConnectionError(ConnectionError):
    """The node could not be reached, or its answer broke off or made no sense."""


class _StaleConnection(NodeConnectionError):
    """A kept connection the node had already closed: it took nothing of the request."""


# A target: (host, port) over TCP, or the path of a unix socket.
Target = tuple[str, int] | str


class _Connection:
    __slots__ = ("key", "reader", "writer", "idle_since")

    def __init__(self, key: Target, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.key = key
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        return (not self.writer.is_closing() and not self.reader.at_eof()
                and now - self.idle_since < IDLE_SECONDS)

    def close(self) -> None:
        self.writer.close()


class NodeAnswer:
    """An answer whose head has arrived; the body is read whole or as it comes."""

    def __init__(self, client: NodeClient, conn: _Connection, status: int,
                 headers: CIMultiDict[str]) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._keep_alive = "close" not in headers.get("Connection", "").lower()
        self._left = self.content_length  # body bytes not read yet (Content-Length)
        self._done = self.content_length == 0
        self._body: bytes | None = b"" if self._done else None

    async def read(self) -> bytes:
        """The whole body (kept: reading again returns it). Once it is read, the
        connection goes back for reuse (an empty body is read as soon as it arrives)."""
        if self._body is not None:
            self.release()
            return self._body
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        self._body = b"".join(parts)
        return self._body

    async def readany(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        if self._done:
            return b""
        conn = self._conn
        if conn is None:
            raise NodeConnectionError("the answer was closed before its end")
        try:
            if self._chunked:
                data = await self._next_chunk(conn.reader)
            elif self._left is not None:
                data = await conn.reader.read(min(self._left, READ_CHUNK_BYTES))
                if not data:
                    raise NodeConnectionError("the node closed the connection mid-answer")
                self._left -= len(data)
                self._done = self._left == 0
            else:  # no length, not chunked: the body ends with the connection
                data = await conn.reader.read(READ_CHUNK_BYTES)
                self._keep_alive = False
                self._done = not data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise NodeConnectionError(f"the node's answer broke off: {exc}") from exc
        except OSError as exc:
            self.close()
            raise NodeConnectionError(f"the node's answer broke off: {exc}") from exc
        if self._done:
            self.release()
        return data

    async def _next_chunk(self, reader: asyncio.StreamReader) -> bytes:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers: none we use
                self._done = True
                return b""
            data = await reader.readexactly(size + 2)
            if data[-2:] != b"\r\n":
                raise ValueError("chunk not followed by CRLF")
            if size:
                return data[:-2]

    def release(self) -> None:
        """Done with the answer: its connection is reused if the body was read to its
        end, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive:
            self._client._put_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (the node sees the caller leave)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _parse_head(head: bytes) -> tuple[int, CIMultiDict[str]]:
    """(status, headers) of an answer's head, its blank line included."""
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"bad status line {status_line[:100]!r}")
    status = int(parts[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"bad header line {line[:100]!r}")
        headers.add(name.strip(), value.strip())
    return status, headers


class NodeClient:
    def __init__(self, connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        if tls is not None and not server_hostname:
            raise ValueError("a TLS client verifies a name: give server_hostname")
        self.connect_timeout = connect_timeout
        self.tls = tls
        self.server_hostname = server_hostname if tls is not None else None
        self._scheme = "https" if tls is not None else "http"
        self._idle: dict[Target, list[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._targets: dict[str, tuple[tuple[str, int], str]] = {}

    def _target(self, url: str) -> tuple[tuple[str, int], str]:
        """((host, port), path) of an http:// URL (https:// with TLS), parsed once per
        URL."""
        found = self._targets.get(url)
        if found is None:
            parts = urlsplit(url)
            if parts.scheme != self._scheme or not parts.hostname:
                if parts.scheme in ("http", "https") and parts.hostname:
                    # Never plaintext where TLS is configured, and the reverse.
                    raise NodeConnectionError(
                        f"{url!r} is {parts.scheme}:// but this client speaks "
                        f"{self._scheme}:// only ("
                        + ("internal calls use mutual TLS)" if self.tls is not None
                           else "it has no certificate: insecure_internal)"))
                raise NodeConnectionError(f"not an {self._scheme}:// URL: {url!r}")
            path = parts.path or "/"
            if parts.query:
                path += f"?{parts.query}"
            if any(c.isspace() or ord(c) < 0x20 for c in path):
                raise NodeConnectionError(f"not a valid request target: {path!r}")
            found = ((parts.hostname,
                      parts.port or (443 if self.tls is not None else 80)), path)
            if len(self._targets) > 10_000:
                self._targets.clear()
            self._targets[url] = found
        return found

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> NodeAnswer:
        """Send a POST to an http:// (with TLS: https://) URL; returns once the
        answer's head has arrived."""
        key, path = self._target(url)
        return await self._post(key, f"{key[0]}:{key[1]}", path, body, headers)

    async def post_unix(self, socket_path: str, path: str, body: bytes,
                        headers: Mapping[str, str]) -> NodeAnswer:
        """Send a POST over a unix socket; `path` is the request target ("/invoke")."""
        if any(c.isspace() or ord(c) < 0x20 for c in path):
            raise NodeConnectionError(f"not a valid request target: {path!r}")
        return await self._post(socket_path, "localhost", path, body, headers)

    async def _post(self, key: Target, host: str, path: str, body: bytes,
                    headers: Mapping[str, str]) -> NodeAnswer:
        head = [f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            head.append(f"{name}: {value.replace(chr(13), '').replace(chr(10), '')}\r\n")
        head.append("\r\n")
        request_head = "".join(head).encode("latin-1")
        conn = self._reusable(key)
        stale: _StaleConnection | None = None
        if conn is not None:
            try:
                return await self._exchange(conn, request_head, body)
            except _StaleConnection as exc:
                # The node closed this idle connection as it was reused; the request
                # goes again, once, on a fresh connection.
                stale = exc
        try:
            fresh = await self._connect(key)
        except NodeConnectionError as exc:
            if stale is None:
                raise
            # The kept connection may have carried the request before it broke: this
            # is no refusal of a request never sent (its cause is the broken one).
            raise NodeConnectionError(f"{stale}; then {exc}") from stale
        try:
            return await self._exchange(fresh, request_head, body)
        except _StaleConnection as exc:
            raise NodeConnectionError(str(exc)) from exc

    def _reusable(self, key: Target) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _connect(self, key: Target) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if isinstance(key, str):
                    reader, writer = await asyncio.open_unix_connection(
                        key, limit=MAX_HEAD_BYTES)
                    try:
                        check_peer(writer.get_extra_info("socket"), key)
                    except OSError:
                        writer.close()
                        raise
                else:
                    reader, writer = await asyncio.open_connection(
                        key[0], key[1], limit=MAX_HEAD_BYTES, ssl=self.tls,
                        server_hostname=self.server_hostname)
        except (OSError, TimeoutError) as exc:
            where = key if isinstance(key, str) else f"{key[0]}:{key[1]}"
            raise NodeConnectionError(
                f"cannot connect to {where}: {exc or 'timed out'}") from exc
        return _Connection(key, reader, writer)

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> NodeAnswer:
        try:
            return await self._send_and_read_head(conn, head, body)
        except asyncio.CancelledError:
            conn.close()  # halfway through an exchange: never reusable
            raise

    async def _send_and_read_head(self, conn: _Connection, head: bytes, body: bytes
                                  ) -> NodeAnswer:
        try:
            if len(body) <= SINGLE_WRITE_MAX_BYTES:
                conn.writer.write(head + body)
            else:
                conn.writer.write(head)
                conn.writer.write(body)
            await conn.writer.drain()
        except OSError as exc:
            conn.close()
            raise _StaleConnection(f"the node closed the connection: {exc}") from exc
        try:
            # The whole head in one read: one wake-up and no per-line awaits.
            head_bytes = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            conn.close()
            message = f"the node closed the connection: {exc}"
            if not exc.partial:  # not a byte of an answer: the node took nothing
                raise _StaleConnection(message) from exc
            raise NodeConnectionError(message) from exc
        except OSError as exc:
            conn.close()
            raise NodeConnectionError(f"the node closed the connection: {exc}") from exc
        except asyncio.LimitOverrunError as exc:
            conn.close()
            raise NodeConnectionError("the node's answer head is too long") from exc
        try:
            status, headers = _parse_head(head_bytes)
        except ValueError as exc:
            conn.close()
            raise NodeConnectionError(f"the node's answer made no sense: {exc}") from exc
        return NodeAnswer(self, conn, status, headers)

    def _put_back(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Close the kept connections idle past IDLE_SECONDS: the next call would only
        discard them, and until it comes they hold a descriptor here and a connection
        at the node. One timer for the whole client, armed while any is kept."""
        self._sweeper = None
        now = time.monotonic()
        for key in list(self._idle):
            kept = []
            for conn in self._idle[key]:
                if conn.usable(now):
                    kept.append(conn)
                else:
                    conn.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(
                SWEEP_SECONDS, self._sweep)

    def forget(self, key: Target) -> None:
        """Close the idle connections to a target that is gone (an instance stopped)."""
        for conn in self._idle.pop(key, []):
            conn.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
                with contextlib.suppress(Exception):
                    await conn.writer.wait_closed()
        self._idle.clear()

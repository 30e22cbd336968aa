"""The bounds an HTTP/1.1 server holds its clients to (core/http1protocol.py; the
gateway sets its aiohttp listener to the same, gateway/limits.py): the size of a
request's head, how long a connection may take to send one, how long it may sit idle
or take over its body, and how many connections one address may hold open.

Why each: a head is kept in memory until it is complete, so an unbounded one grows
the server without end; a connection that sends nothing, or a head a byte at a time
(slowloris), holds a socket and its buffers for as long as the server lets it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

# aiohttp's own defaults for one line of the head (its max_line_size and
# max_field_size); the gateway's settings start from the same numbers.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 100
MAX_HEAD_BYTES = 64 * 1024
# A head (request line and headers) arrives in one packet from any ordinary client;
# this much is for a very slow link, not for a client that trickles bytes.
HEADER_TIMEOUT_SECONDS = 30.0
# aiohttp's former keep-alive default, and what the gateway's node client expects of
# a node's data plane (it drops kept connections well before this).
IDLE_TIMEOUT_SECONDS = 75.0
BODY_TIMEOUT_SECONDS = 60.0
# A body trickled a byte at a time never pauses long: this bounds the whole of it
# (a 32 MiB body needs about 110 KiB/s).
BODY_DEADLINE_SECONDS = 300.0
# After a refusal (431, 413, 408, the cap's 429) what the client still sends is read and
# dropped this long before the close: closing with its bytes unread would send a
# reset, which can destroy the answer before the client reads it.
LINGER_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """What one connection may send and how slowly (every bound > 0)."""

    max_request_line_bytes: int = MAX_LINE_BYTES
    """The request target (path and query): 431 past it."""
    max_header_bytes: int = MAX_LINE_BYTES
    """One header, name and value: 431 past it."""
    max_headers: int = MAX_HEADERS
    """Headers in one request: 431 past it."""
    max_head_bytes: int = MAX_HEAD_BYTES
    """The whole head (request line and every header): 431 past it."""
    header_timeout: float = HEADER_TIMEOUT_SECONDS
    """Seconds a request's head may take from its first byte (a new connection's from
    its opening); then 408 if part of it came, and the connection closes."""
    idle_timeout: float = IDLE_TIMEOUT_SECONDS
    """Seconds a kept-alive connection may wait for its next request; then it closes."""
    body_timeout: float = BODY_TIMEOUT_SECONDS
    """Seconds a request's body may go without a byte; then 408 and the connection
    closes."""
    body_deadline: float = BODY_DEADLINE_SECONDS
    """Seconds a request's whole body may take from the end of its head; then 408 and
    the connection closes."""

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


# The longest request target httptools' URL parser takes (it refuses longer ones).
MAX_URL_BYTES = 65535
# A gateway's max_request_line_bytes stays this far below MAX_URL_BYTES: the data
# plane's own prefix goes in front of the path the gateway forwards.
MAX_GATEWAY_LINE_BYTES = 32 * 1024
# For a server only platform components call (the node's data plane, behind mutual
# TLS): any head the gateway forwards.
FORWARDED_LIMITS = HTTPLimits(max_request_line_bytes=MAX_URL_BYTES,
                              max_head_bytes=4 * 1024 * 1024)


class AddressCap:
    """At most `most` open connections per client address, counted across every
    listener that shares this object.

    Counted per transport, so a connection handed from one protocol to another (the
    gateway's fast lane to aiohttp) is counted once: `admit` again is a no-op, and
    `release` of whichever protocol sees it close frees its place."""

    def __init__(self, most: int) -> None:
        if most < 1:
            raise ValueError(f"the connection cap must be >= 1, got {most}")
        self.most = most
        self._open: dict[str, set[int]] = {}

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count this connection in; False when its address is at the cap already."""
        address = address_of(transport)
        held = self._open.setdefault(address, set())
        if id(transport) in held:
            return True
        if len(held) >= self.most:
            if not held:
                del self._open[address]
            return False
        held.add(id(transport))
        return True

    def release(self, transport: asyncio.BaseTransport) -> None:
        address = address_of(transport)
        held = self._open.get(address)
        if held is None:
            return
        held.discard(id(transport))
        if not held:
            del self._open[address]

    def open_from(self, address: str) -> int:
        """Connections counted for `address` now."""
        return len(self._open.get(address, ()))


def address_of(transport: asyncio.BaseTransport) -> str:
    """The client's address (its IP, without the port); "" when the socket has none."""
    peer: Any = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


# The answer to a connection past its address's cap, sent before its request is read
# (a client may send it any time; it says why before the connection closes).
CAP_REFUSAL = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
               b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b")


def refusal_bytes(most: int) -> bytes:
    body = (b'{"error": {"code": "too_many_connections", "message": "this address has '
            b'%d connections open, the most allowed (max_connections_per_address)"}}'
            % most)
    return CAP_REFUSAL % (len(body), body)

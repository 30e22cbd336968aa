"""core/http1limits.py with core/http1server.py: the bounds a server built without a
gateway in front holds (the node's data plane takes any head the gateway forwards,
and still closes silent and slow clients), and the address cap's bookkeeping."""

from __future__ import annotations

import asyncio
from typing import Any

from thaw.core.http1limits import FORWARDED_LIMITS, AddressCap, HTTPLimits
from thaw.core.http1server import HTTPServer, Request, Response, Router


def _router() -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        return Response(200, str(len(request.path)).encode(), {})

    router.add_prefix("GET", "/", echo)
    return router


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(1 << 20), 20)
    finally:
        writer.close()


async def test_a_forwarded_head_may_carry_a_long_target() -> None:
    server = HTTPServer(_router())
    assert server.limits == FORWARDED_LIMITS
    port = await server.start("127.0.0.1", 0)
    try:
        path = "/" + "p" * 40_000  # past any gateway's max_request_line_bytes
        answer = await _exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"40001")
    finally:
        await server.close(1.0)


async def test_timeouts_hold_without_a_gateway_in_front() -> None:
    server = HTTPServer(_router(), limits=HTTPLimits(header_timeout=0.3, body_timeout=0.3,
                                                     idle_timeout=0.3))
    port = await server.start("127.0.0.1", 0)
    try:
        silent = await _exchange(port, b"")
        assert silent == b""
        partial = await _exchange(port, b"GET / HTTP/1.1\r\nHo")
        assert partial.startswith(b"HTTP/1.1 408")
    finally:
        await server.close(1.0)


class _Transport(asyncio.BaseTransport):
    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.host, 1234) if name == "peername" else default


def test_the_cap_counts_each_connection_once_per_address() -> None:
    cap = AddressCap(2)
    a1, a2, a3, b1 = (_Transport("10.0.0.1"), _Transport("10.0.0.1"),
                      _Transport("10.0.0.1"), _Transport("10.0.0.2"))
    assert cap.admit(a1) and cap.admit(a1)  # a hand-off admits it again: no-op
    assert cap.admit(a2) and not cap.admit(a3)
    assert cap.admit(b1)  # another address has places of its own
    assert cap.open_from("10.0.0.1") == 2
    cap.release(a1)
    cap.release(a1)  # released twice: still one place freed
    assert cap.admit(a3) and cap.open_from("10.0.0.1") == 2
    for transport in (a2, a3, b1):
        cap.release(transport)
    assert cap.open_from("10.0.0.1") == cap.open_from("10.0.0.2") == 0


async def test_a_pipelined_head_is_not_charged_for_the_body_before_it() -> None:
    """A head split over reads, then one read with its end, a body far larger than
    max_head_bytes and the next request's head begun: both answered."""
    router = Router()

    async def echo_size(request: Request) -> Response:
        return Response(200, str(len(request.body)).encode(), {})

    router.add("POST", "/x", echo_size)
    server = HTTPServer(router, limits=HTTPLimits(max_head_bytes=4096))
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"b" * 100_000
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # its own read, most likely (either way it must pass)
        writer.write(b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
                     + b"POST /x HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"Content-Length: 2\r\n\r\nhi")
        await writer.drain()
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 2:
            chunk = await asyncio.wait_for(reader.read(65536), 20)
            assert chunk, answers
            answers += chunk
        assert answers.endswith(b"2") and b"100000" in answers
        writer.close()
    finally:
        await server.close(1.0)

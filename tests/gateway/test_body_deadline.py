"""body_deadline_seconds: a request body trickled a byte at a time (never pausing
long enough for body_timeout_seconds) is cut at the deadline with 408 and its
connection closed, on the fast lane (core/http1protocol.py), on aiohttp (gateway/
request.py `read_body`, served with the gateway's own protocol from gateway/limits.py)
and for bundle uploads (gateway/app.py); a body that keeps arriving within the deadline
is unaffected. Real sockets; the only time bound is a generous hang guard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.gateway.limits_helpers import GUARD_SECONDS
from thaw.core.errors import InvalidArgument
from thaw.core.http1limits import HTTPLimits
from thaw.core.http1server import HTTPServer, Request, Response, Router
from thaw.gateway.app import read_bundle_upload
from thaw.gateway.config import GatewaySettings
from thaw.gateway.limits import aiohttp_protocol, http_limits
from thaw.gateway.request import BODY_DEADLINE_KEY, BODY_TIMEOUT_KEY, read_body
from thaw.gateway.state import CONFIG_KEY

# Between two trickled bytes: far below any body_timeout used here.
GAP_SECONDS = 0.05


async def _trickle(port: int, head: bytes, size: int) -> bytes:
    """Send `head`, then the body a byte at a time until the server answers (or all
    `size` bytes are sent); everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = bytearray()
    try:
        async with asyncio.timeout(GUARD_SECONDS):
            writer.write(head)
            sent = 0
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), GAP_SECONDS)
                except TimeoutError:
                    if sent < size:
                        writer.write(b"x")
                        sent += 1
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data.extend(chunk)
                if sent == size and b"\r\n\r\n" in data:
                    break  # the whole body went: the answer came, nothing is cut
    finally:
        writer.close()
    return bytes(data)


def _post(path: str, size: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer thaw_t\r\n"
            f"Content-Length: {size}\r\n{extra}\r\n").encode()


@pytest.fixture
async def lane() -> AsyncIterator[int]:
    """core/http1server.py answering a POST with its body's length."""
    router = Router()

    async def length(request: Request) -> Response:
        return Response(200, str(len(request.body)).encode(), {})

    router.add_prefix("POST", "/", length)
    server = HTTPServer(router, limits=HTTPLimits(body_timeout=60, body_deadline=1))
    port = await server.start("127.0.0.1", 0)
    yield port
    await server.close(1.0)


async def test_the_lane_cuts_a_trickled_body_at_the_deadline(lane: int) -> None:
    answer = await _trickle(lane, _post("/f", 100_000), 100_000)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:120]
    assert b"body_deadline_seconds" in answer
    # _trickle returns once the server closed: reaching here is the close.


async def test_the_lane_serves_a_steady_body_within_the_deadline() -> None:
    router = Router()

    async def length(request: Request) -> Response:
        return Response(200, str(len(request.body)).encode(), {})

    router.add_prefix("POST", "/", length)
    server = HTTPServer(router, limits=HTTPLimits(body_timeout=60, body_deadline=60))
    port = await server.start("127.0.0.1", 0)
    try:
        answer = await _trickle(port, _post("/f", 20), 20)
    finally:
        await server.close(1.0)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n20"), answer


def test_the_setting_reaches_the_lane() -> None:
    settings = GatewaySettings.load(body_deadline_seconds=7)
    assert http_limits(settings).body_deadline == 7
    assert GatewaySettings.load().body_deadline_seconds == 300
    with pytest.raises(InvalidArgument, match="body_deadline_seconds"):
        GatewaySettings.load(body_deadline_seconds=0)


@pytest.fixture
async def aiohttp_port() -> AsyncIterator[int]:
    """aiohttp with the gateway's protocol (its limits, its linger), routes reading a
    body with read_body and a bundle with read_bundle_upload."""
    settings = GatewaySettings.load(body_deadline_seconds=1, body_timeout_seconds=60)
    app = web.Application()
    app[CONFIG_KEY] = settings
    app[BODY_TIMEOUT_KEY] = settings.body_timeout_seconds
    app[BODY_DEADLINE_KEY] = settings.body_deadline_seconds

    async def body(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await read_body(request, 1 << 20))))

    async def bundle(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await read_bundle_upload(request))))

    app.router.add_post("/body", body)
    app.router.add_post("/bundle", bundle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(aiohttp_protocol(runner.server, settings, None),
                                      "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await runner.cleanup()


async def test_aiohttp_cuts_a_trickled_body_at_the_deadline(aiohttp_port: int) -> None:
    answer = await _trickle(aiohttp_port, _post("/body", 100_000), 100_000)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:120]
    assert b"body_deadline_seconds" in answer


async def test_aiohttp_serves_a_steady_body_within_the_deadline(
        aiohttp_port: int) -> None:
    answer = await _trickle(aiohttp_port, _post("/body", 5), 5)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n5"), answer


@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
async def test_a_trickled_bundle_upload_is_cut_at_the_deadline(
        aiohttp_port: int, multipart: bool) -> None:
    size = 100_000
    if multipart:
        part = b'--b\r\nContent-Disposition: form-data; name="bundle"\r\n\r\n'
        head = _post("/bundle", len(part) + size,
                     "Content-Type: multipart/form-data; boundary=b\r\n") + part
    else:
        head = _post("/bundle", size, "Content-Type: application/gzip\r\n")
    answer = await _trickle(aiohttp_port, head, size)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:120]
    text = answer.partition(b"\r\n\r\n")[2].decode()
    assert "body_deadline_seconds" in text, text
    # A multipart upload is read part by part (gateway/app.py), named as a bundle.
    assert ("the bundle" in text) == multipart, text

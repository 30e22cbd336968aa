"""The gateway's HTTP/1.1 client for node data planes, against a real aiohttp server:
whole and chunked answers, keep-alive reuse, connections the server closed."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from thaw.gateway.nodeclient import NodeClient, NodeConnectionError

PEERS: web.AppKey[list[object]] = web.AppKey("peers")
STEP = web.AppKey("step", asyncio.Event)


async def echo(request: web.Request) -> web.Response:
    request.app[PEERS].append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
    body = await request.read()
    return web.Response(body=body[::-1], headers={
        "Content-Type": "application/octet-stream",
        "X-Seen": request.headers.get("X-Thing", "")})


async def stream(request: web.Request) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(b"data: 1\n\n")
    await request.app[STEP].wait()  # the test lets the rest go after it read the first
    await out.write(b"data: 2\n\n")
    await out.write_eof()
    return out


async def closing(request: web.Request) -> web.Response:
    return web.Response(body=b"bye", headers={"Connection": "close"})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, web.Application]]:
    app = web.Application()
    app[PEERS] = []
    app[STEP] = asyncio.Event()
    app.router.add_post("/echo", echo)
    app.router.add_post("/stream", stream)
    app.router.add_post("/closing", closing)
    runner = web.AppRunner(app, keepalive_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", app
    await runner.cleanup()


async def test_whole_answers_on_one_kept_connection(
        server: tuple[str, web.Application]) -> None:
    url, app = server
    client = NodeClient()
    for body in (b"abc", os.urandom(300_000)):
        answer = await client.post(f"{url}/echo", body, {"X-Thing": "yes"})
        assert answer.status == 200 and answer.headers["x-seen"] == "yes"
        assert answer.content_length == len(body)
        assert await answer.read() == body[::-1]
        assert await answer.read() == body[::-1]  # kept
    peers: list[object] = app[PEERS]
    assert len(set(peers)) == 1  # the second call reused the connection
    await client.close()


async def test_a_chunked_answer_arrives_as_it_is_written(
        server: tuple[str, web.Application]) -> None:
    url, app = server
    client = NodeClient()
    answer = await client.post(f"{url}/stream", b"", {})
    assert answer.content_length is None
    assert await answer.readany() == b"data: 1\n\n"  # before the server wrote the rest
    app[STEP].set()
    rest = b""
    while chunk := await answer.readany():
        rest += chunk
    assert rest == b"data: 2\n\n"
    await client.close()


async def test_connections_the_server_closed_are_not_reused(
        server: tuple[str, web.Application]) -> None:
    url, app = server
    client = NodeClient()
    answer = await client.post(f"{url}/closing", b"", {})
    assert await answer.read() == b"bye"
    assert (await (await client.post(f"{url}/echo", b"x", {})).read()) == b"x"
    await asyncio.sleep(0.5)  # past the server's keep-alive timeout: it hangs up
    assert (await (await client.post(f"{url}/echo", b"y", {})).read()) == b"y"
    peers: list[object] = app[PEERS]
    assert len(set(peers)) == 2
    await client.close()


async def test_an_unreachable_node_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = NodeClient(connect_timeout=2)
    with pytest.raises(NodeConnectionError):
        await client.post(f"http://127.0.0.1:{port}/x", b"", {})
    await client.close()


@pytest.mark.parametrize("answer", [
    b"NOT-HTTP 200 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
])
async def test_an_answer_head_that_makes_no_sense_is_a_connection_error(answer: bytes) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = NodeClient()
    with pytest.raises(NodeConnectionError, match="made no sense"):
        await client.post(f"http://127.0.0.1:{port}/x", b"", {})
    await client.close()
    server.close()


async def test_headers_are_read_case_insensitively_with_repeats(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    client = NodeClient()
    answer = await client.post(f"{url}/echo", b"abc", {"X-Thing": "seen"})
    assert answer.status == 200 and await answer.read() == b"cba"
    assert answer.headers["x-seen"] == "seen" and answer.headers["X-SEEN"] == "seen"
    assert answer.headers["Content-Type"] == "application/octet-stream"
    await client.close()


async def test_a_kept_connection_that_breaks_is_no_refusal_even_if_the_next_is_refused(
        ) -> None:
    # The node answers one call on a kept connection, takes the second and dies: the
    # second may have run, so its error must not read as a refused (never sent) call.
    from thaw.core.http1 import NodeClient as Http1Client
    from thaw.core.http1 import NodeConnectionError

    calls = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            calls += 1
            if calls == 2:
                server.close()  # no new connections: they are refused
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Http1Client()
    try:
        first = await client.post(f"http://127.0.0.1:{port}/x", b"{}", {})
        assert first.status == 200 and await first.read() == b"{}"
        first.release()
        with pytest.raises(NodeConnectionError) as raised:
            await client.post(f"http://127.0.0.1:{port}/x", b"{}", {})
        assert calls == 2  # the node took the second call
        assert not isinstance(raised.value.__cause__, ConnectionRefusedError)
    finally:
        await client.close()
        server.close()

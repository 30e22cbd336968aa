"""core/http1server.py against real clients on loopback: httpx, and raw sockets where the
bytes on the wire matter (pipelining, malformed requests, a client leaving)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from thaw.core.http1server import HTTPServer, Request, Response, Router, Streaming


class Gate:
    """Shared state between a test and its server's handlers."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.closed = asyncio.Event()
        self.started = asyncio.Event()


def make_router(gate: Gate) -> Router:
    router = Router()

    async def echo(request: Request) -> Response:
        return Response(200, request.body, {
            "Content-Type": "application/octet-stream",
            "X-Method": request.method, "X-Path": request.path,
            "X-Query": request.query_string,
            "X-Header": request.headers.get("x-test", ""),
            "X-Peer": str(request.peer[0])})

    async def stream(request: Request) -> Streaming:
        count = int(request.query.get("n", "3"))

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(count):
                yield f"chunk {i}\n".encode()

        return Streaming(chunks(), 200, {"Content-Type": "application/x-ndjson"})

    async def forever(request: Request) -> Streaming:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                yield b"first\n"
                gate.started.set()
                await asyncio.Event().wait()  # like a log follower with no new line
                yield b"never\n"
            finally:
                gate.closed.set()

        return Streaming(chunks())

    async def broken(request: Request) -> Streaming:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"part\n"
            raise ConnectionResetError("the instance went away")

        return Streaming(chunks())

    async def fail(request: Request) -> Response:
        raise RuntimeError("a bug")

    async def slow(request: Request) -> Response:
        gate.started.set()
        await gate.release.wait()
        return Response(200, b"done")

    router.add("POST", "/echo", echo)
    router.add("GET", "/echo", echo)
    router.add_prefix("POST", "/prefix/", echo)
    router.add("GET", "/stream", stream)
    router.add("GET", "/forever", forever)
    router.add("GET", "/broken", broken)
    router.add("GET", "/fail", fail)
    router.add("GET", "/slow", slow)
    return router


@contextlib.contextmanager
def in_thread(make: Callable[[], HTTPServer]
              ) -> Iterator[tuple[asyncio.AbstractEventLoop, HTTPServer, int]]:
    """The server `make()` builds, on its own loop in a thread, so that the tests can
    use blocking clients; (loop, server, port)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            holder["server"] = make()
            holder["port"] = await holder["server"].start("127.0.0.1", 0)
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield loop, holder["server"], holder["port"]
    finally:
        asyncio.run_coroutine_threadsafe(holder["server"].close(grace=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def served() -> Iterator[tuple[asyncio.AbstractEventLoop, str, int, Gate, HTTPServer]]:
    gates: list[Gate] = []

    def make() -> HTTPServer:
        gates.append(Gate())  # on the server's loop: its events belong there
        return HTTPServer(make_router(gates[0]), max_body=1024)

    with in_thread(make) as (loop, server, port):
        yield loop, f"http://127.0.0.1:{port}", port, gates[0], server


def raw_exchange(port: int, data: bytes, until_closed: bool = True,
                 timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                part = sock.recv(65536)
            except TimeoutError:
                if until_closed:
                    raise
                return received
            if not part:
                return received
            received += part


def test_keep_alive_bodies_headers_and_query(served) -> None:  # type: ignore[no-untyped-def]
    _, url, _, _, _ = served
    with httpx.Client(base_url=url) as client:
        first = client.post("/echo?a=1&b=x%20y", content=b"hello", headers={"X-Test": "v"})
        second = client.post("/prefix/some/tail", content=b"\x00" * 1000)
        assert first.status_code == 200 and first.content == b"hello"
        assert first.headers["x-method"] == "POST" and first.headers["x-path"] == "/echo"
        assert first.headers["x-query"] == "a=1&b=x%20y" and first.headers["x-header"] == "v"
        assert first.headers["x-peer"] == "127.0.0.1"
        assert second.content == b"\x00" * 1000
        assert second.headers["x-path"] == "/prefix/some/tail"
        # One connection served both.
        assert first.extensions["network_stream"] is second.extensions["network_stream"]


def test_a_chunked_request_body_arrives_whole(served) -> None:  # type: ignore[no-untyped-def]
    _, url, _, _, _ = served

    def parts() -> Iterator[bytes]:
        yield b"one,"
        yield b"two"

    answer = httpx.post(f"{url}/echo", content=parts())
    assert answer.status_code == 200 and answer.content == b"one,two"


def test_unknown_routes_and_methods_are_json_errors(served) -> None:  # type: ignore[no-untyped-def]
    _, url, _, _, _ = served
    missing = httpx.get(f"{url}/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.delete(f"{url}/echo")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_a_body_over_the_limit_is_413_before_it_is_read(served) -> None:  # type: ignore[no-untyped-def]
    _, url, port, _, _ = served
    answer = httpx.post(f"{url}/echo", content=b"x" * 2048)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "payload_too_large"
    # Announced but never sent: refused from the head alone, and the connection closes.
    raw = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in raw


def test_a_chunked_body_over_the_limit_is_413(served) -> None:  # type: ignore[no-untyped-def]
    _, url, _, _, _ = served

    def parts() -> Iterator[bytes]:
        for _ in range(4):
            yield b"y" * 512

    answer = httpx.post(f"{url}/echo", content=parts())
    assert answer.status_code == 413


def test_malformed_requests_get_400_and_a_closed_connection(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port, _, _ = served
    raw = raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")
    upgrade = raw_exchange(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: websocket\r\n\r\n")
    assert upgrade.startswith(b"HTTP/1.1 400 ") and b"upgrade" in upgrade.lower()


def test_pipelined_requests_are_answered_in_order(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port, _, _ = served
    requests = b"".join(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
        for b in (b"first", b"second", b"third"))
    raw = raw_exchange(port, requests + b"GET /echo HTTP/1.1\r\nHost: x\r\n"
                                        b"Connection: close\r\n\r\n")
    answers = raw.split(b"HTTP/1.1 200 OK")[1:]
    assert len(answers) == 4
    assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers[:3]] == [b"first", b"second", b"third"]
    assert b"Connection: close" in answers[3]


def test_http_1_0_and_connection_close_end_the_connection(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port, _, _ = served
    old = raw_exchange(port, b"GET /echo HTTP/1.0\r\n\r\n")  # returns only once closed
    assert old.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in old


def test_expect_100_continue(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port, _, _ = served
    raw = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                             b"Content-Length: 2\r\nConnection: close\r\n\r\nok")
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert raw.endswith(b"ok")


def test_a_stream_arrives_chunk_by_chunk(served) -> None:  # type: ignore[no-untyped-def]
    _, url, port, _, _ = served
    with httpx.stream("GET", f"{url}/stream?n=4") as answer:
        assert answer.headers["transfer-encoding"] == "chunked"
        assert list(answer.iter_lines()) == [f"chunk {i}" for i in range(4)]
    raw = raw_exchange(port, b"GET /stream?n=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.endswith(b"8\r\nchunk 0\n\r\n8\r\nchunk 1\n\r\n0\r\n\r\n")


def test_a_client_leaving_ends_a_waiting_stream(served) -> None:  # type: ignore[no-untyped-def]
    loop, _, port, gate, _ = served
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while b"first" not in received:
        part = sock.recv(65536)
        assert part, received
        received += part
    asyncio.run_coroutine_threadsafe(gate.started.wait(), loop).result(5)
    sock.close()
    # The generator, blocked waiting, was cancelled and its cleanup ran.
    asyncio.run_coroutine_threadsafe(asyncio.wait_for(gate.closed.wait(), 5), loop).result(10)


def test_a_stream_that_breaks_cuts_the_connection(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port, _, _ = served
    raw = raw_exchange(port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ") and b"part\n" in raw
    assert not raw.endswith(b"0\r\n\r\n")  # no end of stream: the caller sees it cut


def test_a_failing_handler_is_500_and_the_connection_serves_on(served) -> None:  # type: ignore[no-untyped-def]
    _, url, _, _, _ = served
    with httpx.Client(base_url=url) as client:
        failed = client.get("/fail")
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal"
        again = client.get("/echo")
        assert again.status_code == 200
        assert failed.extensions["network_stream"] is again.extensions["network_stream"]


def test_close_lets_an_answer_in_progress_finish(served) -> None:  # type: ignore[no-untyped-def]
    loop, url, port, gate, server = served
    result: dict[str, httpx.Response] = {}
    caller = threading.Thread(target=lambda: result.update(r=httpx.get(f"{url}/slow")))
    caller.start()
    asyncio.run_coroutine_threadsafe(gate.started.wait(), loop).result(5)
    closing = asyncio.run_coroutine_threadsafe(server.close(grace=5), loop)
    loop.call_soon_threadsafe(gate.release.set)
    closing.result(10)
    caller.join(10)
    assert result["r"].status_code == 200 and result["r"].content == b"done"
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(f"{url}/echo", timeout=2)


def test_closing_with_a_linger_answers_a_kept_connection_then_closes_it(served) -> None:  # type: ignore[no-untyped-def]
    """A call sent on a kept connection after close() began is answered (with
    `Connection: close`), not cut: it may be a call the client cannot send again."""
    loop, url, port, _, server = served
    with httpx.Client(base_url=url) as client:
        assert client.get("/echo").status_code == 200  # the connection is kept
        kept = client.get("/echo").extensions["network_stream"]
        closing = asyncio.run_coroutine_threadsafe(server.close(grace=0, linger=2), loop)
        time.sleep(0.2)
        late = client.post("/echo", content=b"late")
        assert late.status_code == 200 and late.content == b"late"
        assert late.extensions["network_stream"] is kept
        assert late.headers["connection"] == "close"
        closing.result(10)  # returns once the answered connection closed
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/echo", timeout=2)


def test_closing_closes_an_idle_connection_after_its_linger(served) -> None:  # type: ignore[no-untyped-def]
    loop, _, port, _, server = served
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    asyncio.run_coroutine_threadsafe(server.close(grace=0, linger=0.3), loop).result(10)
    sock.settimeout(5)
    assert sock.recv(1) == b""  # closed by the server, politely (no reset)
    sock.close()


def test_json_answers_are_json(served) -> None:  # type: ignore[no-untyped-def]
    _, url, _, _, _ = served
    answer = httpx.get(f"{url}/nope")
    assert answer.headers["content-type"].startswith("application/json")
    assert json.loads(answer.content)["error"]["message"] == "no route for /nope"


# ---- claim and hand-off (the gateway's fast lane) ------------------------------------

@pytest.fixture
def shared_port() -> Iterator[tuple[str, int]]:
    """A server that answers POST /lane/... itself (one through start_response) and
    hands every other request, with its connection, to aiohttp's low-level server."""
    from aiohttp import web

    from thaw.core.http1server import SENT

    async def by_aiohttp(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str("echo:" + message.data)
            return ws
        body = await request.read()
        return web.Response(body=b"aiohttp:" + body, headers={"X-Path": request.path})

    async def lane(request: Request) -> Any:
        if request.path == "/lane/written":
            writer = request.start_response(200, {"X-Written": "yes"})
            await writer.write(b"piece 1,")
            await writer.write(b"piece 2")
            await writer.end()
            return SENT
        if request.path == "/lane/twice":  # a stream that breaks, then an error answer
            writer = request.start_response(200, {})
            await writer.write(b"part")
            return Response(502, b"too late")
        if request.path == "/lane/sized":
            writer = request.start_response(200, {}, content_length=5)
            await writer.write(b"12345")
            await writer.end()
            return SENT
        return Response(200, b"lane:" + request.body)

    def claim(method: str, path: str, headers: dict[str, str]) -> bool:
        return method == "POST" and path.startswith("/lane/")

    def make() -> HTTPServer:
        router = Router()
        router.add_prefix("POST", "/lane/", lane)
        return HTTPServer(router, claim=claim, fallback=web.Server(by_aiohttp))

    with in_thread(make) as (_, _server, port):
        yield f"http://127.0.0.1:{port}", port


def test_claimed_requests_here_the_rest_to_the_fallback(shared_port) -> None:  # type: ignore[no-untyped-def]
    url, _ = shared_port
    with httpx.Client(base_url=url) as client:
        ours = client.post("/lane/x", content=b"one")
        assert ours.content == b"lane:one" and "server" not in ours.headers
        # The connection goes to aiohttp with this request's bytes, body included.
        theirs = client.post("/api/thing", content=b"two" * 1000)
        assert theirs.content == b"aiohttp:" + b"two" * 1000
        assert theirs.headers["x-path"] == "/api/thing"
        assert "aiohttp" in theirs.headers["server"]
        # ... and stays there.
        after = client.post("/lane/y", content=b"three")
        assert after.content == b"aiohttp:three"
        assert ours.extensions["network_stream"] is after.extensions["network_stream"]


def test_a_handed_off_body_arriving_in_pieces_is_whole(shared_port) -> None:  # type: ignore[no-untyped-def]
    _, port = shared_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                     b"Connection: close\r\n\r\n01234")
        import time

        time.sleep(0.2)
        sock.sendall(b"56789")
        received = b""
        while part := sock.recv(65536):
            received += part
    assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b"aiohttp:0123456789")


def test_a_request_pipelined_behind_a_claimed_one_is_refused_clearly(shared_port) -> None:  # type: ignore[no-untyped-def]
    _, port = shared_port
    raw = raw_exchange(port, b"POST /lane/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                             b"GET /api/b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"lane:" in raw
    assert b"HTTP/1.1 400 " in raw and b"pipelined" in raw


def test_handlers_can_write_their_answer(shared_port) -> None:  # type: ignore[no-untyped-def]
    url, port = shared_port
    with httpx.Client(base_url=url) as client:
        written = client.post("/lane/written")
        assert written.content == b"piece 1,piece 2" and written.headers["x-written"] == "yes"
        assert written.headers["transfer-encoding"] == "chunked"
        sized = client.post("/lane/sized")
        assert sized.content == b"12345" and sized.headers["content-length"] == "5"
        again = client.post("/lane/x", content=b"z")  # the connection is still good
        assert again.content == b"lane:z"
        assert written.extensions["network_stream"] is again.extensions["network_stream"]


def test_a_malformed_request_behind_a_good_one_is_refused_after_its_answer(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port, _, _ = served
    raw = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nfirst"
                             b" GARBAGE\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.index(b"firs") < raw.index(b"400 ")


def test_a_websocket_upgrade_goes_to_the_fallback(shared_port) -> None:  # type: ignore[no-untyped-def]
    import aiohttp

    url, _ = shared_port

    async def talk() -> str:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws") as ws:
            await ws.send_str("hi")
            message = await ws.receive(timeout=5)
            return str(message.data)

    assert asyncio.run(talk()) == "echo:hi"


def test_a_repeated_header_is_one_comma_joined_value(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port, _, _ = served
    raw = raw_exchange(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Test: a\r\nx-test: b\r\n"
                             b"Connection: close\r\n\r\n")
    assert b"\r\nX-Header: a, b\r\n" in raw


def test_an_answer_after_a_started_one_cuts_the_connection(shared_port) -> None:  # type: ignore[no-untyped-def]
    _, port = shared_port
    raw = raw_exchange(port, b"POST /lane/twice HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"part" in raw
    assert b"502" not in raw and b"too late" not in raw and not raw.endswith(b"0\r\n\r\n")

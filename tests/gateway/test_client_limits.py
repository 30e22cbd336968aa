"""The gateway's bounds on clients (gateway/limits.py, gateway/jsonbody.py,
core/http1limits.py), on real sockets against the gateway's own listeners run
in-process: with the fast lane in front of aiohttp (the default) and with aiohttp
alone. The routes' handlers never run here (every request is refused before them),
so the scheduler is a stand-in that answers nothing."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.gateway.limits_helpers import (
    GUARD_SECONDS,
    big_json,
    closed_within_guard,
    connect,
    deep_json,
    filled,
    read_answer,
    read_until_closed,
    request_bytes,
    send,
)
from thaw.core.http1limits import AddressCap, HTTPLimits
from thaw.gateway.app import make_app
from thaw.gateway.config import GatewaySettings
from thaw.gateway.jsonbody import (
    MAX_JSON_DEPTH,
    check_json,
    json_routes,
    loads,
    nesting_depth,
    nests_deeper_than,
    parse_json,
)
from thaw.gateway.limits import address_cap
from thaw.gateway.routes import build_document
from thaw.gateway.server import _listen

AUTH = ("Authorization", "Bearer thaw_test")


class NoScheduler:
    """Enough of SchedulerClient for the app to start; nothing is asked of it here."""

    def __init__(self) -> None:
        self.channel = grpc.aio.insecure_channel("127.0.0.1:9")

    async def close(self) -> None:
        await self.channel.close()


class Served:
    """A gateway's two listeners in a thread of their own; `port` is the main one."""

    def __init__(self, **settings: Any) -> None:
        self.config = GatewaySettings.load(**settings)
        self.port = 0
        self.cap: AddressCap | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._failed is not None:
            raise RuntimeError(f"the gateway did not start: {self._failed!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test's thread
            self._failed = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = make_app(self.config, scheduler=NoScheduler())  # type: ignore[arg-type]
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.cap = address_cap(self.config)
        listener, self.port = await _listen(app, runner, "127.0.0.1", 0, cap=self.cap)
        self._ready.set()
        await self._stop.wait()
        if isinstance(listener, asyncio.Server):
            listener.close()
        else:
            await listener.close(1.0)
        await runner.cleanup()

    def open_from_localhost(self) -> int:
        assert self.cap is not None and self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._count(), self._loop).result(10)

    async def _count(self) -> int:
        assert self.cap is not None
        return self.cap.open_from("127.0.0.1")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def gateway() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(**settings: Any) -> Served:
        started.append(Served(**settings))
        return started[-1]

    yield start
    for served in started:
        served.stop()


LANES = [pytest.param(True, id="fast-lane"), pytest.param(False, id="aiohttp-only")]


@pytest.mark.parametrize("fast_lane", LANES)
def test_a_head_past_the_limits_is_answered_431(gateway: Callable[..., Served],
                                                fast_lane: bool) -> None:
    gw = gateway(fast_lane=fast_lane, max_header_bytes=1024, max_headers=20,
                 max_request_line_bytes=512, max_head_bytes=4096)
    too_long = [AUTH, ("X-Big", "v" * 2000)]
    too_many = [AUTH, *((f"X-H{i}", "1") for i in range(40))]
    for headers, path in ((too_long, "/healthz"), (too_many, "/healthz"),
                          ([AUTH], "/healthz?" + "q" * 1000)):
        status, body = send(gw.port, request_bytes("GET", path, headers))
        assert status == 431, (path[:20], body)
        assert body["error"]["code"] == "headers_too_large"
    # Within every bound: served.
    status, body = send(gw.port, request_bytes("GET", "/healthz", [AUTH]))
    assert (status, body) == (200, {"status": "ok"})


def test_a_head_too_large_in_total_is_answered_431_before_it_ends(
        gateway: Callable[..., Served]) -> None:
    """Headers each within their bound but many: the lane counts the whole head, and
    a head sent in pieces that never ends is refused once past the bound."""
    gw = gateway(max_header_bytes=1024, max_headers=1000, max_head_bytes=8192)
    many = [AUTH, *((f"X-H{i}", "v" * 900) for i in range(20))]
    status, body = send(gw.port, request_bytes("GET", "/healthz", many))
    assert status == 431 and "8192" in body["error"]["message"]
    with connect(gw.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        answer = b""
        for _ in range(64):  # 64 pieces of 1 KiB: the server refuses well before
            try:
                sock.sendall(b"v" * 1024)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = closed_within_guard(sock)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


def test_aiohttp_alone_refuses_a_header_that_never_ends(
        gateway: Callable[..., Served]) -> None:
    gw = gateway(fast_lane=False, max_header_bytes=1024)
    with connect(gw.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        for _ in range(512):
            try:
                sock.sendall(b"v" * 1024)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = closed_within_guard(sock)
    # aiohttp answers a head it could not parse as HTTP/1.0.
    assert answer.split(b" ", 2)[1] == b"431", answer[:80]
    assert b"headers_too_large" in answer


def test_after_a_hand_off_aiohttp_answers_431_too(gateway: Callable[..., Served]) -> None:
    """A connection the lane handed to aiohttp (an API request) keeps the bounds on
    its next request, answered by aiohttp's parser."""
    gw = gateway(max_header_bytes=1024)
    with connect(gw.port) as sock:
        sock.sendall(request_bytes("GET", "/healthz", [AUTH]))
        status, headers, _ = read_answer(sock)
        assert status == 200 and "aiohttp" in headers.get("server", "").lower()
        sock.sendall(request_bytes("GET", "/healthz", [AUTH, ("X-Big", "v" * 2000)]))
        status, _, body = read_answer(sock)
        assert status == 431
        assert json.loads(body)["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize("fast_lane", LANES)
def test_silent_and_slow_clients_are_closed(gateway: Callable[..., Served],
                                            fast_lane: bool) -> None:
    gw = gateway(fast_lane=fast_lane, header_timeout_seconds=0.5,
                 idle_timeout_seconds=0.5)
    with connect(gw.port) as silent:  # sends nothing at all
        assert closed_within_guard(silent) == b""
    with connect(gw.port) as slow:  # starts a head and never ends it (slowloris)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer = closed_within_guard(slow)
        if fast_lane:  # the lane says why; aiohttp closes without a word
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    with connect(gw.port) as kept:  # kept alive after an answer, then idle
        kept.sendall(request_bytes("GET", "/healthz", [AUTH]))
        assert read_answer(kept)[0] == 200
        assert closed_within_guard(kept) == b""


def test_a_body_that_stops_is_answered_408(gateway: Callable[..., Served]) -> None:
    gw = gateway(body_timeout_seconds=0.5)
    with connect(gw.port) as sock:  # a plain call's body: the lane reads it
        sock.sendall(b"POST /fn/t/f HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer thaw_t"
                     b"\r\nContent-Length: 100\r\n\r\n{\"a\"")
        answer = closed_within_guard(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]


def test_a_body_trickled_past_its_deadline_is_answered_408(
        gateway: Callable[..., Served]) -> None:
    # Never a pause near body_timeout_seconds: only the whole body's deadline cuts it
    # (aiohttp's routes: tests/gateway/test_body_deadline.py).
    gw = gateway(body_deadline_seconds=1)
    with connect(gw.port) as sock:
        sock.sendall(b"POST /fn/t/f HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer thaw_t"
                     b"\r\nContent-Length: 100000\r\n\r\n")
        sock.settimeout(0.05)
        answer = b""
        for _ in range(int(GUARD_SECONDS / 0.05)):  # a byte at a time until answered
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"x")
                continue
            break
        sock.settimeout(GUARD_SECONDS)
        answer += read_until_closed(sock)  # returns once the gateway closed
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert b"body_deadline_seconds" in answer


@pytest.mark.parametrize("fast_lane", LANES)
def test_connections_past_the_cap_are_refused_and_others_served(
        gateway: Callable[..., Served], fast_lane: bool) -> None:
    gw = gateway(fast_lane=fast_lane, max_connections_per_address=3)
    held = [connect(gw.port) for _ in range(3)]
    try:
        # The server counts a connection once it sees it: ask on one of the three.
        held[0].sendall(request_bytes("GET", "/healthz", [AUTH]))
        assert read_answer(held[0])[0] == 200
        assert gw.open_from_localhost() == 3
        with connect(gw.port) as fourth:
            answer = closed_within_guard(fourth)
        assert answer.startswith(b"HTTP/1.1 429"), answer[:80]
        assert b"too_many_connections" in answer
        # The held ones are unaffected.
        held[1].sendall(request_bytes("GET", "/healthz", [AUTH]))
        assert read_answer(held[1])[0] == 200
    finally:
        for sock in held:
            sock.close()
    # Their places are free again once they close.
    for _ in range(200):
        if gw.open_from_localhost() == 0:
            break
        threading.Event().wait(0.05)
    assert gw.open_from_localhost() == 0
    status, _ = send(gw.port, request_bytes("GET", "/healthz", [AUTH]))
    assert status == 200


def test_every_json_route_bounds_depth_and_size(gateway: Callable[..., Served]) -> None:
    gw = gateway(max_json_bytes=64 * 1024, max_json_depth=16)
    routes = json_routes(build_document())
    # The routes that parse JSON today; a new one is added to the OpenAPI document.
    assert len(routes) >= 9, routes
    for method, template in sorted(routes):
        path = filled(template)
        headers = [AUTH, ("Content-Type", "application/json")]
        status, body = send(gw.port, request_bytes(method, path, headers,
                                                   deep_json(10_000)))
        assert status == 400, (method, path, body)
        assert "max_json_depth" in body["error"]["message"]
        status, body = send(gw.port, request_bytes(method, path, headers,
                                                   big_json(128 * 1024)))
        assert status == 413, (method, path, body)
        assert "max_json_bytes" in body["error"]["message"]
        # Sent without a Content-Length (chunked): refused as it arrives.
        chunked = big_json(128 * 1024)
        raw = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer thaw_t\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n{len(chunked):x}\r\n").encode()
        status, body = send(gw.port, raw + chunked + b"\r\n0\r\n\r\n")
        assert status == 413, (method, path, body)
        # A JSON body in a charset other than UTF-8 is not read.
        status, body = send(gw.port, request_bytes(
            method, path, [AUTH, ("Content-Type", "application/json; charset=utf-7")],
            b'{"a": 1}'))
        assert status == 400 and body["error"]["field"] == "Content-Type"


@pytest.mark.parametrize("body, depth", [
    (b"1", 0), (b"{}", 1), (b'{"a": [1, {"b": []}]}', 4), (b'["[[[[", "]"]', 1),
    (b'["\\"[[[", {}]', 2), (b'"\\\\"', 0), (b'[["\\\\"], [[]]]', 3),
    (b"[" * 5000 + b"]" * 5000, 5000)])
def test_nesting_depth_skips_strings_and_escapes(body: bytes, depth: int) -> None:
    assert nesting_depth(body) == depth


def _depth_of(value: Any) -> int:
    """The reference: the parsed value's depth, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = (item.values() if isinstance(item, dict)
                    else item if isinstance(item, list) else None)
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


_TRICKY = st.text(alphabet='[]{}"\\ab\u00e9\n', max_size=8)
_VALUES = st.recursive(
    st.none() | st.integers() | _TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TRICKY, inner, max_size=4),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.booleans(), st.integers(min_value=0, max_value=8))
def test_nesting_depth_matches_the_parsed_value(value: Any, ascii_only: bool,
                                                limit: int) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_depth(body) == _depth_of(value)
    assert nests_deeper_than(body, limit) == (_depth_of(value) > limit)


def test_the_bounded_parser() -> None:
    assert parse_json(b'{"a": [1]}', 100, 2) == {"a": [1]}
    for body, status_word in ((b"[" * 3, "deeper"), (b"x" * 200, "larger"),
                              (b"[1,", "not JSON"), (b'["\xff"]', "UTF-8"),
                              (b"[\x001]", "UTF-8")):
        with pytest.raises(Exception) as caught:
            parse_json(body, 100, 2)
        assert status_word in str(caught.value), body
    check_json(b"[[1]]", 100, 2)  # within both: no error


def test_loads_refuses_deep_json_as_a_value_error() -> None:
    assert loads('{"a": [1]}') == {"a": [1]}
    assert loads(json.dumps([[["x"]]]).encode("utf-16")) == [[["x"]]]
    for deep in ("[" * 100_000 + "]" * 100_000, ("[" * 100).encode("utf-16-le"),
                 ("[" * 100 + "]" * 100).encode("utf-32")):
        with pytest.raises(ValueError, match="deeper than 64"):
            loads(deep)
    assert loads("[[1]]", max_depth=2) == [[1]]
    with pytest.raises(ValueError):
        loads("[[1]]", max_depth=1)
    with pytest.raises(ValueError):  # malformed, as json.loads says
        loads(b"[1,")
    assert GatewaySettings.load().max_json_depth == MAX_JSON_DEPTH


def test_http_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="header_timeout"):
        HTTPLimits(header_timeout=0)
    with pytest.raises(ValueError):
        AddressCap(0)


def test_settings_bound_the_limits() -> None:
    with pytest.raises(Exception, match="max_json_depth"):
        GatewaySettings.load(max_json_depth=0)
    with pytest.raises(Exception, match="max_headers"):
        GatewaySettings.load(max_headers=1)
    assert address_cap(GatewaySettings.load(max_connections_per_address=0)) is None

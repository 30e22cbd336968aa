"""The gateway's bounds on clients, on real sockets against a gateway replica (a
`thaw gateway` process of the platform) with small settings: heads past the limits
answered 431, silent and slow clients closed, a per-address connection cap that
leaves other addresses alone, and every JSON route's depth and size bounds."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from tests.conftest import RunningPlatform
from tests.gateway.conftest import Replica
from tests.gateway.limits_helpers import (
    GUARD_SECONDS,
    big_json,
    closed_within_guard,
    connect,
    deep_json,
    filled,
    read_answer,
    request_bytes,
    send,
)
from thaw.gateway.jsonbody import json_routes

StartReplica = Callable[[dict[str, str]], Replica]


def port_of(gw: Replica) -> int:
    port = urlsplit(gw.url).port
    assert port is not None
    return port


def test_heads_past_the_limits_are_answered_431(platform: RunningPlatform,
                                                replica: StartReplica) -> None:
    gw = replica({"THAW_MAX_HEADER_BYTES": "1024", "THAW_MAX_HEADERS": "20",
                  "THAW_MAX_HEAD_BYTES": "8192"})
    port, auth = port_of(gw), ("Authorization", f"Bearer {platform.key}")
    status, body = send(port, request_bytes("GET", "/v1/functions",
                                            [auth, ("X-Big", "v" * 4096)]))
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    status, body = send(port, request_bytes(
        "GET", "/v1/functions", [auth, *((f"X-H{i}", "1") for i in range(50))]))
    assert status == 431 and "20 headers" in body["error"]["message"]
    # A head that never ends (the 400 MiB, cut short): refused once past the
    # bound, with the answer, not a dropped connection.
    with connect(port) as sock:
        sock.sendall(b"GET /v1/functions HTTP/1.1\r\nX-Endless: ")
        for _ in range(256):
            try:
                sock.sendall(b"v" * 1024)
            except (BrokenPipeError, ConnectionResetError):
                break
        assert closed_within_guard(sock).startswith(b"HTTP/1.1 431")
    # Within the bounds: served.
    status, body = send(port, request_bytes("GET", "/v1/functions", [auth]))
    assert status == 200 and "functions" in body
    assert gw.proc.poll() is None


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_silent_and_slow_clients_are_closed(platform: RunningPlatform,
                                            replica: StartReplica, fast_lane: str) -> None:
    gw = replica({"THAW_HEADER_TIMEOUT_SECONDS": "1", "THAW_IDLE_TIMEOUT_SECONDS": "1",
                  "THAW_FAST_LANE": fast_lane})
    port = port_of(gw)
    silent = [connect(port) for _ in range(20)]  # they send nothing at all
    slow = connect(port)  # a head, one line, then nothing (slowloris)
    slow.sendall(b"GET /v1/functions HTTP/1.1\r\nHost: x\r\n")
    try:
        for sock in silent:
            assert closed_within_guard(sock) == b""
        answer = closed_within_guard(slow)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:80]
    finally:
        for sock in (*silent, slow):
            sock.close()
    status, _ = send(port, request_bytes(
        "GET", "/v1/functions", [("Authorization", f"Bearer {platform.key}")]))
    assert status == 200


def test_connections_past_the_cap_are_refused_from_that_address_only(
        platform: RunningPlatform, replica: StartReplica) -> None:
    gw = replica({"THAW_MAX_CONNECTIONS_PER_ADDRESS": "5"})
    port, auth = port_of(gw), ("Authorization", f"Bearer {platform.key}")
    held = [connect(port) for _ in range(5)]
    try:
        for sock in held:  # each counted (and served) before the sixth comes
            sock.sendall(request_bytes("GET", "/healthz", [auth]))
            assert read_answer(sock)[0] == 200
        with connect(port) as sixth:
            answer = closed_within_guard(sixth)
        assert answer.startswith(b"HTTP/1.1 429") and b"too_many_connections" in answer
        # Another client address is not affected (Linux answers all of 127/8).
        other = socket.create_connection(("127.0.0.1", port), timeout=GUARD_SECONDS,
                                         source_address=("127.0.0.2", 0))
        with other:
            other.sendall(request_bytes("GET", "/healthz", [auth]))
            assert read_answer(other)[0] == 200
        held[0].sendall(request_bytes("GET", "/healthz", [auth]))  # the held still work
        assert read_answer(held[0])[0] == 200
    finally:
        for sock in held:
            sock.close()
    # Their places free up once they close.
    status = 0
    for _ in range(100):
        try:
            status = send(port, request_bytes("GET", "/healthz", [auth]))[0]
        except ConnectionError:
            status = 0
        if status == 200:
            break
        time.sleep(0.05)
    assert status == 200


def test_every_json_route_bounds_depth_and_size(platform: RunningPlatform,
                                                replica: StartReplica) -> None:
    gw = replica({"THAW_MAX_JSON_BYTES": "65536"})
    port, auth = port_of(gw), ("Authorization", f"Bearer {platform.key}")
    routes = json_routes(gw.http.get("/openapi.json").json())
    # Tenants, quotas, keys, a function's settings, rollback, priority, the three
    # OpenAI routes, cog's predictions; a function URL's body is the function's, not
    # parsed here (its predictions route is cog's JSON, read by the gateway).
    assert len(routes) >= 9, routes
    assert not any(p.startswith("/fn/") and not p.endswith("/predictions")
                   for _, p in routes), routes
    headers = [auth, ("Content-Type", "application/json")]
    for method, template in sorted(routes):
        path = filled(template)
        status, body = send(port, request_bytes(method, path, headers, deep_json(20_000)))
        assert status == 400, (method, path, body)
        assert "max_json_depth" in body["error"]["message"]
        status, body = send(port, request_bytes(method, path, headers,
                                                big_json(100_000)))
        assert status == 413, (method, path, body)
        assert "max_json_bytes" in body["error"]["message"]
    # A body within the bounds reaches its route: no model of that name.
    status, body = send(port, request_bytes(
        "POST", "/v1/embeddings", headers, b'{"model": "no-such-model", "input": "x"}'))
    assert status == 404 and body["error"]["code"] == "not_found"
    # A route that reads the body itself (request.json()) gets it whole, sent either
    # way: no such invocation, rather than a body it did not see.
    valid = b'{"priority": 50}'
    status, body = send(port, request_bytes("POST", "/v1/invocations/nope/priority",
                                            headers, valid))
    assert status == 404, body
    chunked = (b"POST /v1/invocations/nope/priority HTTP/1.1\r\nHost: x\r\n"
               + f"Authorization: Bearer {platform.key}\r\n".encode()
               + b"Transfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n%b\r\n0\r\n\r\n" % (len(valid), valid))
    status, body = send(port, chunked)
    assert status == 404, body
    assert gw.proc.poll() is None

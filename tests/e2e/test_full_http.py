"""Full HTTP for a __call__ handler, through the whole path on a LocalPlatform: every
method, sub-paths and queries, the request headers it sees (hop-by-hop ones and
credentials left out), and the status, headers and content type a `Response` sets.
The fast lane and aiohttp answer alike: a plain POST takes the lane, the same POST
with `Prefer: wait=N` (or another method) is aiohttp's."""

from __future__ import annotations

import httpx

from tests.conftest import FIXTURES, RunningPlatform
from thaw.gateway.origins import SANDBOX_CSP

NAME = "http-full"
URL = f"/fn/dev/{NAME}"
# Sent to aiohttp's route rather than the fast lane's, and otherwise a plain call.
AIOHTTP = {"Prefer": "wait=120"}


def both(platform: RunningPlatform, path: str, **kwargs: object
         ) -> tuple[httpx.Response, httpx.Response]:
    """The same POST through the fast lane and through aiohttp."""
    headers = dict(kwargs.pop("headers", {}))  # type: ignore[call-overload]
    lane = platform.http.post(f"{URL}{path}", headers=headers, **kwargs)  # type: ignore[arg-type]
    slow = platform.http.post(f"{URL}{path}", headers={**headers, **AIOHTTP},
                              **kwargs)  # type: ignore[arg-type]
    return lane, slow


def test_every_method_sub_path_query_and_headers_reach_the_handler(
        platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "http_full").status_code == 201
    sent = {"X-Custom-In": "v1", "Accept": "application/json", "Cookie": "session=s",
            "Connection": "keep-alive, X-Listed", "X-Listed": "hop", "TE": "trailers",
            "Proxy-Authorization": "Basic x", "X-Thaw-Internal": "spoof",
            "X-Thaw-Method": "DELETE"}
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        answer = platform.http.request(method, f"{URL}/a/b%20c", params={"x": "1", "y": "2"},
                                       headers=sent, content=b"payload")
        assert answer.status_code == 200, (method, answer.text)
        seen = answer.json()
        assert seen["method"] == method
        assert seen["path"] == "/a/b c" and seen["query"] == "x=1&y=2"
        assert seen["body"] == "payload"
        headers = seen["headers"]
        assert headers["x-custom-in"] == "v1" and headers["accept"] == "application/json"
        for dropped in ("authorization", "cookie", "connection", "x-listed", "te",
                        "proxy-authorization", "x-thaw-internal", "x-thaw-method",
                        "keep-alive", "transfer-encoding"):
            assert dropped not in headers, (method, dropped, headers)

    head = platform.http.head(f"{URL}/a")
    get = platform.http.get(f"{URL}/a")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"] == "application/json"
    assert get.json()["method"] == "GET"

    lane, slow = both(platform, "/echo?q=%C3%A9", content=b'{"a": 1}',
                      headers={"Content-Type": "application/json", "X-Custom-In": "é".encode()})
    assert lane.status_code == slow.status_code == 200
    one, two = lane.json(), slow.json()
    two["headers"].pop("prefer")
    assert one["headers"].pop("x-request-id") != two["headers"].pop("x-request-id")
    # Each call's own trace context (the gateway's hop to the node), if traced.
    for per_call in ("traceparent", "tracestate"):
        one["headers"].pop(per_call, None)
        two["headers"].pop(per_call, None)
    assert one == two, set(one["headers"].items()) ^ set(two["headers"].items())
    # The header's bytes as sent (UTF-8), read as Latin-1 by the runtime, either way.
    assert one["headers"]["x-custom-in"] == "é".encode().decode("latin-1")
    assert one["method"] == "POST" and one["query"] == "q=%C3%A9"


def test_a_response_sets_status_headers_and_content_type(
        platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "http_full").status_code == 201
    for answer in both(platform, "/created"):
        assert answer.status_code == 201 and answer.json() == {"id": 7}, answer.text
        assert answer.headers["Location"] == f"{URL}/items/7"
        assert answer.headers["X-Custom"] == "yes"
        # Cookies, hop-by-hop headers and the platform's own never come from a handler.
        assert "set-cookie" not in answer.headers and "X-Thaw-Error" not in answer.headers
        assert answer.headers.get("Connection", "").lower() != "close"
        # The gateway's port is the dashboard's origin: its sandbox, not the handler's
        # policy, holds there.
        assert answer.headers["Content-Security-Policy"] == SANDBOX_CSP
        assert answer.headers["X-Thaw-Start"]  # the platform's headers still there
    for answer in both(platform, "/text"):
        assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
        assert answer.text == "héllo"
    for answer in both(platform, "/bytes"):
        assert answer.headers["Content-Type"] == "application/octet-stream"
        assert answer.content == b"\x00\x01\x02"
        assert answer.headers["X-Two"] == "1, 2"
    for answer in both(platform, "/teapot"):
        # A status the handler chose is its own answer, not the function failing.
        assert answer.status_code == 418 and answer.json() == {"short": "stout"}
        assert answer.headers["X-Thaw-Error"] == "tenant"
    for answer in both(platform, "/empty"):
        assert answer.status_code == 204 and answer.content == b""
        assert answer.headers["X-Gone"] == "yes"
    for answer in both(platform, "/file"):
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == "text/html"
        assert answer.text == "<p>a file</p>\n"
    for answer in both(platform, "/stream"):
        assert answer.status_code == 206, answer.text
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert answer.headers["X-Streamed"] == "yes"
        assert answer.text == 'one,two,{"three":3}\n'
    with platform.http.stream("GET", f"{URL}/stream") as streamed:
        assert streamed.status_code == 206
        assert b"".join(streamed.iter_raw()) == b'one,two,{"three":3}\n'
    head = platform.http.head(f"{URL}/stream")
    assert head.status_code == 206 and head.content == b""
    for path in ("/bad-status", "/bad-header"):
        for answer in both(platform, path):
            # Checked when the handler builds it: the handler's own failure.
            assert answer.status_code == 500, answer.text
            assert answer.json()["error"]["code"] == "handler_error"
            assert "X-Thaw-Error" not in answer.headers
            assert "Injected" not in answer.headers


def test_a_typed_function_takes_post_only(platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "tenant_errors_rt", force=False).status_code in (
        200, 201)
    for method in ("GET", "PUT", "DELETE"):
        answer = platform.http.request(method, "/fn/dev/tenant-errors-rt")
        assert answer.status_code == 405, answer.text
        assert answer.headers["Allow"] == "POST"
        assert answer.json()["error"]["code"] == "method_not_allowed"
    ok = platform.invoke("tenant-errors-rt", {"kind": "ok"})
    assert ok.status_code == 200 and ok.json() == {"ok": True}, ok.text

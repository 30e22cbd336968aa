"""The gateway's fast lane (gateway/lane.py) answers plain function calls exactly as
aiohttp's route does: the same requests to the platform's gateway (lane on) and to a
replica with `fast_lane = false` get the same statuses, bodies and headers. Everything
else reaches aiohttp through the lane's port, on the same connection too."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import FIXTURES, RunningPlatform
from tests.gateway.conftest import BUNDLES, Replica, deploy_once

# aiohttp names itself in every answer; the lane does not. Which server answered.
AIOHTTP = "aiohttp"
# Headers whose values differ from call to call (timings, the instance that ran it,
# the call's trace: each call is a new one).
VARYING = {"date", "server", "server-timing", "x-thaw-start", "x-thaw-instance",
           "x-thaw-node", "content-length", "transfer-encoding", "connection",
           "keep-alive", "traceparent"}


def served_by(resp: httpx.Response) -> str:
    return "aiohttp" if AIOHTTP in resp.headers.get("server", "") else "lane"


def call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return http.request(method, path, **kwargs)


@pytest.fixture
def functions(platform: RunningPlatform) -> dict[str, str]:
    return {
        "echo": deploy_once(platform, FIXTURES / "echo_rt"),
        "stream": deploy_once(platform, FIXTURES / "stream_rt"),
        "raises": deploy_once(platform, FIXTURES / "raises_rt"),
        "small": deploy_once(platform, BUNDLES / "small_body"),
    }


def cases(fn: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    rid = {"X-Request-ID": "parity-0123456789abcdef"}
    return [
        ("POST", f"/fn/dev/{fn['echo']}/sub/path?x=1&y=a+b",
         {"json": {"hello": "world"}, "headers": rid}),
        ("POST", f"/fn/dev/{fn['echo']}/", {"content": b"raw bytes", "headers": rid}),
        ("POST", f"/fn/dev/{fn['echo']}", {"content": b"", "headers": rid}),
        ("POST", f"/fn/dev/{fn['stream']}", {"json": {"n": 3}, "headers": rid}),
        ("POST", f"/fn/dev/{fn['stream']}",
         {"json": {"n": 3}, "headers": {**rid, "Accept": "text/event-stream"}}),
        ("POST", f"/fn/dev/{fn['stream']}", {"json": {"n": 4, "fail_at": 2}, "headers": rid}),
        ("POST", f"/fn/dev/{fn['raises']}", {"json": {}, "headers": rid}),
        ("POST", "/fn/dev/no-such-function", {"json": {}, "headers": rid}),
        ("POST", "/fn/other-tenant/whatever", {"json": {}, "headers": rid}),
        ("POST", f"/fn/dev/{fn['echo']}", {"json": {}, "headers": {**rid,
                                                                    "X-Thaw-Timeout": "-1"}}),
        ("POST", f"/fn/dev/{fn['echo']}", {"json": {}, "headers": {**rid,
                                                                    "X-Thaw-Priority": "999"}}),
        ("POST", f"/fn/dev/{fn['small']}", {"content": b"x" * 2048, "headers": rid}),
        ("POST", f"/fn/dev/{fn['small']}", {"content": b"x" * 10, "headers": rid}),
    ]


def comparable(resp: httpx.Response) -> dict[str, Any]:
    body: Any = resp.content
    if resp.headers.get("content-type", "").startswith("application/json"):
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("headers"), dict):
            body["headers"].pop("traceparent", None)  # the handler's parent span: per call
    return {"status": resp.status_code, "body": body,
            "headers": {k: v for k, v in resp.headers.items() if k.lower() not in VARYING},
            "header_names": sorted(k.lower() for k in resp.headers
                                   if k.lower() not in ("server", "connection",
                                                        "keep-alive", "content-length",
                                                        "transfer-encoding"))}


def test_the_lane_answers_as_aiohttp_does(
        platform: RunningPlatform, replica: Callable[[dict[str, str]], Replica],
        functions: dict[str, str]) -> None:
    plain = replica({"THAW_FAST_LANE": "false"})
    # A connection of its own: one that carried another request (a deploy) is aiohttp's.
    with httpx.Client(base_url=platform.url, timeout=60,
                      headers={"Authorization": f"Bearer {platform.key}"}) as lane:
        for method, path, kwargs in cases(functions):
            through_lane = call(lane, method, path, **kwargs)
            through_aiohttp = call(plain.http, method, path, **kwargs)
            assert served_by(through_aiohttp) == "aiohttp"
            assert served_by(through_lane) == "lane", (path, through_lane.headers)
            assert comparable(through_lane) == comparable(through_aiohttp), (method, path)
        # The answers were real ones, not the same error twice.
        ok = call(lane, "POST", f"/fn/dev/{functions['echo']}/sub?q=1", json={"a": 1})
        assert ok.status_code == 200 and served_by(ok) == "lane"
        assert ok.json()["path"] == "/sub" and ok.json()["json"] == {"a": 1}
        streamed = call(lane, "POST", f"/fn/dev/{functions['stream']}", json={"n": 3})
        assert [json.loads(line) for line in streamed.text.splitlines()] == \
            [{"i": 0}, {"i": 1}, {"i": 2}]


def test_other_requests_reach_aiohttp_on_the_same_port_and_connection(
        platform: RunningPlatform, functions: dict[str, str]) -> None:
    with httpx.Client(base_url=platform.url, timeout=60,
                      headers={"Authorization": f"Bearer {platform.key}"}) as http:
        first = http.post(f"/fn/dev/{functions['echo']}", json={})
        assert first.status_code == 200 and served_by(first) == "lane"
        # The connection moves to aiohttp at its first request the lane does not take.
        listed = http.get("/v1/functions")
        assert listed.status_code == 200 and served_by(listed) == "aiohttp"
        assert functions["echo"] in {f["name"] for f in listed.json()["functions"]}
        then = http.post(f"/fn/dev/{functions['echo']}", json={})
        assert then.status_code == 200 and served_by(then) == "aiohttp"
        assert first.extensions["network_stream"] is then.extensions["network_stream"]
    no_key = httpx.post(f"{platform.url}/fn/dev/{functions['echo']}", json={})
    assert no_key.status_code == 401 and served_by(no_key) == "aiohttp"
    stored = platform.http.post(f"/fn/dev/{functions['echo']}", json={},
                                headers={"Prefer": "respond-async"})
    assert stored.status_code == 202 and served_by(stored) == "aiohttp"

    def chunks() -> Any:
        yield b'{"chunked":'
        yield b' true}'

    chunked = platform.http.post(f"/fn/dev/{functions['echo']}", content=chunks(),
                                 headers={"Content-Type": "application/json"})
    assert chunked.status_code == 200 and served_by(chunked) == "aiohttp"
    assert chunked.json()["json"] == {"chunked": True}

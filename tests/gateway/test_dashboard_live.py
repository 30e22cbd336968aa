"""The dashboard's live feed (GET /v1/live, gateway/dashboard.py) against the real
platform: the key goes in the first message, a bad one is refused with an error frame
and close code 4401, a good one gets snapshots of its own tenant's functions only."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import EXAMPLES, RunningPlatform
from tests.gateway.conftest import Replica, deploy_once
from thaw.scheduler.db import make_engine
from thaw.scheduler.store import Store

# Snapshots come about once a second; this bounds the wait for one, never asserted as
# a speed.
SNAPSHOT_WAIT_SECONDS = 10.0


def ws_url(platform: RunningPlatform) -> str:
    return platform.url.replace("http://", "ws://") + "/v1/live"


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str,
                  until: Any = None) -> dict[str, Any]:
    """The next frame of `kind` (that satisfies `until`, if given)."""
    deadline = time.monotonic() + SNAPSHOT_WAIT_SECONDS
    while True:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        if frame["type"] == kind and (until is None or until(frame)):
            return frame
        assert time.monotonic() < deadline, f"no {kind} frame in time; last: {frame}"


def other_tenant_key(platform: RunningPlatform, tenant: str) -> str:
    """A key of another tenant, without the admin scope (not an operator)."""
    engine = make_engine(f"sqlite:///{platform.platform.home}/scheduler/thaw.db")
    try:
        _key_id, key = Store(engine).create_key(tenant, scopes=("invoke", "deploy"))
    finally:
        engine.dispose()
    return key


@pytest.mark.parametrize("first", [
    json.dumps({"key": "thaw_not-a-real-key"}),
    json.dumps({"token": "x"}),
    "not json",
])
async def test_a_bad_first_message_gets_an_error_frame_and_close(
        platform: RunningPlatform, first: str) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(platform)) as ws:
        await ws.send_str(first)
        msg = await ws.receive(timeout=SNAPSHOT_WAIT_SECONDS)
        frame = json.loads(msg.data)
        assert frame["type"] == "error"
        assert frame["error"]["code"] == "unauthenticated", frame
        assert frame["error"]["message"]
        closing = await ws.receive(timeout=SNAPSHOT_WAIT_SECONDS)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 4401


def test_a_plain_get_is_told_to_upgrade(platform: RunningPlatform) -> None:
    resp = platform.http.get("/v1/live")
    assert resp.status_code == 400
    assert resp.json()["error"]["field"] == "Upgrade"


async def test_a_good_key_gets_its_tenants_functions_with_live_figures(
        platform: RunningPlatform) -> None:
    name = deploy_once(platform, EXAMPLES / "echo")
    resp = platform.invoke(name, {"hello": "live"})
    assert resp.status_code == 200, resp.text
    request_id = resp.headers["X-Request-ID"]
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(platform)) as ws:
        await ws.send_json({"key": platform.key})
        hello = await next_of(ws, "hello")
        assert hello == {"type": "hello", "tenant": "dev", "operator": True}
        await ws.send_json({"select": name})  # the function whose charts the page shows
        snap = await next_of(ws, "snapshot", until=lambda s: any(
            f["name"] == name and "series" in f["stats"] for f in s["functions"]))
    assert snap["tenant"] == "dev"
    assert {f["tenant"] for f in snap["functions"]} == {"dev"}
    echo = next(f for f in snap["functions"] if f["name"] == name)
    assert echo["state"] == "ready"
    assert echo["url"].endswith(f"/fn/dev/{name}")
    assert echo["stats"]["invocations"] >= 1
    assert echo["stats"]["p99_ms"] >= echo["stats"]["p50_ms"] > 0
    assert len(echo["stats"]["series"]["time"]) == len(echo["stats"]["series"]["rate"])
    assert echo["stats"]["cold_start_stages"] is not None
    assert all("series" not in f["stats"] for f in snap["functions"] if f["name"] != name)
    if echo["start_mode"] == "restore":  # the node that built it holds it on disk
        assert "local" in echo["snapshot_tiers"]["disk"]
    call = next(r for r in snap["recent"] if r["id"] == request_id)
    assert call["status"] == 200 and call["function"] == f"dev/{name}"
    assert call["start"] in ("warm", "restore", "fresh")
    assert "queue" in call["stages"] and "run" in call["stages"]
    # An operator sees the nodes with their devices and slices, and the events.
    assert snap["nodes"] and snap["nodes"][0]["devices"]
    assert "slices" in snap["nodes"][0] and isinstance(snap["events"], list)


async def test_another_tenant_sees_none_of_devs_functions(platform: RunningPlatform) -> None:
    deploy_once(platform, EXAMPLES / "echo")
    key = other_tenant_key(platform, "acme-dash")
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(platform)) as ws:
        await ws.send_json({"key": key})
        hello = await next_of(ws, "hello")
        assert hello["tenant"] == "acme-dash" and hello["operator"] is False
        snap = await next_of(ws, "snapshot")
    assert snap["functions"] == [] and snap["recent"] == []
    assert "nodes" not in snap and "events" not in snap


async def test_a_stopping_gateway_closes_its_feeds(
        platform: RunningPlatform, replica: Callable[[dict[str, str]], Replica]) -> None:
    gateway = replica({})
    url = gateway.url.replace("http://", "ws://") + "/v1/live"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_json({"key": platform.key})
        await next_of(ws, "snapshot")
        gateway.proc.terminate()
        while not ws.closed:
            msg = await ws.receive(timeout=SNAPSHOT_WAIT_SECONDS)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY


def test_the_page_and_its_files_are_served(platform: RunningPlatform) -> None:
    page = platform.http.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and "/static/dashboard.js" in page.text
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "css"),
                       ("uPlot.iife.min.js", "javascript"), ("uPlot.min.css", "css")):
        resp = platform.http.get(f"/static/{name}", headers={"Authorization": ""})
        assert resp.status_code == 200 and kind in resp.headers["Content-Type"], name
        assert resp.content
    assert platform.http.get("/static/../app.py").status_code == 404
    assert platform.http.get("/static/nope.js").json()["error"]["code"] == "not_found"

"""Stored invocations against the real platform: async submit and GET, the sync wait
limit (303 to the result), Idempotency-Key dedupe, cancel, webhooks with retries,
result expiry."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import WEBHOOK_RECEIVER_HOST, RunningPlatform
from tests.gateway.conftest import (
    ASYNC,
    BUNDLES,
    FINISH_SECONDS,
    Replica,
    deploy_once,
    wait_done,
    wait_for_file,
)


@pytest.fixture
def jobs(platform: RunningPlatform) -> str:
    return deploy_once(platform, BUNDLES / "jobs")


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_async_invocation_is_accepted_then_has_its_result(
        platform: RunningPlatform, jobs: str, exchange: Path) -> None:
    count = exchange / "count"
    resp = platform.invoke(jobs, {"count_file": str(count), "value": "a"}, headers=ASYNC)
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert accepted["status"] in ("queued", "running")
    assert resp.headers["Location"] == f"/v1/invocations/{accepted['id']}" == accepted["url"]
    done = wait_done(platform.http, accepted["id"])
    assert done["status"] == "succeeded", done
    assert done["result"] == {"calls": 1, "value": "a"}
    assert done["result_status"] == 200 and done["function"] == jobs
    assert done["timings"]["run_seconds"] >= 0 and done["finished_at"] >= done["created_at"]
    raw = platform.http.get(done["result_url"])
    assert raw.status_code == 200 and raw.headers["Content-Type"].startswith("application/json")
    assert raw.json() == {"calls": 1, "value": "a"}
    listed = platform.http.get("/v1/invocations", params={"function": jobs}).json()
    assert accepted["id"] in [i["id"] for i in listed["invocations"]]


def test_a_failing_async_call_is_stored_as_failed(platform: RunningPlatform,
                                                   jobs: str) -> None:
    resp = platform.invoke(jobs, {"fail": True}, headers=ASYNC)
    assert resp.status_code == 202
    done = wait_done(platform.http, resp.json()["id"])
    assert done["status"] == "failed" and done["result_status"] >= 400
    assert done["error"]["code"]
    raw = platform.http.get(done["result_url"])
    assert raw.status_code == done["result_status"]


def test_non_json_results_are_base64_inline(platform: RunningPlatform) -> None:
    probe = deploy_once(platform, BUNDLES / "probe")
    resp = platform.http.post(f"/fn/dev/{probe}/bytes", content=b"\x00\x01abc",
                              headers={**ASYNC, "Content-Type": "application/octet-stream"})
    assert resp.status_code == 202, resp.text
    done = wait_done(platform.http, resp.json()["id"])
    assert base64.b64decode(done["result_base64"]) == b"cba\x01\x00"
    raw = platform.http.get(done["result_url"])
    assert raw.content == b"cba\x01\x00"


def test_a_sync_call_past_the_wait_limit_gets_303_to_its_result(
        platform: RunningPlatform, jobs: str, exchange: Path) -> None:
    gate = exchange / "gate"
    started = exchange / "started"
    resp = platform.invoke(jobs, {"gate": str(gate), "started": str(started), "value": 7},
                           headers={"Prefer": "wait=0.5"})
    assert resp.status_code == 303, resp.text
    location = resp.headers["Location"]
    assert location == resp.json()["result_url"] and location.endswith("/result")
    assert platform.http.get(resp.json()["url"]).json()["status"] == "running"
    wait_for_file(started)
    gate.touch()
    # Following the redirect waits for the answer, which is the function's own.
    final = platform.http.get(location, follow_redirects=True)
    assert final.status_code == 200 and final.json() == {"calls": 0, "value": 7}


def test_respond_async_with_wait_answers_202_after_waiting(
        platform: RunningPlatform, jobs: str, exchange: Path) -> None:
    gate = exchange / "gate"
    slow = platform.invoke(jobs, {"gate": str(gate)},
                           headers={"Prefer": "respond-async, wait=0.3"})
    assert slow.status_code == 202, slow.text
    gate.touch()
    quick = platform.invoke(jobs, {"value": 1}, headers={"Prefer": "respond-async, wait=30"})
    assert quick.status_code == 200 and quick.json() == {"calls": 0, "value": 1}
    assert quick.headers["X-Thaw-Invocation"].startswith("inv_")
    assert wait_done(platform.http, slow.json()["id"])["status"] == "succeeded"


def test_ten_concurrent_requests_with_one_key_run_the_function_once(
        platform: RunningPlatform, jobs: str, exchange: Path) -> None:
    count = exchange / "count"
    body = {"count_file": str(count), "seconds": 0.5, "value": "once"}
    key = f"key-{time.time_ns()}"

    def call(_: int) -> httpx.Response:
        return platform.invoke(jobs, body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(call, range(10)))
    assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers]
    assert {a.content for a in answers} == {answers[0].content}
    assert answers[0].json() == {"calls": 1, "value": "once"}
    assert len({a.headers["X-Thaw-Invocation"] for a in answers}) == 1
    assert lines(count) == 1
    # Later, the same answer again without running; a different body is refused.
    again = call(0)
    assert again.status_code == 200 and again.content == answers[0].content
    assert lines(count) == 1
    other = platform.invoke(jobs, {**body, "value": "twice"},
                            headers={"Idempotency-Key": key})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # Async with the same key: the same invocation.
    same = platform.invoke(jobs, body, headers={"Idempotency-Key": key, **ASYNC})
    assert same.status_code == 202
    assert same.json()["id"] == answers[0].headers["X-Thaw-Invocation"]


def test_cancel_a_running_invocation(platform: RunningPlatform, jobs: str,
                                     exchange: Path) -> None:
    gate, started = exchange / "gate", exchange / "started"
    resp = platform.invoke(jobs, {"gate": str(gate), "started": str(started)},
                           headers=ASYNC)
    invocation_id = resp.json()["id"]
    wait_for_file(started)
    cancelled = platform.http.post(f"/v1/invocations/{invocation_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    gate.touch()
    assert wait_done(platform.http, invocation_id)["status"] == "cancelled"
    result = platform.http.get(f"/v1/invocations/{invocation_id}/result")
    assert result.status_code == 409
    assert result.json()["error"]["code"] == "invocation_cancelled"
    again = platform.http.post(f"/v1/invocations/{invocation_id}/cancel")
    assert again.status_code == 200
    done = platform.invoke(jobs, {}, headers=ASYNC).json()["id"]
    wait_done(platform.http, done)
    late = platform.http.post(f"/v1/invocations/{done}/cancel")
    assert late.status_code == 409 and late.json()["error"]["code"] == "invocation_finished"


def test_unknown_ids_are_404(platform: RunningPlatform) -> None:
    for path in ("/v1/invocations/inv_nope", "/v1/invocations/whatever/result"):
        resp = platform.http.get(path)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert platform.http.post("/v1/invocations/inv_nope/cancel").status_code == 404
    assert httpx.get(f"{platform.url}/v1/invocations/inv_nope").status_code == 401


def test_bad_inputs_name_their_field(platform: RunningPlatform, jobs: str) -> None:
    bad_hook = platform.invoke(jobs, {}, headers={**ASYNC, "X-Thaw-Webhook": "ftp://x"})
    assert bad_hook.status_code == 400
    assert bad_hook.json()["error"]["field"] == "X-Thaw-Webhook"
    not_a_url = platform.invoke(jobs, {}, headers={"X-Thaw-Webhook": "http://[oops"})
    assert not_a_url.status_code == 400, not_a_url.text
    assert not_a_url.json()["error"]["field"] == "X-Thaw-Webhook"
    long_key = platform.invoke(jobs, {}, headers={"Idempotency-Key": "k" * 300})
    assert long_key.status_code == 400
    assert long_key.json()["error"]["field"] == "Idempotency-Key"
    assert platform.http.get("/v1/invocations", params={"limit": "0"}).status_code == 400
    assert platform.http.get("/v1/invocations",
                             params={"status": "bogus"}).status_code == 400


# ---- webhooks -------------------------------------------------------------------------

class Receiver:
    """An HTTP server on WEBHOOK_RECEIVER_HOST (a loopback address on the test
    platforms' webhook allow-list) that fails the first `failures` deliveries."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((time.monotonic(), await request.json()))
        if len(self.received) <= self.failures:
            return web.Response(status=503)
        return web.Response(status=204)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, WEBHOOK_RECEIVER_HOST, 0)
            await site.start()
            port = self._runner.addresses[0][1]
            self.url = f"http://{WEBHOOK_RECEIVER_HOST}:{port}/hook"
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def __enter__(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_webhook_is_retried_with_backoff_until_delivered(
        platform: RunningPlatform, jobs: str) -> None:
    with Receiver(failures=2) as receiver:
        resp = platform.invoke(jobs, {"value": "hooked"},
                               headers={**ASYNC, "X-Thaw-Webhook": receiver.url})
        assert resp.status_code == 202, resp.text
        invocation_id = resp.json()["id"]
        deadline = time.monotonic() + FINISH_SECONDS
        while True:
            inv = platform.http.get(f"/v1/invocations/{invocation_id}").json()
            if inv.get("webhook", {}).get("state") == "delivered":
                break
            assert time.monotonic() < deadline, inv
            time.sleep(0.1)
    assert inv["webhook"]["attempts"] == 3 and len(receiver.received) == 3
    times = [t for t, _ in receiver.received]
    # Exponential backoff: each wait at least as long as the one before.
    assert times[2] - times[1] >= (times[1] - times[0]) * 0.9
    payload = receiver.received[-1][1]
    assert payload["id"] == invocation_id and payload["status"] == "succeeded"
    assert payload["result"] == {"calls": 0, "value": "hooked"}


# ---- expiry ---------------------------------------------------------------------------

@pytest.fixture
def short_ttl(replica: Callable[[dict[str, str]], Replica]) -> Iterator[Replica]:
    yield replica({"THAW_RESULT_TTL_SECONDS": "1"})


def test_results_expire_after_their_ttl(platform: RunningPlatform, jobs: str,
                                        short_ttl: Replica, exchange: Path) -> None:
    count = exchange / "count"
    key = f"ttl-{time.time_ns()}"
    body = {"count_file": str(count)}
    first = short_ttl.http.post(f"/fn/dev/{jobs}", json=body,
                                headers={"Idempotency-Key": key})
    assert first.status_code == 200 and first.json()["calls"] == 1
    invocation_id = first.headers["X-Thaw-Invocation"]
    # Expiry is decided by expires_at (set by the replica that stored the result).
    deadline = time.monotonic() + FINISH_SECONDS
    while (resp := short_ttl.http.get(f"/v1/invocations/{invocation_id}")).status_code \
            == 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert resp.status_code == 410
    assert resp.json()["error"]["code"] == "invocation_expired"
    assert "expired" in resp.json()["error"]["message"]
    # The key is free again: the function runs anew.
    second = short_ttl.http.post(f"/fn/dev/{jobs}", json=body,
                                 headers={"Idempotency-Key": key})
    assert second.status_code == 200 and second.json()["calls"] == 2

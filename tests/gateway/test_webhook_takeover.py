"""A webhook outlives the gateway delivering it: the replica that finished the
invocation is killed between two failed attempts, and another gateway takes the
delivery over once the claim lapsed, counting the attempts already made."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, Replica, deploy_once
from tests.gateway.test_invocations import Receiver

# Bounds each wait below; the whole delivery takes a few seconds.
DELIVERY_SECONDS = 60.0


def webhook_of(http: httpx.Client, invocation_id: str) -> dict[str, Any]:
    resp = http.get(f"/v1/invocations/{invocation_id}")
    assert resp.status_code == 200, resp.text
    hook: dict[str, Any] = resp.json()["webhook"]
    return hook


def wait_webhook(http: httpx.Client, invocation_id: str,
                 done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + DELIVERY_SECONDS
    while not done(hook := webhook_of(http, invocation_id)):
        assert time.monotonic() < deadline, hook
        time.sleep(0.05)
    return hook


def test_a_killed_gateways_webhook_is_delivered_by_another(
        platform: RunningPlatform, replica: Callable[[dict[str, str]], Replica]) -> None:
    jobs = deploy_once(platform, BUNDLES / "jobs")
    # The replica's claims lapse 2 s after it dies; its second attempt would be due 3 s
    # after its first.
    doomed = replica({"THAW_INVOCATION_CLAIM_SECONDS": "2",
                      "THAW_WEBHOOK_BACKOFF_SECONDS": "3"})
    with Receiver(failures=2) as receiver:
        # A sync call with a webhook runs on (and is finished by) the replica asked.
        resp = doomed.http.post(f"/fn/dev/{jobs}", json={"value": "orphan"},
                                headers={"X-Thaw-Webhook": receiver.url})
        assert resp.status_code == 200, resp.text
        invocation_id = resp.headers["X-Thaw-Invocation"]
        first = wait_webhook(platform.http, invocation_id, lambda h: h["attempts"] >= 1)
        doomed.proc.kill()
        doomed.proc.wait()
        assert first["state"] == "pending" and "503" in first["error"]

        delivered = wait_webhook(platform.http, invocation_id,
                                 lambda h: h["state"] != "pending")
    # The receiver fails twice: whoever delivered it counted on from the dead
    # replica's attempts (3 in all, not a fresh count of 1), and the replica, dead
    # before its second attempt was due, could not have made the third.
    assert delivered == {"url": receiver.url, "state": "delivered", "attempts": 3,
                         "error": None, "last_status": 204, "next_attempt_at": None,
                         "last_attempt_at": delivered["last_attempt_at"]}, delivered
    assert delivered["last_attempt_at"] >= first["last_attempt_at"] > 0
    assert len(receiver.received) == 3
    assert {payload["id"] for _, payload in receiver.received} == {invocation_id}
    assert receiver.received[-1][1]["result"] == {"calls": 0, "value": "orphan"}


def test_webhooks_must_be_http_urls_with_a_host(platform: RunningPlatform) -> None:
    jobs = deploy_once(platform, BUNDLES / "jobs")
    for url in ("ftp://example.test/hook", "http:///nohost", "file:///etc/passwd",
                "127.0.0.1:9/hook", "javascript:alert(1)"):
        for how in ({"headers": {"X-Thaw-Webhook": url}}, {"params": {"webhook": url}}):
            resp = platform.http.post(f"/fn/dev/{jobs}", json={}, **how)  # type: ignore[arg-type]
            assert resp.status_code == 400, (url, how, resp.text)
            assert resp.json()["error"]["field"] == "X-Thaw-Webhook"

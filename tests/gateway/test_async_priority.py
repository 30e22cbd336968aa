"""Async invocations keep the priority computed at submission (X-Thaw-Priority, the
function's default, the key's): it is stored with the invocation, shown by GET, and
the worker's call waits in the function's queue with it.

The saturated fixture serves one call at a time; while an occupying call runs, async
invocations are submitted one by one, each in the queue before the next is sent, the
lowest priority first. Served FIFO they would come back in submission order; by
priority they come back highest first. (That claims take the highest-priority queued
invocations first is tested at the store: tests/scheduler/test_invocations_store.py.)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.conftest import FIXTURES, RunningPlatform
from tests.gateway.conftest import ASYNC, deploy_once
from tests.gateway.test_priority import FUNCTION, POLL_SECONDS, queue_depth, wait_for

# The occupying call holds the only slot this long: every submission below queues
# behind it (each is queued before the next is sent, so this only bounds the test).
OCCUPY_SECONDS = 4.0


def finished(platform: RunningPlatform, invocation_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        body: dict[str, Any] = platform.http.get(f"/v1/invocations/{invocation_id}").json()
        if body["status"] not in ("queued", "running"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_async_invocations_wait_with_their_submitted_priority(
        platform: RunningPlatform, exchange: Path) -> None:
    deploy_once(platform, FIXTURES / FUNCTION)
    mark = exchange / "occupied"
    with ThreadPoolExecutor(max_workers=1) as pool:
        occupier = pool.submit(platform.invoke, FUNCTION, {
            "label": "occupier", "seconds": OCCUPY_SECONDS, "mark": str(mark)})
        wait_for(mark.exists, "the occupying call to start")
        ids: dict[str, str] = {}
        for label, priority in [("p10", 10), ("key-50", None), ("p90", 90)]:
            before = queue_depth(platform)
            headers = dict(ASYNC)
            if priority is not None:
                headers["X-Thaw-Priority"] = str(priority)
            resp = platform.invoke(FUNCTION, {"label": label, "seconds": 0}, headers=headers)
            assert resp.status_code == 202, resp.text
            ids[label] = resp.json()["id"]
            wait_for(lambda n=before + 1: queue_depth(platform) == n, f"{label} to queue")
        assert occupier.result(POLL_SECONDS).status_code == 200

    done = {label: finished(platform, i) for label, i in ids.items()}
    assert {label: d["priority"] for label, d in done.items()} == {
        "p10": 10, "key-50": 50, "p90": 90}
    for d in done.values():
        assert d["status"] == "succeeded", d
    served = sorted(done, key=lambda label: done[label]["result"]["place"])
    assert served == ["p90", "key-50", "p10"]


def test_the_functions_default_priority_is_stored_with_an_async_invocation(
        platform: RunningPlatform) -> None:
    deploy_once(platform, FIXTURES / FUNCTION)
    resp = platform.http.patch(f"/v1/functions/{FUNCTION}", json={"priority": 77})
    assert resp.status_code == 200, resp.text
    try:
        accepted = platform.invoke(FUNCTION, {"label": "default", "seconds": 0},
                                   headers=ASYNC)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["id"].startswith("inv_")
        assert finished(platform, accepted.json()["id"])["priority"] == 77
    finally:
        cleared = platform.http.patch(f"/v1/functions/{FUNCTION}", json={"priority": None})
        assert cleared.status_code == 200

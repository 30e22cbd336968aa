"""Invocation priority against the real platform: a saturated function (one instance,
one call at a time, ~0.3 s a call) completes its queued calls highest priority first,
FIFO within a level; an admin raise moves a queued call ahead; the header, the
function's default and the key's range are checked.

Aging (THAW_PRIORITY_AGING_RATE, 1 level/s by default) cannot reorder these queues:
the priorities differ by 40 levels and every call here waits a few seconds at most.
Aging itself is tested at unit level (tests/unit, tests/scheduler, tests/gateway)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES, RunningPlatform

FUNCTION = "saturated"
# Bounds of the polls below (not timings under test): how long a call may take to
# reach the queue, and the occupying call to start.
POLL_SECONDS = 30.0


@pytest.fixture(scope="module")
def saturated(platform: RunningPlatform) -> Iterator[RunningPlatform]:
    resp = platform.deploy(FIXTURES / FUNCTION)
    assert resp.status_code in (200, 201), resp.text
    warm = platform.invoke(FUNCTION, {"label": "warm", "seconds": 0})
    assert warm.status_code == 200, warm.text
    yield platform


def queue_depth(platform: RunningPlatform) -> int:
    text = platform.http.get("/metrics").text
    match = re.search(r'^thaw_queue_depth\{function="dev/saturated"\} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


def wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + POLL_SECONDS
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


class Saturation:
    """Occupy the function, then queue calls one by one (each is in the gateway's
    queue before the next is sent), and read back the order the instance served them."""

    def __init__(self, platform: RunningPlatform, exchange: Path) -> None:
        self.platform = platform
        self.pool = ThreadPoolExecutor(max_workers=16)
        self.calls: dict[str, Future[httpx.Response]] = {}
        self.ids: dict[str, str] = {}
        mark = exchange / "occupied"
        self.occupier = self.pool.submit(platform.invoke, FUNCTION, {
            "label": "occupier", "seconds": 1.5, "mark": str(mark)})
        wait_for(mark.exists, "the occupying call to start")

    def enqueue(self, label: str, priority: int | None) -> None:
        before = queue_depth(self.platform)
        request_id = f"prio-{label}-{uuid.uuid4().hex[:8]}"
        headers = {"X-Request-ID": request_id}
        if priority is not None:
            headers["X-Thaw-Priority"] = str(priority)
        self.ids[label] = request_id
        self.calls[label] = self.pool.submit(
            self.platform.invoke, FUNCTION, {"label": label}, headers=headers)
        wait_for(lambda: queue_depth(self.platform) == before + 1, f"{label} to queue")

    def served_order(self) -> list[str]:
        assert self.occupier.result(POLL_SECONDS).status_code == 200
        places = {}
        for label, future in self.calls.items():
            resp = future.result(POLL_SECONDS)
            assert resp.status_code == 200, resp.text
            assert resp.json()["label"] == label
            places[label] = resp.json()["place"]
        self.pool.shutdown()
        return sorted(places, key=places.__getitem__)


def test_queued_calls_complete_by_priority_then_arrival(saturated: RunningPlatform,
                                                        exchange: Path) -> None:
    run = Saturation(saturated, exchange)
    for label, priority in [("p10-a", 10), ("p50-a", 50), ("p90-a", 90), ("p50-b", 50),
                            ("p10-b", 10), ("p90-b", 90), ("p50-c", None)]:  # key: 50
        run.enqueue(label, priority)
    assert run.served_order() == ["p90-a", "p90-b", "p50-a", "p50-b", "p50-c", "p10-a",
                                  "p10-b"]


def test_an_admin_raise_moves_a_queued_call_ahead(saturated: RunningPlatform,
                                                  exchange: Path) -> None:
    run = Saturation(saturated, exchange)
    for label in ("first", "second", "third", "fourth"):
        run.enqueue(label, 50)
    resp = saturated.http.post(f"/v1/invocations/{run.ids['fourth']}/priority",
                               json={"priority": 90})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["priority"] == 90 and body["function"] == "dev/saturated"
    assert body["ahead"] == 0
    assert run.served_order() == ["fourth", "first", "second", "third"]
    # Served: nothing is waiting under that id any more.
    gone = saturated.http.post(f"/v1/invocations/{run.ids['fourth']}/priority",
                               json={"priority": 95})
    assert gone.status_code == 404 and gone.json()["error"]["field"] == "id"


def test_the_function_default_applies_when_the_call_names_none(
        saturated: RunningPlatform, exchange: Path) -> None:
    resp = saturated.http.patch(f"/v1/functions/{FUNCTION}", json={"priority": 90})
    assert resp.status_code == 200, resp.text
    assert resp.json()["priority"] == 90
    assert saturated.http.get(f"/v1/functions/{FUNCTION}").json()["priority"] == 90
    try:
        run = Saturation(saturated, exchange)
        run.enqueue("explicit-50", 50)
        run.enqueue("default-90", None)
        assert run.served_order() == ["default-90", "explicit-50"]
    finally:
        cleared = saturated.http.patch(f"/v1/functions/{FUNCTION}", json={"priority": None})
        assert cleared.status_code == 200 and cleared.json()["priority"] is None


@pytest.mark.parametrize("value", ["abc", "0", "101", "5.5", ""])
def test_a_bad_priority_header_is_400_naming_it(saturated: RunningPlatform,
                                                value: str) -> None:
    resp = saturated.invoke(FUNCTION, {"seconds": 0}, headers={"X-Thaw-Priority": value})
    assert resp.status_code == 400
    assert resp.json()["error"]["field"] == "X-Thaw-Priority"


def test_a_priority_above_the_keys_maximum_is_403_naming_the_range(
        saturated: RunningPlatform) -> None:
    created = saturated.http.post("/v1/keys", json={"scopes": ["invoke"], "priority_max": 60,
                                                    "priority_default": 20})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    with httpx.Client(base_url=saturated.url, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as http:
        over = http.post(f"/fn/dev/{FUNCTION}", json={"seconds": 0},
                         headers={"X-Thaw-Priority": "61"})
        assert over.status_code == 403
        assert over.json()["error"]["field"] == "X-Thaw-Priority"
        assert "1-60" in over.json()["error"]["message"]
        within = http.post(f"/fn/dev/{FUNCTION}", json={"seconds": 0},
                           headers={"X-Thaw-Priority": "60"})
        assert within.status_code == 200, within.text
        # Raising needs an admin key.
        denied = http.post("/v1/invocations/whatever/priority", json={"priority": 90})
        assert denied.status_code == 403


@pytest.mark.parametrize("body", [{}, {"priority": 0}, {"priority": 101},
                                  {"priority": "9"}, {"priority": True},
                                  {"priority": 5, "other": 1}])
def test_a_bad_raise_is_400(saturated: RunningPlatform, body: dict[str, object]) -> None:
    resp = saturated.http.post("/v1/invocations/some-id/priority", json=body)
    assert resp.status_code == 400, resp.text


def test_raising_what_is_not_queued_is_404(saturated: RunningPlatform) -> None:
    resp = saturated.http.post("/v1/invocations/never-queued/priority",
                               json={"priority": 80})
    assert resp.status_code == 404


@pytest.mark.parametrize("value", [0, 101, "high", 2.5])
def test_a_bad_function_default_is_400_and_changes_nothing(saturated: RunningPlatform,
                                                           value: object) -> None:
    resp = saturated.http.patch(f"/v1/functions/{FUNCTION}",
                                json={"priority": value, "public": True})
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "priority"
    fn = saturated.http.get(f"/v1/functions/{FUNCTION}").json()
    assert fn["priority"] is None

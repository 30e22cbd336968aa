"""Generator handlers stream through gateway -> agent -> instance as they produce
(issue 6, item 1). The fixture's generator blocks after its first item until the test
opens a gate, so "the first event arrived before the last was produced" is an ordering
the test controls, not a timing it hopes for."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, deploy_once, sse_events, wait_for_file

# A gateway that buffered the stream would hold the first event until the gate opens,
# which only happens after the test has read it: the read times out instead of hanging.
READ_TIMEOUT = httpx.Timeout(20.0)
SSE = {"Accept": "text/event-stream"}


def test_sse_first_event_arrives_before_the_rest_is_produced(
        platform: RunningPlatform, exchange: Path) -> None:
    name = deploy_once(platform, BUNDLES / "gated")
    gate = exchange / "gate"
    with platform.http.stream("POST", f"/fn/dev/{name}", json={"gate": str(gate), "n": 3},
                              headers=SSE, timeout=READ_TIMEOUT) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-thaw-start"] in ("warm", "restore", "fresh")
        events = sse_events(resp.iter_lines())
        assert next(events) == (None, {"i": 0})
        assert not gate.exists()  # items 1.. are not produced yet
        gate.touch()
        rest = list(events)
    assert rest == [(None, {"i": 1}), (None, {"i": 2}), ("done", {})]


def test_ndjson_streams_the_same_way(platform: RunningPlatform, exchange: Path) -> None:
    name = deploy_once(platform, BUNDLES / "gated")
    gate = exchange / "gate"
    with platform.http.stream("POST", f"/fn/dev/{name}", json={"gate": str(gate), "n": 2},
                              timeout=READ_TIMEOUT) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = resp.iter_lines()
        assert json.loads(next(lines)) == {"i": 0}
        gate.touch()
        assert [json.loads(x) for x in lines if x] == [{"i": 1}]


def test_a_failure_midway_is_the_last_event(platform: RunningPlatform, exchange: Path) -> None:
    name = deploy_once(platform, BUNDLES / "gated")
    gate = exchange / "gate"
    gate.touch()
    resp = platform.http.post(f"/fn/dev/{name}", headers=SSE, timeout=READ_TIMEOUT,
                              json={"gate": str(gate), "n": 5, "fail_at": 2})
    events = list(sse_events(iter(resp.text.splitlines())))
    assert events[:2] == [(None, {"i": 0}), (None, {"i": 1})]
    kind, body = events[2]
    assert kind == "error" and len(events) == 3
    assert body["error"]["code"] == "handler_error"  # type: ignore[index]
    assert "failed at 2" in body["error"]["message"]  # type: ignore[index]


def test_an_instance_crash_midway_ends_the_stream_with_an_error(
        platform: RunningPlatform, exchange: Path) -> None:
    name = deploy_once(platform, BUNDLES / "gated")
    gate = exchange / "gate"
    gate.touch()
    resp = platform.http.post(f"/fn/dev/{name}", headers=SSE, timeout=READ_TIMEOUT,
                              json={"gate": str(gate), "n": 5, "crash_at": 2})
    events = list(sse_events(iter(resp.text.splitlines())))
    assert events[:2] == [(None, {"i": 0}), (None, {"i": 1})]
    kind, body = events[-1]
    assert kind == "error", events
    assert body["error"]["code"] == "instance_failed"  # type: ignore[index]
    # The instance was replaced: the function still serves.
    again = platform.http.post(f"/fn/dev/{name}", json={"gate": str(gate), "sync": True},
                               headers={"X-Thaw-Timeout": "30"})
    assert again.status_code == 200, again.text


def test_a_client_that_leaves_stops_the_generator(
        platform: RunningPlatform, exchange: Path) -> None:
    name = deploy_once(platform, BUNDLES / "gated")
    gate, marker = exchange / "gate", exchange / "marker"
    n = 10_000  # 100 s of items: only an early close ends it within the wait below
    with platform.http.stream("POST", f"/fn/dev/{name}", headers=SSE, timeout=READ_TIMEOUT,
                              json={"gate": str(gate), "n": n, "marker": str(marker)}) as resp:
        assert next(sse_events(resp.iter_lines())) == (None, {"i": 0})
    gate.touch()  # the generator runs on until a write fails all the way down
    produced = int(wait_for_file(marker))
    assert 1 <= produced < n
    # Its slot (max_concurrency = 1) is free again: a call gets through.
    after = platform.http.post(f"/fn/dev/{name}", json={"gate": str(gate), "sync": True},
                               headers={"X-Thaw-Timeout": "30"})
    assert after.status_code == 200, after.text


def test_a_deadline_midway_ends_the_stream_with_an_error(
        platform: RunningPlatform, exchange: Path) -> None:
    name = deploy_once(platform, BUNDLES / "gated")
    gate = exchange / "gate"
    with platform.http.stream("POST", f"/fn/dev/{name}", json={"gate": str(gate), "n": 3},
                              headers={**SSE, "X-Thaw-Timeout": "1"},
                              timeout=READ_TIMEOUT) as resp:
        assert resp.status_code == 200
        events = list(sse_events(resp.iter_lines()))
    assert not gate.exists()  # the generator was still blocked when the stream ended
    assert events[0] == (None, {"i": 0})
    kind, body = events[-1]
    assert kind == "error" and len(events) == 2
    assert body["error"]["code"] == "deadline_exceeded"  # type: ignore[index]
    gate.touch()  # the generator's next item finds nobody listening and stops
    after = platform.http.post(f"/fn/dev/{name}", json={"gate": str(gate), "sync": True},
                               headers={"X-Thaw-Timeout": "20"})
    assert after.status_code == 200, after.text

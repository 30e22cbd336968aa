"""Metrics and logs (issue 6, item 6): Prometheus /metrics, X-Request-ID from the client
to the handler and in every gateway log line of the request, JSON logs."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, Replica, deploy_once


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples whose labels match those given (others may differ)."""
    values = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            values.append(float(line.rsplit(" ", 1)[1]))
    assert values, f"no sample {name}{labels}"
    return sum(values)


def test_request_id_reaches_the_handler(platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    resp = platform.http.post(f"/fn/dev/{name}", json={}, headers={"X-Request-ID": "trace-42.a"})
    assert resp.headers["X-Request-ID"] == "trace-42.a"
    assert resp.json()["headers"]["x-request-id"] == "trace-42.a"  # via the agent
    # One that could forge log lines is replaced by a fresh one, used all the way.
    resp = platform.http.post(f"/fn/dev/{name}", json={},
                              headers={"X-Request-ID": "a b\" level=error"})
    made_up = resp.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made_up)
    assert resp.json()["headers"]["x-request-id"] == made_up
    # Errors carry it too.
    assert platform.http.post("/fn/dev/not-there", json={},
                              headers={"X-Request-ID": "r-404"}).headers["X-Request-ID"] == "r-404"


def test_metrics(platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    function = f"dev/{name}"
    for _ in range(3):
        resp = platform.invoke(name, {})
        assert resp.status_code == 200
        assert resp.headers["X-Thaw-Start"] in ("warm", "restore", "fresh")
        assert "run;dur=" in resp.headers["Server-Timing"]
    assert platform.invoke("not-there", {}).status_code == 404
    text = platform.http.get("/metrics").text
    assert metric(text, "thaw_invocations_total", function=function, status="200") >= 3
    assert metric(text, "thaw_invocation_stage_seconds_count", stage="run") >= 3
    assert metric(text, "thaw_invocation_stage_seconds_count", stage="queue") >= 1
    assert metric(text, "thaw_invocation_stage_seconds_bucket", stage="total", le="+Inf") >= 3
    assert metric(text, "thaw_cold_starts_total", kind="restore") >= 1
    assert metric(text, "thaw_queue_depth", function=function) == 0
    assert metric(text, "thaw_errors_total", code="not_found") >= 1
    # Back-to-back calls of one function ride the lease kept from the previous one.
    assert metric(text, "thaw_lease_reuses_total") >= 1


def _request_lines(gw: Replica, since: int, until_status: int) -> list[dict[str, object]]:
    """The replica's JSON log lines after byte `since`, once one shows `until_status`."""
    deadline = time.monotonic() + 10
    while True:
        text = gw.log.read_bytes()[since:].decode()
        lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        if any(line.get("status") == until_status for line in lines):
            return lines
        assert time.monotonic() < deadline, text
        time.sleep(0.05)


def test_json_logs_carry_the_request_id(platform: RunningPlatform,
                                        replica: Callable[[dict[str, str]], Replica]) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    gw = replica({"THAW_LOG_JSON": "1", "THAW_LOG_LEVEL": "debug"})
    before = len(gw.log.read_bytes())
    ok = gw.http.post(f"/fn/dev/{name}", json={}, headers={"X-Request-ID": "log-ok-1"})
    missing = gw.http.post("/fn/dev/not-there", json={}, headers={"X-Request-ID": "log-404-1"})
    assert ok.status_code == 200 and missing.status_code == 404
    everything = _request_lines(gw, before, 404)
    # Every line the gateway wrote while serving them names its request; the replica's
    # background work (its stored-invocation runner taking over what earlier tests left,
    # sweeps) may log meanwhile, with no request, and never a line of serving one.
    lines = [line for line in everything if "request_id" in line]
    assert {line["request_id"] for line in lines} == {"log-ok-1", "log-404-1"}, everything
    background = [line for line in everything if "request_id" not in line]
    assert not [line for line in background
                if line["event"] in ("request", "dispatched")], background
    ok_lines = [line for line in lines if line["request_id"] == "log-ok-1"]
    assert {line["event"] for line in ok_lines} >= {"dispatched", "request"}
    assert all(line["component"] == "gateway" and "timestamp" in line for line in lines)
    (not_found,) = [line for line in lines
                    if line["request_id"] == "log-404-1" and line["event"] == "request"]
    assert not_found["level"] == "info" and not_found["code"] == "not_found"


def test_stdlib_log_records_are_json_too(platform: RunningPlatform,
                                         replica: Callable[[dict[str, str]], Replica]) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    gw = replica({"THAW_LOG_JSON": "1", "THAW_LOG_LEVEL": "debug"})
    before = len(gw.log.read_bytes())
    gw.http.post(f"/fn/dev/{name}", json={}, headers={"X-Request-ID": "log-ok-2"})
    gw.http.post("/fn/dev/not-there", json={})
    _request_lines(gw, before, 404)
    text = gw.log.read_bytes()[before:].decode()
    assert all(line.startswith("{") for line in text.splitlines() if line), text

"""Server-Timing's stages cover the whole call: the gateway's own (admission, retry,
placement, hop, relay) fill what the lease's and the instance's stages leave, so the
stages add up to `total` (gateway/timing.py)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from tests.gateway.test_dispatch_refusals import FakeAnswer, call, dispatcher, refusal
from thaw.gateway.dispatch import Settlement
from thaw.gateway.stats import parse_server_timing
from thaw.gateway.timing import server_timing


def total_of(header: str) -> float:
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name == "total":
            return float(rest)
    raise AssertionError(f"no total in {header!r}")


def test_each_interval_is_a_stage_and_they_add_up_to_the_total() -> None:
    now = time.perf_counter()
    started = now - 2.0
    leasing = started + 0.25   # a refused exchange first
    sent = leasing + 1.0       # the lease reports 0.7 s of it
    opened = sent + 0.5        # the instance ran 0.3 s of it
    header = server_timing([("queue", 0.2), ("restore", 0.5)], "run;dur=300.000",
                           0.01, started, leasing, sent, opened, total=True)
    stages = parse_server_timing(header)
    assert list(stages) == ["admission", "retry", "queue", "restore", "placement", "run",
                            "hop", "relay"]
    assert stages["admission"] == pytest.approx(10.0)
    assert stages["retry"] == pytest.approx(250.0)
    assert stages["placement"] == pytest.approx(300.0)
    assert stages["hop"] == pytest.approx(200.0)
    assert stages["relay"] == pytest.approx(250.0, abs=50.0)
    assert sum(stages.values()) == pytest.approx(total_of(header), abs=0.05)


def test_a_first_exchange_has_no_retry_and_a_stream_no_total() -> None:
    now = time.perf_counter()
    header = server_timing([("queue", 0.0)], None, 0.0, now, now, now + 0.001,
                           now + 0.002, total=False)
    stages = parse_server_timing(header)
    assert list(stages) == ["admission", "queue", "placement", "hop"]
    assert "total" not in header and "relay" not in header


def test_stages_reported_past_the_wait_never_make_a_negative_stage() -> None:
    now = time.perf_counter()
    # A lease kept from a call that gave up: its stages ran before this call began.
    header = server_timing([("restore", 5.0)], "run;dur=900", 0.0, now - 1.0, now - 1.0,
                           now - 0.5, now - 0.4, total=True)
    stages = parse_server_timing(header)  # drops negative durations: all must be there
    assert {"placement", "hop", "relay"} <= stages.keys()
    assert stages["placement"] == 0.0 and stages["hop"] == 0.0


async def test_an_exchange_after_refusals_reports_them_as_retry_and_adds_up() -> None:
    ok = FakeAnswer(200, b'{"ok": true}')
    d, _, _ = dispatcher([refusal("instance_unavailable"), ok])
    first = await d.open(call())
    assert first.lease.lease_id == "l2"
    header = first.server_timing(total=True)
    stages = parse_server_timing(header)
    assert list(stages) == ["admission", "retry", "placement", "hop", "relay"]
    assert sum(stages.values()) == pytest.approx(total_of(header), abs=0.05)
    first.settle(Settlement.ANSWERED)

    d, _, _ = dispatcher([FakeAnswer(200, b"{}")])
    once = await d.open(call())
    assert "retry" not in parse_server_timing(once.server_timing(total=True))



async def test_admission_is_taken_from_the_perf_counter_arrival_when_there_is_one() -> None:
    d, _, _ = dispatcher([FakeAnswer(200, b"{}")])
    arrived = time.perf_counter() - 0.25
    ex = await d.open(dataclasses.replace(call(), arrived=arrived))
    assert 0.25 <= ex.admission <= ex.started - arrived

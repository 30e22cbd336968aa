"""Alert sinks against a real local receiver (aiohttp on 127.0.0.1, port 0): the
webhook and Slack payload shapes, retries with backoff when the receiver fails, and a
notice given up after the retries is counted, not raised."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from tests.gateway.sink_helpers import counted, loopback, wait_count
from thaw.gateway.alert_sinks import AlertState, Notice, SinkMetrics, Sinks


@dataclass
class Receiver:
    url: str
    failures_left: int = 0
    """Requests answered 503 before the receiver starts accepting."""
    attempts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    accepted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int) -> None:
        await wait_count(self.accepted, count, self.arrived)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver("")

    async def take(request: web.Request) -> web.Response:
        body = await request.json()
        state.attempts.append((request.path, body))
        if state.failures_left > 0:
            state.failures_left -= 1
            return web.Response(status=503)
        state.accepted.append((request.path, body))
        state.arrived.set()
        return web.Response(text="ok")

    async with loopback(take) as state.url:
        yield state


FIRING = Notice("error_rate", "critical", AlertState.FIRING, "dev/boom", 0.5, 0.05,
                "dev/boom: 5 of 10 invocations answered 5xx (50.0%) in the last 300 s",
                1_700_000_000.0)
RESOLVED = Notice("error_rate", "critical", AlertState.RESOLVED, "dev/boom", 0.0, 0.05,
                  FIRING.message, FIRING.started_at, 1_700_000_120.0)


async def test_webhook_and_slack_payloads_in_order(receiver: Receiver) -> None:
    metrics = SinkMetrics(CollectorRegistry())
    async with aiohttp.ClientSession() as session:
        sinks = Sinks.build(session, metrics, [f"{receiver.url}/hook"],
                            [f"{receiver.url}/slack"], retries=2, timeout=5)
        sinks.start()
        sinks.notify(FIRING)
        sinks.notify(RESOLVED)
        await receiver.wait_for(4)
        await sinks.close(5)
    hooks = [body for path, body in receiver.accepted if path == "/hook"]
    slacks = [body for path, body in receiver.accepted if path == "/slack"]
    assert hooks == [
        {"alert": "error_rate", "severity": "critical", "state": "firing",
         "subject": "dev/boom", "value": 0.5, "threshold": 0.05, "message": FIRING.message,
         "started_at": 1_700_000_000.0, "resolved_at": None},
        {"alert": "error_rate", "severity": "critical", "state": "resolved",
         "subject": "dev/boom", "value": 0.0, "threshold": 0.05, "message": FIRING.message,
         "started_at": 1_700_000_000.0, "resolved_at": 1_700_000_120.0}]
    assert [set(s) for s in slacks] == [{"text", "blocks"}, {"text", "blocks"}]
    assert "FIRING" in slacks[0]["text"] and "RESOLVED" not in slacks[0]["text"]
    assert slacks[1]["text"].startswith("RESOLVED")
    assert "dev/boom" in slacks[0]["text"]
    for slack in slacks:
        assert slack["blocks"][0]["type"] == "section"
        assert slack["blocks"][0]["text"]["type"] == "mrkdwn"
        assert "threshold `0.05`" in slack["blocks"][1]["elements"][0]["text"]
    assert counted(metrics, "webhook", "delivered") == 2
    assert counted(metrics, "slack", "delivered") == 2


async def test_a_failing_receiver_is_retried_with_backoff(receiver: Receiver) -> None:
    receiver.failures_left = 2
    metrics = SinkMetrics(CollectorRegistry())
    async with aiohttp.ClientSession() as session:
        sinks = Sinks.build(session, metrics, [f"{receiver.url}/hook"], [], retries=3,
                            timeout=5, backoff_first=0.01, backoff_max=0.05)
        sinks.start()
        sinks.notify(FIRING)
        await receiver.wait_for(1)
        await sinks.close(5)
    assert len(receiver.attempts) == 3
    assert receiver.attempts[0] == receiver.accepted[0]
    assert counted(metrics, "webhook", "delivered") == 1
    assert counted(metrics, "webhook", "failed") == 0


async def test_a_notice_given_up_is_counted_and_the_next_one_still_goes(
        receiver: Receiver) -> None:
    receiver.failures_left = 3  # retries=2: three attempts, all refused
    metrics = SinkMetrics(CollectorRegistry())
    async with aiohttp.ClientSession() as session:
        sinks = Sinks.build(session, metrics, [f"{receiver.url}/hook"], [], retries=2,
                            timeout=5, backoff_first=0.01, backoff_max=0.05)
        sinks.start()
        sinks.notify(FIRING)
        sinks.notify(RESOLVED)
        await receiver.wait_for(1)
        await sinks.close(5)
    assert len(receiver.attempts) == 4
    assert [body["state"] for _, body in receiver.accepted] == ["resolved"]
    assert counted(metrics, "webhook", "failed") == 1
    assert counted(metrics, "webhook", "delivered") == 1


async def test_an_unreachable_receiver_does_not_block_the_caller() -> None:
    metrics = SinkMetrics(CollectorRegistry())
    async with aiohttp.ClientSession() as session:
        # Port 9 (discard) on loopback: nothing listens, the connection is refused.
        sinks = Sinks.build(session, metrics, ["http://127.0.0.1:9/hook"], [], retries=1,
                            timeout=2, backoff_first=0.01, backoff_max=0.02)
        sinks.start()
        sinks.notify(FIRING)  # returns at once: delivery is the sender task's
        await sinks.close(10)
    assert counted(metrics, "webhook", "failed") == 1

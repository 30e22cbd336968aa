"""Protection under load, against the real platform through gateway replicas with
small limits (issue 6, item 3): per-key rate limits, the per-function queue bound with
hysteresis, and circuit breakers per function and per node."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, Replica, deploy_once, wait_for_file
from thaw.gateway.app import make_app
from thaw.gateway.config import GatewaySettings
from thaw.proto import scheduler_pb2

# Bounds a wait for the replica's own view of its queue; reached in milliseconds.
QUEUE_WAIT_SECONDS = 20.0


def test_rate_limit_per_key(platform: RunningPlatform,
                            replica: Callable[[dict[str, str]], Replica]) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    gw = replica({"THAW_RATE_LIMIT_RPM": "6", "THAW_RATE_LIMIT_BURST": "2"})
    assert [gw.http.post(f"/fn/dev/{name}", json={}).status_code for _ in range(2)] == [200] * 2
    limited = gw.http.post(f"/fn/dev/{name}", json={})
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert limited.headers["Retry-After"] == "10"  # one token every 10 s at 6 a minute
    # The OpenAI routes count against the same key.
    assert gw.http.get("/v1/models").status_code == 429
    # Limits are per replica: the platform's own gateway is not limited.
    assert platform.http.post(f"/fn/dev/{name}", json={}).status_code == 200
    assert 'thaw_errors_total{code="rate_limited"} 2.0' in gw.http.get("/metrics").text


def _queue_depth(gw: Replica, function: str) -> float:
    match = re.search(rf'thaw_queue_depth{{function="{function}"}} (\S+)',
                      gw.http.get("/metrics").text)
    return float(match.group(1)) if match else 0.0


def _wait_depth(gw: Replica, function: str, depth: int) -> None:
    deadline = time.monotonic() + QUEUE_WAIT_SECONDS
    while _queue_depth(gw, function) != depth:
        assert time.monotonic() < deadline, f"queue never reached {depth}"
        time.sleep(0.02)


def test_queue_bound_sheds_with_hysteresis(platform: RunningPlatform, exchange: Path,
                                           replica: Callable[[dict[str, str]], Replica]
                                           ) -> None:
    name = deploy_once(platform, BUNDLES / "gated")  # one instance, one slot
    function = f"dev/{name}"
    gw = replica({"THAW_QUEUE_HIGH_WATER": "3", "THAW_QUEUE_LOW_WATER": "1"})
    statuses: dict[str, int] = {}

    def call(tag: str) -> threading.Thread:
        def run() -> None:
            resp = gw.http.post(f"/fn/dev/{name}", json={
                "gate": str(exchange / f"gate-{tag}"), "sync": True,
                "started": str(exchange / f"started-{tag}")})
            statuses[tag] = resp.status_code
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def refused() -> bool:
        resp = gw.http.post(f"/fn/dev/{name}", json={"gate": str(exchange / "x"), "sync": True})
        if resp.status_code == 429:
            assert resp.json()["error"]["code"] == "overloaded"
            assert int(resp.headers["Retry-After"]) >= 1
            return True
        assert resp.status_code == 200, resp.text
        return False

    threads = [call("a")]
    try:
        wait_for_file(exchange / "started-a")  # `a` holds the only slot
        threads += [call(tag) for tag in "bcd"]
        _wait_depth(gw, function, 3)  # the high-water mark: shedding
        assert refused()
        (exchange / "gate-a").touch()
        _wait_depth(gw, function, 2)  # one left the queue; still above the low mark
        assert refused()
        (exchange / f"gate-{_first_started(exchange, 'bcd')}").touch()
        _wait_depth(gw, function, 1)  # at the low mark: admitting again
        threads.append(call("e"))
        _wait_depth(gw, function, 2)
    finally:
        for tag in "abcde":
            (exchange / f"gate-{tag}").touch()
        for thread in threads:
            thread.join(60)
    assert statuses == {tag: 200 for tag in "abcde"}


def _first_started(folder: Path, tags: str) -> str:
    deadline = time.monotonic() + QUEUE_WAIT_SECONDS
    while True:
        for tag in tags:
            if (folder / f"started-{tag}").exists():
                return tag
        assert time.monotonic() < deadline, "no queued call started"
        time.sleep(0.02)


def test_function_circuit_opens_and_recovers(platform: RunningPlatform,
                                             replica: Callable[[dict[str, str]], Replica]
                                             ) -> None:
    name = deploy_once(platform, BUNDLES / "crashy")
    gw = replica({"THAW_BREAKER_FAILURES": "2", "THAW_BREAKER_COOLDOWN": "1"})
    for _ in range(2):
        crashed = gw.http.post(f"/fn/dev/{name}/crash", json={})
        assert crashed.status_code == 502 and crashed.json()["error"]["code"] == "instance_failed"
    fast = gw.http.post(f"/fn/dev/{name}/fine", json={})
    assert fast.status_code == 503
    assert fast.json()["error"]["code"] == "circuit_open"
    assert "X-Thaw-Node" not in fast.headers  # refused before any instance was asked for
    assert fast.headers["Retry-After"] == "1"
    metrics = gw.http.get("/metrics").text
    assert f'thaw_circuit_state{{kind="function",name="dev/{name}"}} 2.0' in metrics
    # Another replica has its own breakers (per replica, like every limit here).
    assert platform.http.post(f"/fn/dev/{name}/fine", json={}).status_code == 200

    time.sleep(1.0)  # the cooldown: one probe goes through, succeeds, and closes it
    probe = gw.http.post(f"/fn/dev/{name}/fine", json={})
    assert probe.status_code == 200, probe.text
    assert gw.http.post(f"/fn/dev/{name}/fine", json={}).status_code == 200
    metrics = gw.http.get("/metrics").text
    assert f'thaw_circuit_state{{kind="function",name="dev/{name}"}} 0.0' in metrics


class UnreachableNodeScheduler:
    """Grants leases on a node whose data plane refuses connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.released: list[tuple[str, bool]] = []
        self.acquired = 0
        # The gateway's other scheduler services (async invocations, metering...) get
        # a channel to nowhere: their background work fails quietly, as with a
        # scheduler that is away.
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def authenticate(self, digest: str) -> scheduler_pb2.Principal:
        return scheduler_pb2.Principal(tenant="t", key_id="k", scopes=["invoke"])

    async def get_function(self, tenant: str, name: str) -> scheduler_pb2.FunctionInfo:
        return scheduler_pb2.FunctionInfo(tenant=tenant, name=name, state="ready")

    async def set_priority(self, invocation_id: str, priority: int, tenant: str = "",
                           bookkeeping: bool = False) -> scheduler_pb2.SetPriorityResponse:
        return scheduler_pb2.SetPriorityResponse(priority=priority)

    async def acquire(self, tenant: str, name: str, wait: float, priority: int = 0,
                      invocation_id: str = "") -> scheduler_pb2.Lease:
        self.acquired += 1
        return scheduler_pb2.Lease(lease_id=f"l{self.acquired}", node_id="n1",
                                   data_url=f"http://127.0.0.1:{self.port}",
                                   instance_id=f"i{self.acquired}", timeout_seconds=30)

    async def release(self, lease_id: str, failed: bool = False, reason: str = "") -> None:
        self.released.append((lease_id, failed))

    async def close(self) -> None:
        await self.channel.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NodeDown = tuple[TestClient[web.Request, web.Application], UnreachableNodeScheduler]


@pytest.fixture
async def node_down() -> AsyncIterator[NodeDown]:
    """The gateway in-process with a scheduler that places calls on a dead node."""
    sched = UnreachableNodeScheduler(_closed_port())
    settings = GatewaySettings.load(breaker_failures=2, breaker_cooldown=30, lease_linger=0)
    client = TestClient(TestServer(make_app(settings, scheduler=sched)))  # type: ignore[arg-type]
    await client.start_server()
    yield client, sched
    await client.close()


async def test_node_circuit_fails_fast(node_down: NodeDown) -> None:
    client, sched = node_down
    auth = {"Authorization": "Bearer thaw_test"}
    # A refused connection carried nothing, so the call goes again once on a fresh
    # lease: one call meets the node twice, which opens its circuit.
    resp = await client.post("/fn/t/f", json={}, headers=auth)
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "node_unreachable"
    resp = await client.post("/fn/t/g", json={}, headers=auth)  # another function, same node
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "circuit_open"
    assert int(resp.headers["Retry-After"]) == 30
    for _ in range(5):
        await asyncio.sleep(0)  # background releases
    # Unreachable: released as failed. Refused by the open circuit: released unused.
    assert sched.released == [("l1", True), ("l2", True), ("l3", False)]

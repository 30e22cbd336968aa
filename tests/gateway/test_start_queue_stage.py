"""A cold start's waits reach Server-Timing as one `queue` stage: the scheduler's wait for
a place and the node's wait in its activation budget (platform/activation.py) are added
up, and the stage list the dashboard stacks knows the stage."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from thaw.gateway.admission import FunctionQueues
from thaw.gateway.breaker import Breakers
from thaw.gateway.dispatch import Call, Dispatcher, merged_stages
from thaw.gateway.metrics import GatewayMetrics
from thaw.gateway.stats import STAGES, parse_server_timing
from thaw.proto import agent_pb2, scheduler_pb2


class Answer:
    status = 200
    content_length = 2

    def __init__(self) -> None:
        self.headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))

    async def read(self) -> bytes:
        return b"{}"

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class Nodes:
    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        return Answer()


class ColdLeases:
    """Hands out one lease of a restored instance with the given start timings."""

    def __init__(self, timings: list[tuple[str, float]]) -> None:
        self.timings = timings

    def take_idle(self, function: str) -> None:
        return None

    async def obtain(self, function: str, tenant: str, name: str, wait: float,
                     remaining: float | None, priority: int, request_id: str
                     ) -> tuple[scheduler_pb2.Lease, bool]:
        return scheduler_pb2.Lease(
            lease_id="l1", node_id="n1", instance_id="i1", data_url="http://node",
            start=agent_pb2.START_RESTORE,
            timings=[agent_pb2.Timing(stage=s, seconds=v) for s, v in self.timings]), False

    def release_soon(self, lease: scheduler_pb2.Lease, failed: bool = False,
                     reason: str = "") -> None:
        pass

    def forget_instance(self, instance_id: str) -> None:
        pass

    def done_with(self, function: str, lease: scheduler_pb2.Lease) -> None:
        pass

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.get_running_loop().create_task(coro)


def stage_count(metrics: GatewayMetrics, stage: str) -> float:
    for family in metrics.registry.collect():
        for sample in family.samples:
            if (sample.name == "thaw_invocation_stage_seconds_count"
                    and sample.labels.get("stage") == stage):
                return sample.value
    return 0.0


async def test_the_nodes_queue_wait_joins_the_schedulers_in_one_queue_stage() -> None:
    # The scheduler's wait first, then the node's stages, the activation budget's wait
    # among them (Agent._restore reports it as "queue").
    timings = [("queue", 0.2), ("fetch", 0.1), ("template", 0.05), ("queue", 0.5),
               ("restore", 0.3)]
    metrics = GatewayMetrics()
    d = Dispatcher(ColdLeases(timings), Nodes(), FunctionQueues(10, 5),  # type: ignore[arg-type]
                   Breakers("function", 5, 1.0), Breakers("node", 5, 1.0), metrics, 10.0)
    call = Call(tenant="t", name="f", path="", body=b"{}", headers={}, request_id="r1",
                timeout=None, received=asyncio.get_running_loop().time())
    exchange = await d.open(call)
    assert exchange.start == "restore"
    assert exchange.stages == [("queue", pytest.approx(0.7)), ("fetch", 0.1),
                               ("template", 0.05), ("restore", 0.3)]
    header = exchange.server_timing(total=True)
    assert header.count("queue;") == 1
    assert parse_server_timing(header)["queue"] == pytest.approx(700.0)
    assert stage_count(metrics, "queue") == 1
    assert "queue" in STAGES


def test_merged_stages_keep_their_first_order() -> None:
    assert merged_stages([("queue", 1.0), ("restore", 2.0), ("queue", 0.5)]) == [
        ("queue", 1.5), ("restore", 2.0)]
    assert merged_stages([]) == []

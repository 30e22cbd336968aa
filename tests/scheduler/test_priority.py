"""Priority at the scheduler: a saturated function's waiting acquires are served
highest priority first, FIFO within a level, aging lets long waiters through, an
operator's raise reorders the queue, and requests waiting for room on the nodes retry
placement in priority order."""

from __future__ import annotations

import asyncio

import pytest

from tests.scheduler.conftest import Cluster, GiB
from thaw.core.errors import NotFound
from thaw.scheduler.control import LeaseGrant
from thaw.scheduler.policy import PolicyConfig


async def queued(cluster: Cluster, name: str, count: int, served: list[str] | None = None
                 ) -> None:
    """Until `count` acquires of the function wait in its queue or were `served` (they
    read the DB first, in a thread, so their arrival is not immediate)."""
    for _ in range(500):
        pool = next((p for p in cluster.control.pools.values() if p.name == f"dev/{name}"),
                    None)
        if pool is not None and len(pool.queue) + len(served or ()) == count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} acquires of {name} never queued")


class Recorder:
    """Acquires that record the order they got their lease in and hold it until
    told, so the function stays saturated while the test looks."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.order: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def enqueue(self, label: str, priority: int) -> None:
        async def run() -> None:
            grant = await self.cluster.control.acquire("dev", self.name, 30, priority, label)
            self.order.append(label)
            await self.cluster.control.release(grant.lease_id, False, "")
        self.tasks.append(asyncio.create_task(run()))
        await queued(self.cluster, self.name, len(self.tasks), self.order)

    async def done(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)


async def saturated(cluster: Cluster, name: str) -> LeaseGrant:
    await cluster.add_node("n1")
    await cluster.deploy(name, max_instances=1, target_concurrency=1, max_concurrency=1)
    return await cluster.control.acquire("dev", name, 30)


@pytest.mark.parametrize("policy", [PolicyConfig(priority_aging_rate=0)])
async def test_a_saturated_function_serves_by_priority_then_arrival(cluster: Cluster) -> None:
    held = await saturated(cluster, "one")
    rec = Recorder(cluster, "one")
    for label, priority in [("p10-a", 10), ("p50-a", 50), ("p90-a", 90), ("p50-b", 50),
                            ("p10-b", 10), ("p90-b", 90), ("p50-c", 50)]:
        await rec.enqueue(label, priority)
    await cluster.control.release(held.lease_id, False, "")
    await rec.done()
    assert rec.order == ["p90-a", "p90-b", "p50-a", "p50-b", "p50-c", "p10-a", "p10-b"]


@pytest.mark.parametrize("policy", [PolicyConfig(priority_aging_rate=0)])
async def test_a_new_arrival_does_not_take_a_slot_freed_for_the_queue(
        cluster: Cluster) -> None:
    """Before priorities, whichever acquire ran first after a release took the slot;
    a waiting request is not overtaken by an equal one that arrives later."""
    held = await saturated(cluster, "fifo")
    rec = Recorder(cluster, "fifo")
    for i in range(5):
        await rec.enqueue(f"r{i}", 50)
    await cluster.control.release(held.lease_id, False, "")
    await rec.enqueue("late", 50)
    await rec.done()
    assert rec.order == ["r0", "r1", "r2", "r3", "r4", "late"]


@pytest.mark.parametrize("policy", [PolicyConfig(priority_aging_rate=1.0)])
async def test_aging_lets_a_long_waiting_low_priority_call_through(cluster: Cluster) -> None:
    held = await saturated(cluster, "aging")
    rec = Recorder(cluster, "aging")
    await rec.enqueue("old-p10", 10)
    cluster.clock.advance(100)  # 10 + 100 s x 1/s = 110 effective
    await rec.enqueue("new-p90", 90)
    await rec.enqueue("new-p100", 100)
    await cluster.control.release(held.lease_id, False, "")
    await rec.done()
    assert rec.order == ["old-p10", "new-p100", "new-p90"]


@pytest.mark.parametrize("policy", [PolicyConfig(priority_aging_rate=0)])
async def test_an_operator_raise_moves_a_queued_call_ahead(cluster: Cluster) -> None:
    held = await saturated(cluster, "raise")
    rec = Recorder(cluster, "raise")
    for label in ("a", "b", "c", "d"):
        await rec.enqueue(label, 50)
    function, priority, effective, ahead = cluster.control.set_priority("d", 60)
    assert (function, priority, effective, ahead) == ("dev/raise", 60, 60.0, 0)
    with pytest.raises(NotFound, match="not waiting"):
        cluster.control.set_priority("no-such-invocation", 60)
    await cluster.control.release(held.lease_id, False, "")
    await rec.done()
    assert rec.order == ["d", "a", "b", "c"]
    with pytest.raises(NotFound):
        cluster.control.set_priority("d", 70)  # served: not queued any more
    assert all(len(p.queue) == 0 for p in cluster.control.pools.values())


@pytest.mark.parametrize("policy", [PolicyConfig(priority_aging_rate=0)])
async def test_requests_waiting_for_room_retry_placement_by_priority(
        cluster: Cluster) -> None:
    """One device, room for one instance. While a busy instance holds it, a low- then
    a high-priority function wait for room; when it frees, the high one goes first
    even though the low one has waited longer."""
    await cluster.add_node("n1", capacities=[1 * GiB])
    for name in ("hog", "low", "high"):
        await cluster.deploy(name, gpu_memory=1 * GiB, max_instances=1,
                             target_concurrency=1, max_concurrency=1)
    hog = await cluster.control.acquire("dev", "hog", 30)
    order: list[str] = []
    grants: dict[str, LeaseGrant] = {}

    async def call(name: str, priority: int) -> None:
        grants[name] = await cluster.control.acquire("dev", name, 30, priority, name)
        order.append(name)

    low = asyncio.create_task(call("low", 10))
    await queued(cluster, "low", 1)
    while cluster.control.room_waiters < 1:
        await asyncio.sleep(0.005)
    high = asyncio.create_task(call("high", 90))
    while cluster.control.room_waiters < 2:
        await asyncio.sleep(0.005)
    await cluster.control.release(hog.lease_id, False, "")
    await asyncio.wait_for(high, 5)
    assert order == ["high"] and not low.done()
    await cluster.control.release(grants["high"].lease_id, False, "")
    await asyncio.wait_for(low, 5)
    assert order == ["high", "low"]
    await cluster.control.release(grants["low"].lease_id, False, "")


@pytest.mark.parametrize("policy", [PolicyConfig(priority_aging_rate=0)])
async def test_a_slot_freed_while_the_head_starts_an_instance_goes_to_the_next(
        cluster: Cluster) -> None:
    """The head is busy starting an instance of its own: a slot freed meanwhile is
    not held back for it, the next in line takes it (and the head its new instance)."""
    agent = await cluster.add_node("n1")
    await cluster.deploy("pair", max_instances=2, target_concurrency=1, max_concurrency=1)
    held = await cluster.control.acquire("dev", "pair", 30)
    gate = asyncio.Event()
    unguarded = agent.start_instance

    async def gated_start(request: object, timeout: float) -> object:
        await gate.wait()
        return await unguarded(request, timeout)  # type: ignore[arg-type]

    agent.start_instance = gated_start  # type: ignore[method-assign,assignment]
    rec = Recorder(cluster, "pair")
    await rec.enqueue("high", 90)  # starts the second instance, held at the gate
    pool = next(iter(cluster.control.pools.values()))
    while pool.starting < 1:
        await asyncio.sleep(0.005)
    await rec.enqueue("low", 10)
    await cluster.control.release(held.lease_id, False, "")
    await asyncio.wait_for(rec.tasks[1], 5)
    assert rec.order == ["low"] and not rec.tasks[0].done()
    gate.set()
    await rec.done()
    assert rec.order == ["low", "high"]

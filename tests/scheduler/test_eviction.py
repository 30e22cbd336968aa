"""When nothing fits (issue 5, item 2): evict idle instances, least recently used,
never below min_instances; else queue for room, bounded in size and time."""

from __future__ import annotations

import asyncio

import pytest

from tests.scheduler.conftest import Cluster, GiB
from thaw.core.errors import DeadlineExceeded, NoCapacity
from thaw.scheduler.events import EventKind
from thaw.scheduler.policy import PolicyConfig


async def warm(cluster: Cluster, name: str) -> str:
    grant = await cluster.control.acquire("dev", name, 30)
    await cluster.control.release(grant.lease_id, False, "")
    return grant.instance.id


async def test_a_start_that_does_not_fit_evicts_the_least_recently_used_idle_instance(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [4 * GiB])
    for name in ("a", "b"):
        await cluster.deploy(name, gpu_memory=2 * GiB)
    await cluster.deploy("c", gpu_memory=2 * GiB)
    first = await warm(cluster, "a")
    await cluster.advance(1)
    await warm(cluster, "b")
    await cluster.advance(1)
    await warm(cluster, "a")  # a is used again: b is now the least recently used
    grant = await cluster.control.acquire("dev", "c", 30)
    assert grant.start == "fresh"
    assert [(i, r) for i, r in agent.stopped] == [
        (agent.started[1], "evicted to make room for dev/c")]
    assert first in agent.running and grant.instance.id in agent.running
    assert agent.used() == [4 * GiB]
    evicted = cluster.control.events.since(kinds=[EventKind.INSTANCE_EVICTED])
    assert len(evicted) == 1 and evicted[0].function == "dev/b"


@pytest.mark.parametrize("policy", [PolicyConfig(placement_queue_timeout=0.5)])
async def test_min_instances_are_never_evicted_and_the_request_times_out_clearly(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [2 * GiB])
    await cluster.deploy("kept", gpu_memory=2 * GiB, min_instances=1)
    await cluster.control.reconcile_once()
    await cluster.settle()
    assert len(agent.running) == 1
    await cluster.deploy("new", gpu_memory=GiB)
    waiting = asyncio.create_task(cluster.control.acquire("dev", "new", 30))
    await asyncio.sleep(0.05)
    assert cluster.control.room_waiters == 1
    cluster.clock.advance(1)  # past placement_queue_timeout by the scheduler's clock
    cluster.control._room.fire()
    with pytest.raises(DeadlineExceeded) as err:
        await asyncio.wait_for(waiting, 5)
    assert "no room for dev/new" in str(err.value)
    assert "no idle instance can be evicted" in str(err.value)
    assert agent.stopped == [] and cluster.control.room_waiters == 0
    kinds = [e.kind for e in cluster.control.events.since()]
    assert EventKind.PLACEMENT_QUEUED in kinds and EventKind.PLACEMENT_REFUSED in kinds


async def test_a_queued_request_starts_once_room_frees_up(cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [2 * GiB])
    await cluster.deploy("big", gpu_memory=2 * GiB)
    await cluster.deploy("other", gpu_memory=2 * GiB)
    held = await cluster.control.acquire("dev", "big", 30)  # busy: not evictable
    waiting = asyncio.create_task(cluster.control.acquire("dev", "other", 30))
    await asyncio.sleep(0.05)
    assert not waiting.done() and cluster.control.room_waiters == 1
    await cluster.control.release(held.lease_id, False, "")
    # Now idle: the queued request's next attempt evicts it.
    grant = await asyncio.wait_for(waiting, 5)
    assert grant.instance.id in agent.running and held.instance.id not in agent.running


@pytest.mark.parametrize("policy", [PolicyConfig(placement_queue_max=0)])
async def test_past_the_placement_queue_bound_nothing_fits_is_no_capacity(
        cluster: Cluster) -> None:
    await cluster.add_node("n1", [GiB])
    await cluster.deploy("huge", gpu_memory=4 * GiB)
    with pytest.raises(NoCapacity, match="no node has 4294967296 bytes .* already queued"):
        await cluster.control.acquire("dev", "huge", 30)


async def test_placement_spreads_over_devices_and_the_ledger_matches_the_agent(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [3 * GiB, 2 * GiB])
    await cluster.deploy("two", gpu_memory=2 * GiB, target_concurrency=1, max_concurrency=1)
    grants = await asyncio.gather(*(cluster.control.acquire("dev", "two", 30)
                                    for _ in range(2)))
    node = cluster.control.nodes["n1"]
    assert sorted(node.slices[g.instance.id] for g in grants) == sorted(
        agent.running[g.instance.id] for g in grants)
    assert node.device_free() == [GiB, 0]

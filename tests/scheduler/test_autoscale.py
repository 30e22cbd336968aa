"""Autoscaling by [scaling] against a ControlPlane with a fake clock and fake agents
(issue 5, item 1): bursts start no more instances than the demand needs, min_instances
are kept warm, idle instances scale to zero after scaledown_window."""

from __future__ import annotations

import asyncio

import pytest

from tests.scheduler.conftest import Cluster, GiB
from thaw.core.errors import DeadlineExceeded, NoCapacity
from thaw.core.spec import Scaling
from thaw.scheduler.autoscale import (
    IdleInstanceView,
    instances_wanted,
    scale_down,
    should_start,
)
from thaw.scheduler.control import WARM_RETRY_SECONDS
from thaw.scheduler.events import EventKind
from thaw.scheduler.policy import PolicyConfig
from thaw.scheduler.states import InstanceState


def test_instances_wanted_follows_target_concurrency_within_bounds() -> None:
    scaling = Scaling(min_instances=1, max_instances=10, target_concurrency=10,
                      max_concurrency=10)
    assert [instances_wanted(d, scaling) for d in (0, 1, 10, 11, 100, 1000)] == [
        1, 1, 1, 2, 10, 10]
    # Instances still starting count: a burst does not start one per waiting request.
    assert not should_start(live=0, starting=10, demand=100, scaling=scaling)
    assert should_start(live=3, starting=6, demand=100, scaling=scaling)


def test_scale_down_takes_lru_idle_instances_past_their_window_keeping_min() -> None:
    idle = [IdleInstanceView("recent", 95.0, 60.0), IdleInstanceView("old", 10.0, 60.0),
            IdleInstanceView("older", 5.0, 60.0)]
    assert scale_down(idle, live=3, min_instances=0, now=100.0) == ["older", "old"]
    assert scale_down(idle, live=3, min_instances=2, now=100.0) == ["older"]
    assert scale_down(idle, live=5, min_instances=0, now=30.0) == []


async def test_a_burst_of_100_at_zero_starts_at_most_10_and_drops_none(
        cluster: Cluster) -> None:
    await cluster.add_node("n1", start_delay=0.05)
    await cluster.deploy("burst", max_instances=50, target_concurrency=10,
                         max_concurrency=10)

    async def call() -> str:
        grant = await cluster.control.acquire("dev", "burst", 30)
        await asyncio.sleep(0.05)  # the handler runs
        await cluster.control.release(grant.lease_id, False, "")
        return grant.instance.id

    used = await asyncio.gather(*(call() for _ in range(100)))
    assert len(used) == 100
    started = cluster.agent("n1").started
    assert 1 <= len(started) <= 10, started
    assert set(used) == set(started)
    pool = next(iter(cluster.control.pools.values()))
    assert pool.waiters == 0 and pool.starting == 0
    assert all(i.inflight == 0 for i in pool.instances.values())


async def test_max_instances_caps_a_burst_and_the_rest_queue(cluster: Cluster) -> None:
    await cluster.add_node("n1", start_delay=0.02)
    await cluster.deploy("capped", max_instances=2, target_concurrency=1, max_concurrency=1)

    async def call() -> str:
        grant = await cluster.control.acquire("dev", "capped", 30)
        await asyncio.sleep(0.02)
        await cluster.control.release(grant.lease_id, False, "")
        return grant.instance.id

    used = await asyncio.gather(*(call() for _ in range(20)))
    assert len(set(used)) == 2 and len(cluster.agent("n1").started) == 2


async def test_a_request_that_finds_every_instance_busy_times_out_clearly(
        cluster: Cluster) -> None:
    await cluster.add_node("n1")
    await cluster.deploy("single", max_instances=1, target_concurrency=1, max_concurrency=1)
    held = await cluster.control.acquire("dev", "single", 30)
    waiting = asyncio.create_task(cluster.control.acquire("dev", "single", 0.2))
    await asyncio.sleep(0.05)
    cluster.clock.advance(1)  # past the deadline by the scheduler's clock
    with pytest.raises(DeadlineExceeded, match="max_instances=1"):
        await asyncio.wait_for(waiting, 5)
    await cluster.control.release(held.lease_id, False, "")


@pytest.mark.parametrize("policy", [PolicyConfig(function_queue_max=3)])
async def test_past_the_function_queue_bound_requests_are_refused(
        cluster: Cluster) -> None:
    await cluster.add_node("n1")
    await cluster.deploy("narrow", max_instances=1, target_concurrency=1, max_concurrency=1)
    held = await cluster.control.acquire("dev", "narrow", 30)

    async def call() -> None:
        grant = await cluster.control.acquire("dev", "narrow", 30)
        await cluster.control.release(grant.lease_id, False, "")

    queued = [asyncio.create_task(call()) for _ in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(NoCapacity, match="3 requests waiting"):
        await cluster.control.acquire("dev", "narrow", 30)
    await cluster.control.release(held.lease_id, False, "")
    await asyncio.wait_for(asyncio.gather(*queued), 5)


async def test_idle_instances_scale_to_zero_after_the_scaledown_window(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1")
    await cluster.deploy("idle", scaledown_window=60.0)
    grant = await cluster.control.acquire("dev", "idle", 30)
    await cluster.control.release(grant.lease_id, False, "")

    await cluster.advance(59)
    await cluster.control.reconcile_once()
    assert agent.stopped == []
    await cluster.advance(2)
    await cluster.control.reconcile_once()
    assert agent.stopped == [(grant.instance.id, "idle past scaledown_window")]
    assert cluster.control.warm_count(grant.instance.function_id) == 0
    store = cluster.control.store
    assert (await store.run(store.get_instance, grant.instance.id)).state == "gone"
    # The next request is a cold start again.
    again = await cluster.control.acquire("dev", "idle", 30)
    assert again.start != "warm" and again.instance.id != grant.instance.id


async def test_busy_instances_do_not_scale_down(cluster: Cluster) -> None:
    agent = await cluster.add_node("n1")
    await cluster.deploy("busy", scaledown_window=1.0)
    grant = await cluster.control.acquire("dev", "busy", 30)
    await cluster.advance(100)
    await cluster.control.reconcile_once()
    assert agent.stopped == []
    await cluster.control.release(grant.lease_id, False, "")
    await cluster.advance(2)
    await cluster.control.reconcile_once()
    assert [i for i, _ in agent.stopped] == [grant.instance.id]


async def test_min_instances_are_started_proactively_and_kept(cluster: Cluster) -> None:
    agent = await cluster.add_node("n1")
    fn = await cluster.deploy("warm", min_instances=2, max_instances=4,
                              scaledown_window=10.0)
    await cluster.control.reconcile_once()
    await cluster.control.reconcile_once()  # no double start while the first two run
    await cluster.settle()
    assert len(agent.started) == 2 and cluster.control.warm_count(fn.id) == 2

    # The first call is warm: nothing waited for a cold start.
    grant = await cluster.control.acquire("dev", "warm", 30)
    assert grant.start == "warm"
    await cluster.control.release(grant.lease_id, False, "")
    await cluster.advance(3600)
    await cluster.control.reconcile_once()
    await cluster.settle()
    assert agent.stopped == [] and cluster.control.warm_count(fn.id) == 2

    # One dies: the loop replaces it.
    dead = next(iter(agent.running))
    agent.running.pop(dead)
    await cluster.heartbeat("n1")
    await cluster.control._forget_instance(dead, "exited")
    await cluster.control.reconcile_once()
    await cluster.settle()
    assert len(agent.started) == 3 and cluster.control.warm_count(fn.id) == 2


async def test_extra_instances_above_min_scale_down_to_min(cluster: Cluster) -> None:
    agent = await cluster.add_node("n1")
    fn = await cluster.deploy("some", min_instances=1, max_instances=4, target_concurrency=1,
                              max_concurrency=1, scaledown_window=10.0)
    grants = await asyncio.gather(*(cluster.control.acquire("dev", "some", 30)
                                    for _ in range(3)))
    for grant in grants:
        await cluster.control.release(grant.lease_id, False, "")
    assert cluster.control.warm_count(fn.id) == 3
    await cluster.advance(11)
    await cluster.control.reconcile_once()
    await cluster.settle()
    assert cluster.control.warm_count(fn.id) == 1 and len(agent.stopped) == 2
    pool = cluster.control.pools[fn.id]
    assert [i.state for i in pool.instances.values()] == [InstanceState.READY]


async def test_min_instances_that_cannot_fit_are_retried_with_a_pause(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [GiB])
    await cluster.deploy("toobig", gpu_memory=2 * GiB, min_instances=1)

    def refusals() -> int:
        return len(cluster.control.events.since(kinds=[EventKind.PLACEMENT_REFUSED]))

    await cluster.control.reconcile_once()
    await cluster.settle()
    assert refusals() == 1 and agent.started == []
    await cluster.control.reconcile_once()
    await cluster.settle()
    assert refusals() == 1  # not every tick
    await cluster.advance(WARM_RETRY_SECONDS + 1)
    await cluster.control.reconcile_once()
    await cluster.settle()
    assert refusals() == 2

"""A scheduler restart adopts the instances its nodes still run (issue 5, item 4) and a
dead node is written off quickly (item 5): control-plane level, with fake agents."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.scheduler.conftest import Cluster, FakeAgent, FakeClock, GiB, make_control
from thaw.proto import scheduler_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.states import NodeState


async def register(cluster: Cluster, node_id: str, agent: FakeAgent) -> None:
    await cluster.control.register(scheduler_pb2.RegisterRequest(
        node_id=node_id, control_address=agent.address, data_url=f"http://{node_id}",
        devices=agent.devices(), instance_ids=list(agent.running)))


async def restarted(cluster: Cluster, tmp_path: Path) -> Cluster:
    """A new control plane on the same DB and the same (still running) agents."""
    await cluster.control.close()
    cluster.control.store.close()
    clock = FakeClock(cluster.clock.now + 100)  # a new process: its own clock
    control = make_control(tmp_path, clock, cluster.agents, db=cluster.db_url)
    await control.recover()
    return Cluster(control, clock, cluster.agents)


async def test_a_restarted_scheduler_adopts_live_instances_of_the_current_version(
        db_cluster: Cluster, tmp_path: Path) -> None:
    cluster = db_cluster
    agent = await cluster.add_node("n1", [4 * GiB])
    fn = await cluster.deploy("f", gpu_memory=GiB)
    grant = await cluster.control.acquire("dev", "f", 30)
    await cluster.control.release(grant.lease_id, False, "")
    agent.running["inst_stray"] = (0, GiB)  # started by the old scheduler, never recorded

    new = await restarted(cluster, tmp_path)
    try:
        await register(new, "n1", agent)
        assert new.control.warm_count(fn.id) == 1
        assert agent.stopped == [("inst_stray", "unknown to the scheduler")]
        node = new.control.nodes["n1"]
        assert node.slices == {grant.instance.id: (0, GiB)}  # counted once, not leaked
        again = await new.control.acquire("dev", "f", 30)
        assert (again.start, again.instance.id) == ("warm", grant.instance.id)
        await new.control.release(again.lease_id, False, "")
        assert len(agent.started) == 1
        store = new.control.store
        assert [i.id for i in await store.run(store.live_instances)] == [grant.instance.id]
        assert [e.kind for e in new.control.events.since(
            kinds=[EventKind.INSTANCE_ADOPTED])] == [EventKind.INSTANCE_ADOPTED]
    finally:
        await new.control.close()
        new.control.store.close()


async def test_instances_of_a_replaced_version_are_stopped_and_unreported_ones_ended(
        db_cluster: Cluster, tmp_path: Path) -> None:
    cluster = db_cluster
    agent = await cluster.add_node("n1")
    gone_agent = await cluster.add_node("n2")
    await cluster.deploy("f", target_concurrency=1, max_concurrency=1)
    grants = await asyncio.gather(*(cluster.control.acquire("dev", "f", 30) for _ in range(2)))
    by_node = {g.instance.node_id: g.instance.id for g in grants}
    assert set(by_node) == {"n1", "n2"}, by_node

    new = await restarted(cluster, tmp_path)
    try:
        await new.deploy("f", target_concurrency=1, max_concurrency=1)  # version 2
        await register(new, "n1", agent)
        assert agent.stopped == [(by_node["n1"], "its function changed version")]
        store = new.control.store
        assert (await store.run(store.get_instance, by_node["n1"])).state == "gone"
        # n2 never comes back: its instance is ended once the grace has passed.
        assert by_node["n2"] in gone_agent.running
        new.clock.advance(new.control.node_timeout + 3 * new.control.heartbeat_interval)
        await new.heartbeat("n1")
        await new.control.reconcile_once()
        assert await store.run(store.live_instances) == []
    finally:
        await new.control.close()
        new.control.store.close()


async def test_a_node_whose_agent_is_gone_is_lost_at_the_first_failed_start(
        cluster: Cluster) -> None:
    dead = await cluster.add_node("n1", [3 * GiB])  # the best fit for 3 GiB
    alive = await cluster.add_node("n2", [8 * GiB])
    await cluster.deploy("f", gpu_memory=3 * GiB)
    dead.down = True
    grant = await asyncio.wait_for(cluster.control.acquire("dev", "f", 30), 5)
    # n1 refused the start and does not answer: lost now, not after node_timeout,
    # and the request landed on n2.
    assert grant.instance.node_id == "n2" and alive.started == [grant.instance.id]
    assert cluster.control.nodes["n1"].state is NodeState.LOST
    assert cluster.control.nodes["n1"].slices == {}
    lost = cluster.control.events.since(kinds=[EventKind.NODE_LOST])
    assert len(lost) == 1 and "unreachable while starting" in lost[0].message
    await cluster.control.release(grant.lease_id, False, "")


async def test_a_failed_invocation_on_a_dead_node_writes_the_node_off(
        cluster: Cluster) -> None:
    dead = await cluster.add_node("n1")
    await cluster.add_node("n2")
    await cluster.deploy("f", target_concurrency=1, max_concurrency=1)
    grants = await asyncio.gather(*(cluster.control.acquire("dev", "f", 30) for _ in range(2)))
    on_dead = next(g for g in grants if g.instance.node_id == "n1")
    on_alive = next(g for g in grants if g.instance.node_id == "n2")
    dead.down = True
    # The gateway could not reach n1's data plane and says so when it releases.
    await cluster.control.release(on_dead.lease_id, True, "node n1 unreachable")
    await cluster.settle()
    assert cluster.control.nodes["n1"].state is NodeState.LOST
    await cluster.control.release(on_alive.lease_id, False, "")
    again = await asyncio.wait_for(cluster.control.acquire("dev", "f", 30), 5)
    assert (again.start, again.instance.node_id) == ("warm", "n2")
    await cluster.control.release(again.lease_id, False, "")


async def test_a_silent_node_is_lost_after_node_timeout(cluster: Cluster) -> None:
    silent = await cluster.add_node("n1")
    await cluster.deploy("f")
    grant = await cluster.control.acquire("dev", "f", 30)
    silent.down = True  # no more heartbeats
    await cluster.advance(cluster.control.node_timeout - 0.5)
    await cluster.control.reconcile_once()
    assert cluster.control.nodes["n1"].state is NodeState.READY
    await cluster.advance(1)
    await cluster.control.reconcile_once()
    assert cluster.control.nodes["n1"].state is NodeState.LOST
    assert cluster.control.warm_count(grant.instance.function_id) == 0
    # The lease still held on the lost instance releases cleanly.
    await cluster.control.release(grant.lease_id, True, "node n1 unreachable")

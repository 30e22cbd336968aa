"""Re-registration is idempotent and an agent restart keeps its node: control-plane
level, with fake agents. A node id is one node; another agent process under it (a new
boot id) replaces the old one's instances; an agent that says it stops leaves its node
RESTARTING (no new work, never written off while it comes back) instead of LOST."""

from __future__ import annotations

from tests.scheduler.conftest import Cluster, FakeAgent, GiB
from thaw.proto import scheduler_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.states import NodeState


async def register(cluster: Cluster, node_id: str, agent: FakeAgent, boot_id: str) -> None:
    await cluster.control.register(scheduler_pb2.RegisterRequest(
        node_id=node_id, control_address=agent.address, data_url=f"http://{node_id}",
        devices=agent.devices(), instance_ids=list(agent.running), boot_id=boot_id))


def node_events(cluster: Cluster) -> list[str]:
    return [e.message for e in cluster.control.events.since(
        kinds=[EventKind.NODE_REGISTERED, EventKind.NODE_LOST, EventKind.NODE_RECOVERED])]


async def test_the_same_agent_registering_again_changes_nothing(cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [4 * GiB])
    await register(cluster, "n1", agent, "boot-1")
    await cluster.deploy("f", gpu_memory=GiB)
    grant = await cluster.control.acquire("dev", "f", 30)
    await cluster.control.release(grant.lease_id, False, "")

    await register(cluster, "n1", agent, "boot-1")  # a retried Register
    node = cluster.control.nodes["n1"]
    assert list(cluster.control.nodes) == ["n1"] and node.state is NodeState.READY
    assert node.slices == {grant.instance.id: (0, GiB)}
    again = await cluster.control.acquire("dev", "f", 30)
    assert (again.start, again.instance.id) == ("warm", grant.instance.id)
    assert agent.stopped == []


async def test_a_restarted_agent_replaces_its_instances_and_the_node_stays(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [4 * GiB])
    await register(cluster, "n1", agent, "boot-1")
    await cluster.deploy("f", gpu_memory=GiB)
    grant = await cluster.control.acquire("dev", "f", 30)
    await cluster.control.release(grant.lease_id, False, "")

    agent.running.clear()  # the new process runs nothing yet
    await register(cluster, "n1", agent, "boot-2")
    node = cluster.control.nodes["n1"]
    assert node.state is NodeState.READY and node.boot_id == "boot-2"
    assert node.slices == {}  # the old instance's slice is no longer charged
    assert cluster.control.warm_count(grant.instance.function_id) == 0
    assert "node n1 re-registered: its agent restarted" in node_events(cluster)
    fresh = await cluster.control.acquire("dev", "f", 30)
    assert fresh.instance.id != grant.instance.id and fresh.instance.node_id == "n1"
    # The old process's heartbeats are not taken for the new one's.
    old = await cluster.control.heartbeat(scheduler_pb2.HeartbeatRequest(
        node_id="n1", devices=agent.devices(), boot_id="boot-1"))
    assert old is False
    assert not [m for m in node_events(cluster) if "lost" in m]


async def test_an_agent_that_stops_leaves_its_node_restarting_not_lost(
        cluster: Cluster) -> None:
    agent = await cluster.add_node("n1", [4 * GiB])
    other = await cluster.add_node("n2", [4 * GiB])
    await register(cluster, "n1", agent, "boot-1")
    await cluster.control.cordon("n2", True)
    await cluster.deploy("f", gpu_memory=GiB)
    grant = await cluster.control.acquire("dev", "f", 30)  # held across the restart
    await cluster.control.cordon("n2", False)

    assert await cluster.control.heartbeat(scheduler_pb2.HeartbeatRequest(
        node_id="n1", boot_id="boot-1", stopping=True))
    node = cluster.control.nodes["n1"]
    assert node.state is NodeState.RESTARTING
    assert cluster.control.warm_count(grant.instance.function_id) == 0
    # While it is away, a failed call does not write it off, and new work goes elsewhere.
    agent.down = True
    await cluster.control.release(grant.lease_id, True, "node n1 unreachable")
    await cluster.settle()
    elsewhere = await cluster.control.acquire("dev", "f", 30)
    assert elsewhere.instance.node_id == "n2"
    cluster.clock.advance(2.0)
    await cluster.heartbeat("n2")
    await cluster.control.reconcile_once()
    assert node.state is NodeState.RESTARTING
    assert other.started and all(i not in agent.running for i in other.started)

    agent.down = False
    agent.running.clear()
    await register(cluster, "n1", agent, "boot-2")
    assert node.state is NodeState.READY
    assert not [m for m in node_events(cluster) if "lost" in m]
    assert "node n1 restarting: its agent is stopping" in node_events(cluster)


async def test_a_restarting_node_that_never_comes_back_is_lost(cluster: Cluster) -> None:
    agent = await cluster.add_node("n1")
    await register(cluster, "n1", agent, "boot-1")
    await cluster.control.heartbeat(scheduler_pb2.HeartbeatRequest(
        node_id="n1", boot_id="boot-1", stopping=True))
    agent.down = True
    cluster.clock.advance(cluster.control.node_timeout + 1)
    await cluster.control.reconcile_once()
    assert cluster.control.nodes["n1"].state is NodeState.LOST

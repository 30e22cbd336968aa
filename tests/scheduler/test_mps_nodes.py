"""Which nodes apply a function's gpu_compute share: a node says in its heartbeat whether
an MPS daemon serves its GPUs, and the scheduler names the live nodes that could run the
function but would not apply the share."""

from __future__ import annotations

from tests.scheduler.conftest import Cluster
from thaw.proto import agent_pb2, scheduler_pb2
from thaw.scheduler.nodes import compute_unenforced
from thaw.scheduler.states import NodeState


async def heartbeat(cluster: Cluster, node_id: str, *, mps: bool) -> None:
    agent = cluster.agent(node_id)
    assert await cluster.control.heartbeat(scheduler_pb2.HeartbeatRequest(
        node_id=node_id, devices=agent.devices(), instance_ids=list(agent.running),
        telemetry=agent_pb2.NodeTelemetry(mps_active=mps)))


async def test_nodes_without_mps_are_named_for_a_function_asking_a_share(
        cluster: Cluster) -> None:
    for node_id in ("gpu-a", "gpu-b", "gpu-c"):
        await cluster.add_node(node_id)
    nodes = cluster.control.nodes
    # Before its first heartbeat a node has said nothing: its shares are not applied.
    assert compute_unenforced(nodes.values(), 25) == ["gpu-a", "gpu-b", "gpu-c"]
    await heartbeat(cluster, "gpu-a", mps=True)
    await heartbeat(cluster, "gpu-b", mps=False)
    assert nodes["gpu-a"].mps_active and not nodes["gpu-b"].mps_active
    assert compute_unenforced(nodes.values(), 25) == ["gpu-b", "gpu-c"]
    # A function asking for no share is not concerned; a lost node runs nothing.
    assert compute_unenforced(nodes.values(), 0) == []
    nodes["gpu-c"].state = NodeState.LOST
    assert compute_unenforced(nodes.values(), 25) == ["gpu-b"]
    # An image function runs on docker nodes only, and these run processes.
    assert compute_unenforced(nodes.values(), 25, image="repo:tag@sha256:0") == []


async def test_a_daemon_that_stops_is_seen_at_the_next_heartbeat(cluster: Cluster) -> None:
    await cluster.add_node("gpu-a")
    await heartbeat(cluster, "gpu-a", mps=True)
    assert compute_unenforced(cluster.control.nodes.values(), 50) == []
    await heartbeat(cluster, "gpu-a", mps=False)
    assert compute_unenforced(cluster.control.nodes.values(), 50) == ["gpu-a"]

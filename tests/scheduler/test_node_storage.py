"""Nodes whose data directory is full or read-only (their heartbeats' conditions): the
change is an event, builds go to a healthy node, and a deploy with no healthy node is
refused at once with InsufficientStorage (507) naming the node and the directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scheduler.conftest import Cluster
from tests.scheduler.test_build_retry import add, bundle, messages
from thaw.core.errors import InsufficientStorage
from thaw.proto import scheduler_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.states import FunctionState

FULL = scheduler_pb2.NodeCondition(type="disk_full", path="/var/lib/thaw/agent/n0",
                                   message="3.0MiB free of 1.0GiB", free_bytes=3 << 20,
                                   total_bytes=1 << 30)


async def report(cluster: Cluster, node_id: str,
                 *conditions: scheduler_pb2.NodeCondition) -> None:
    agent = cluster.agent(node_id)
    assert await cluster.control.heartbeat(scheduler_pb2.HeartbeatRequest(
        node_id=node_id, devices=agent.devices(), conditions=list(conditions)))


async def test_a_deploy_to_a_full_node_is_refused_with_507_until_it_is_freed(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add(cluster, "n0")
    await report(cluster, "n0", FULL)
    await report(cluster, "n0", FULL)  # unchanged: no second event
    assert messages(cluster, EventKind.NODE_CONDITION) == [
        "node n0: /var/lib/thaw/agent/n0 is disk-full (3.0MiB free of 1.0GiB)"]
    data = bundle(tmp_path)
    with pytest.raises(InsufficientStorage) as refused:
        await cluster.control.create_function("dev", data, wait=True)
    assert refused.value.message.startswith(
        "insufficient storage on node n0: /var/lib/thaw/agent/n0 is disk-full")
    assert agent.builds == []

    await report(cluster, "n0")
    assert messages(cluster, EventKind.NODE_CONDITION)[-1] == (
        "node n0: storage is writable again")
    fn = await cluster.control.create_function("dev", data, wait=True)
    assert fn.state is FunctionState.READY and agent.builds == ["1"]


async def test_builds_go_to_a_node_with_room(cluster: Cluster, tmp_path: Path) -> None:
    full = await add(cluster, "n0")  # first choice otherwise: lowest id
    roomy = await add(cluster, "n1")
    await report(cluster, "n0", FULL)
    fn = await cluster.control.create_function("dev", bundle(tmp_path), wait=True)
    assert fn.state is FunctionState.READY
    assert (full.builds, roomy.builds) == ([], ["1"])

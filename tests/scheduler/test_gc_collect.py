"""The scheduler's garbage collection pass (scheduler/gc.py) over a real DB with fake
agents: what each node is asked to keep, the event with the bytes it freed, and nodes
that cannot collect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.scheduler.conftest import Cluster
from tests.scheduler.test_versions import GatedAgent, deploy
from thaw.core.errors import NotFound
from thaw.core.spec import pack_bundle
from thaw.proto import agent_pb2, scheduler_pb2
from thaw.scheduler.events import EventKind


@dataclass
class CollectingAgent(GatedAgent):
    requests: list[agent_pb2.CollectGarbageRequest] = field(default_factory=list)

    async def collect(self, request: agent_pb2.CollectGarbageRequest,
                      timeout: float) -> agent_pb2.CollectGarbageResponse:
        self._check()
        self.requests.append(request)
        return agent_pb2.CollectGarbageResponse(freed_bytes=7000, freed=[
            agent_pb2.GarbageFreed(kind="chunks", items=1, bytes=1000),
            agent_pb2.GarbageFreed(kind="bundles", items=2, bytes=6000)])


async def add_node(cluster: Cluster, node_id: str) -> CollectingAgent:
    agent = CollectingAgent(f"{node_id}:1")
    cluster.agents[agent.address] = agent
    await cluster.control.register(scheduler_pb2.RegisterRequest(
        node_id=node_id, control_address=agent.address, data_url=f"http://{node_id}",
        devices=agent.devices()))
    return agent


def bundle(tmp_path: Path, name: str) -> bytes:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "thaw.toml").write_text(f'name = "{name}"\nhandler = "app:F"\n')
    (folder / "app.py").write_text("class F:\n    def __call__(self, request):\n"
                                   f"        return {name!r}\n")
    return pack_bundle(str(folder))


async def test_nodes_keep_the_bundles_of_live_functions_only(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_node(cluster, "n1")
    await deploy(cluster, agent, bundle(tmp_path, "kept"))
    await deploy(cluster, agent, bundle(tmp_path, "gone"))
    kept = await cluster.control.get_function("dev", "kept")
    gone = await cluster.control.get_function("dev", "gone")
    await cluster.control.delete_function("dev", "gone")
    await cluster.settle()

    (reply,) = await cluster.control.gc.collect()
    request = agent.requests[-1]
    assert request.files and not request.skip_chunks
    assert kept.bundle_digest in request.keep_bundles
    assert gone.bundle_digest not in request.keep_bundles
    assert [m.function for m in request.keep] == ["dev/kept"]
    assert reply.node_id == "n1" and reply.freed_bytes == 7000 and not reply.error

    (event,) = cluster.control.events.since(kinds=[EventKind.GARBAGE_COLLECTED])
    attrs = dict(event.attrs)
    assert event.node_id == "n1"
    assert attrs["freed_bytes"] == "7000" and attrs["bundles_bytes"] == "6000"
    assert attrs["chunks_bytes"] == "1000" and attrs["logs_bytes"] == "0"


async def test_one_node_or_a_clear_error(cluster: Cluster) -> None:
    first = await add_node(cluster, "n1")
    second = await add_node(cluster, "n2")
    second.down = True
    (only,) = await cluster.control.gc.collect("n1")
    assert only.node_id == "n1" and len(first.requests) == 1 and not second.requests
    replies = {r.node_id: r for r in await cluster.control.gc.collect()}
    assert replies["n1"].freed_bytes == 7000
    assert replies["n2"].error and replies["n2"].freed_bytes == 0
    # Only the node that collected has an event.
    events = cluster.control.events.since(kinds=[EventKind.GARBAGE_COLLECTED])
    assert [e.node_id for e in events] == ["n1", "n1"]
    with pytest.raises(NotFound):
        await cluster.control.gc.collect("no-such-node")


async def test_a_build_in_flight_keeps_its_bundle_and_every_chunk(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_node(cluster, "n1")
    task = asyncio.create_task(cluster.control.create_function(
        "dev", bundle(tmp_path, "slow"), wait=True))
    await agent.building()
    (building,) = [r for r, _done in agent.builds]
    await cluster.control.gc.collect()
    request = agent.requests[-1]
    # Its chunks are not named by any manifest yet: none are collected meanwhile.
    assert request.skip_chunks and not request.keep
    assert building.function.bundle_digest in request.keep_bundles
    await agent.finish()
    await task

"""A snapshot build whose node's agent dies goes on on another node, a bounded number of
times (build_attempts), and then fails naming every interruption; a build that fails on
its own (setup raised) is never retried. Control plane over SQLite, fake agents."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from tests.scheduler.conftest import Cluster, FakeAgent
from thaw.core.errors import Unavailable
from thaw.core.spec import pack_bundle
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.scheduler.events import EventKind
from thaw.scheduler.policy import PolicyConfig
from thaw.scheduler.states import FunctionState, NodeState

A = TypeVar("A", bound=FakeAgent)
# The scheduler's build_attempts setting in these tests (its default is 3).
ATTEMPTS = 2


@pytest.fixture
def policy() -> PolicyConfig:
    return PolicyConfig.load(flags={"build_attempts": str(ATTEMPTS)})


@dataclass
class BuildingAgent(FakeAgent):
    """Builds at once; `dies`: the agent process dies during the build."""

    dies: bool = False
    setup_fails: bool = False
    builds: list[str] = field(default_factory=list)

    async def build_snapshot(self, request: agent_pb2.BuildSnapshotRequest,
                             timeout: float) -> agent_pb2.BuildSnapshotResponse:
        self._check()
        self.builds.append(request.function.version)
        if self.dies:
            self.down = True
            raise Unavailable("peer unavailable: Socket closed")
        if self.setup_fails:
            return agent_pb2.BuildSnapshotResponse(ok=False, stage="setup",
                                                   reason="ValueError: no weights")
        return built(request)

    async def prepare_template(self, request: agent_pb2.PrepareTemplateRequest,
                               timeout: float) -> agent_pb2.PrepareTemplateResponse:
        return agent_pb2.PrepareTemplateResponse()


def built(request: agent_pb2.BuildSnapshotRequest) -> agent_pb2.BuildSnapshotResponse:
    """A successful build's answer: the built version's manifest."""
    manifest = manifest_pb2.SnapshotManifest(
        function=f"{request.function.tenant}/{request.function.name}",
        version=request.function.version)
    return agent_pb2.BuildSnapshotResponse(ok=True, manifest=manifest, stored_bytes=10)


async def register(cluster: Cluster, node_id: str, agent: A) -> A:
    """`agent` in the cluster, registered as the node `node_id`."""
    cluster.agents[agent.address] = agent
    await cluster.control.register(scheduler_pb2.RegisterRequest(
        node_id=node_id, control_address=agent.address, data_url=f"http://{node_id}",
        devices=agent.devices()))
    return agent


async def add(cluster: Cluster, node_id: str, **kwargs: bool) -> BuildingAgent:
    return await register(cluster, node_id, BuildingAgent(f"{node_id}:1", **kwargs))


def bundle(tmp_path: Path) -> bytes:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "thaw.toml").write_text('name = "built"\nhandler = "app:Built"\n')
    (folder / "app.py").write_text("class Built:\n    def __call__(self, r):\n"
                                   "        return {}\n")
    return pack_bundle(str(folder))


def messages(cluster: Cluster, kind: EventKind) -> list[str]:
    return [e.message for e in cluster.control.events.since(kinds=[kind])]


async def test_a_build_whose_agent_dies_is_built_on_another_node(
        cluster: Cluster, tmp_path: Path) -> None:
    dying = await add(cluster, "n0", dies=True)  # built first: fewest builds, lowest id
    good = await add(cluster, "n1")
    fn = await cluster.control.create_function("dev", bundle(tmp_path), wait=True)
    assert fn.state is FunctionState.READY and fn.start_mode == "restore"
    assert dying.builds == ["1"] and good.builds == ["1"]
    assert cluster.control.nodes["n0"].state is NodeState.LOST  # written off at once
    (retried,) = messages(cluster, EventKind.BUILD_RETRIED)
    assert "dev/built version 1: build interrupted on node n0: its agent died" in retried
    assert f"attempt 2 of {ATTEMPTS}" in retried
    assert messages(cluster, EventKind.BUILD_FAILED) == []


async def test_a_build_interrupted_build_attempts_times_fails_with_the_reasons(
        cluster: Cluster, tmp_path: Path) -> None:
    agents = [await add(cluster, f"n{i}", dies=True) for i in range(ATTEMPTS + 1)]
    fn = await cluster.control.create_function("dev", bundle(tmp_path), wait=True)
    assert fn.state is FunctionState.FAILED
    assert [len(a.builds) for a in agents] == [1] * ATTEMPTS + [0]  # bounded
    assert f"interrupted {ATTEMPTS} times (build_attempts = {ATTEMPTS})" in (
        fn.reason)
    assert all(f"node n{i}: its agent died" in fn.reason for i in range(ATTEMPTS))
    assert len(messages(cluster, EventKind.BUILD_RETRIED)) == ATTEMPTS - 1
    (failed,) = messages(cluster, EventKind.BUILD_FAILED)
    assert "interrupted" in failed


async def test_a_build_that_fails_by_itself_is_not_retried(
        cluster: Cluster, tmp_path: Path) -> None:
    first = await add(cluster, "n0", setup_fails=True)
    other = await add(cluster, "n1")
    fn = await cluster.control.create_function("dev", bundle(tmp_path), wait=True)
    assert fn.state is FunctionState.FAILED and "no weights" in fn.reason
    assert first.builds == ["1"] and other.builds == []
    assert messages(cluster, EventKind.BUILD_RETRIED) == []


async def quarantine_corrupt(cluster: Cluster, fn_id: str, version: int) -> None:
    store = cluster.control.store
    await store.run(store.set_function_state, fn_id, version, FunctionState.READY,
                    "snapshot quarantined after a failed restore: chunk 5e17a0 is corrupt: "
                    "its bytes hash to 0f00; runs with fresh starts", "fresh")


async def test_a_snapshot_quarantined_for_corrupt_chunks_is_rebuilt_once(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add(cluster, "n0")
    fn = await cluster.control.create_function("dev", bundle(tmp_path), wait=True)
    await quarantine_corrupt(cluster, fn.id, fn.version)
    await cluster.control.reconcile_once()
    await asyncio.gather(*cluster.control.state.builds.values())  # the rebuild
    rebuilt = await cluster.control.get_function("dev", "built")
    assert (rebuilt.state, rebuilt.start_mode) == (FunctionState.READY, "restore")
    assert rebuilt.snapshot_id != fn.snapshot_id and agent.builds == ["1", "1"]
    (event,) = messages(cluster, EventKind.CHUNK_REPAIRED)
    assert "dev/built version 1: rebuilding its snapshot" in event

    # Corrupt again: it stays on fresh starts (no rebuild loop).
    await quarantine_corrupt(cluster, fn.id, fn.version)
    await cluster.control.reconcile_once()
    assert not cluster.control.state.builds
    assert agent.builds == ["1", "1"]
    assert (await cluster.control.get_function("dev", "built")).start_mode == "fresh"


async def test_other_quarantines_are_not_rebuilt(cluster: Cluster, tmp_path: Path) -> None:
    agent = await add(cluster, "n0")
    fn = await cluster.control.create_function("dev", bundle(tmp_path), wait=True)
    store = cluster.control.store
    await store.run(store.set_function_state, fn.id, fn.version, FunctionState.READY,
                    "snapshot quarantined after a failed restore: it failed the same way "
                    "on n0 and n1; runs with fresh starts", "fresh")
    await cluster.control.reconcile_once()
    assert not cluster.control.state.builds and agent.builds == ["1"]

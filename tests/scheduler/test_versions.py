"""Immutable function versions (scheduler/versions.py): a redeploy builds while the
active version keeps serving, the switch is atomic, a failed build leaves the old
version serving, and rollback reuses a kept snapshot (or rebuilds a collected one).

The control plane runs over a real DB with fake agents whose snapshot builds the test
holds open and finishes (GatedAgent)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.scheduler.conftest import Cluster, FakeAgent, make_control
from thaw.core.errors import InvalidArgument, NotFound
from thaw.core.spec import pack_bundle
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.scheduler.states import FunctionState, InstanceState
from thaw.scheduler.versions import RETAINED_VERSIONS, VersionState

NAME = "versioned"


@dataclass
class GatedAgent(FakeAgent):
    """A fake agent whose snapshot builds wait for the test: `finish(ok)` ends the
    oldest build still open."""

    builds: list[tuple[agent_pb2.BuildSnapshotRequest, asyncio.Future[bool]]] = field(
        default_factory=list)
    kept: list[str] = field(default_factory=list)
    """Versions whose manifests the last garbage collection kept."""
    build_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def build_snapshot(self, request: agent_pb2.BuildSnapshotRequest,
                             timeout: float) -> agent_pb2.BuildSnapshotResponse:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.builds.append((request, done))
        self.build_started.set()
        ok = await done
        if not ok:
            return agent_pb2.BuildSnapshotResponse(ok=False, stage="setup",
                                                   reason="the model file is missing")
        manifest = manifest_pb2.SnapshotManifest(
            function=f"{request.function.tenant}/{request.function.name}",
            version=request.function.version)
        return agent_pb2.BuildSnapshotResponse(ok=True, manifest=manifest, stored_bytes=1000)

    async def prepare_template(self, request: agent_pb2.PrepareTemplateRequest,
                               timeout: float) -> agent_pb2.PrepareTemplateResponse:
        return agent_pb2.PrepareTemplateResponse()

    async def collect_garbage(self, keep: list[object], timeout: float = 300.0
                              ) -> agent_pb2.CollectGarbageResponse:
        self.kept = sorted(m.version for m in keep)  # type: ignore[attr-defined]
        return agent_pb2.CollectGarbageResponse()

    async def prewarm(self, manifest: object, peers: list[str], timeout: float = 60.0,
                      *, background: bool = False) -> agent_pb2.PrewarmResponse:
        return agent_pb2.PrewarmResponse()

    async def building(self) -> None:
        """Until a build is open (the build RPC is issued from a task)."""
        while not any(not done.done() for _, done in self.builds):
            self.build_started.clear()
            await asyncio.wait_for(self.build_started.wait(), 5)

    async def finish(self, ok: bool = True) -> None:
        await self.building()
        _request, done = next((r, d) for r, d in self.builds if not d.done())
        done.set_result(ok)


def bundle(tmp_path: Path, tag: str) -> bytes:
    folder = tmp_path / f"bundle-{tag}"
    folder.mkdir()
    (folder / "thaw.toml").write_text(f'name = "{NAME}"\nhandler = "app:Versioned"\n')
    (folder / "app.py").write_text(
        f"class Versioned:\n    def __call__(self, request):\n        return {{'v': '{tag}'}}\n")
    return pack_bundle(str(folder))


async def add_gated_node(cluster: Cluster, node_id: str = "n1") -> GatedAgent:
    agent = GatedAgent(f"{node_id}:1")
    cluster.agents[agent.address] = agent
    await cluster.control.register(scheduler_pb2.RegisterRequest(
        node_id=node_id, control_address=agent.address, data_url=f"http://{node_id}",
        devices=agent.devices()))
    return agent


async def deploy(cluster: Cluster, agent: GatedAgent, data: bytes, ok: bool = True) -> None:
    """Deploy and let its build finish (ok or failed), waiting for the outcome."""
    task = asyncio.create_task(cluster.control.create_function("dev", data, wait=True))
    await agent.finish(ok)
    await task


async def serve_one(cluster: Cluster) -> tuple[str, int]:
    """Acquire and release a lease: (instance id, its version)."""
    grant = await cluster.control.acquire("dev", NAME, 5)
    await cluster.control.release(grant.lease_id, False, "")
    return grant.instance.id, grant.instance.version


async def test_a_redeploy_builds_while_the_active_version_serves_then_switches(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, bundle(tmp_path, "one"))
    v1_instance, version = await serve_one(cluster)
    assert version == 1

    deploying = asyncio.create_task(
        cluster.control.create_function("dev", bundle(tmp_path, "two"), wait=True))
    await agent.building()
    # While v2 builds, the function is ready and v1 keeps answering.
    fn = await cluster.control.get_function("dev", NAME)
    assert fn.state is FunctionState.READY and fn.version == 1
    held = await cluster.control.acquire("dev", NAME, 5)  # in flight across the switch
    assert (held.instance.id, held.instance.version) == (v1_instance, 1)
    _fn, versions = await cluster.control.list_versions("dev", NAME)
    assert [(v.version, v.state) for v in versions] == [
        (2, VersionState.BUILDING), (1, VersionState.READY)]

    await agent.finish(ok=True)
    switched = await deploying
    assert switched.version == 2 and switched.state is FunctionState.READY
    # The in-flight call's instance finishes it, then retires; new calls get v2.
    assert held.instance.state is InstanceState.STOPPING
    assert v1_instance not in [i for i, _ in agent.stopped]
    new_instance, version = await serve_one(cluster)
    assert version == 2 and new_instance != v1_instance
    await cluster.control.release(held.lease_id, False, "")
    await cluster.settle()
    assert v1_instance in [i for i, _ in agent.stopped]
    assert cluster.control.generation(switched.id, 2) > 0
    assert cluster.control.generation(switched.id, 1) == 0.0


async def test_the_switch_is_one_transaction_over_function_and_version(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, bundle(tmp_path, "one"))
    await deploy(cluster, agent, bundle(tmp_path, "two"))
    fn, versions = await cluster.control.list_versions("dev", NAME)
    v2 = versions[0]
    # The functions row mirrors the active version exactly.
    assert (fn.version, fn.bundle_digest, fn.snapshot_id, fn.start_mode) == (
        v2.version, v2.bundle_digest, v2.snapshot_id, v2.start_mode)
    assert v2.activated_at is not None and v2.snapshot_state == "ready"
    assert versions[1].bundle_digest != v2.bundle_digest


async def test_a_failed_build_leaves_the_old_version_serving(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, bundle(tmp_path, "one"))
    v1_instance, _ = await serve_one(cluster)

    await deploy(cluster, agent, bundle(tmp_path, "broken"), ok=False)
    fn = await cluster.control.get_function("dev", NAME)
    assert fn.state is FunctionState.READY and fn.version == 1
    latest = await cluster.control.store.run(cluster.control.versions.latest, fn.id)
    assert latest is not None and latest.version == 2
    assert latest.state is VersionState.FAILED and "model file is missing" in latest.reason
    assert await serve_one(cluster) == (v1_instance, 1)
    assert agent.stopped == []


async def test_a_first_deploy_that_fails_fails_the_function(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, bundle(tmp_path, "broken"), ok=False)
    fn = await cluster.control.get_function("dev", NAME)
    assert fn.state is FunctionState.FAILED and "model file is missing" in fn.reason


async def test_rollback_is_instant_when_the_snapshot_is_kept(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, bundle(tmp_path, "one"))
    await deploy(cluster, agent, bundle(tmp_path, "two"))
    v2_instance, _ = await serve_one(cluster)
    builds = len(agent.builds)

    fn, rebuilt = await cluster.control.rollback("dev", NAME)  # the previous ready one
    assert (fn.version, rebuilt) == (1, False)
    assert len(agent.builds) == builds  # nothing was built
    _, version = await serve_one(cluster)
    assert version == 1
    await cluster.settle()
    assert v2_instance in [i for i, _ in agent.stopped]

    fn, rebuilt = await cluster.control.rollback("dev", NAME, 2)  # and forward again
    assert (fn.version, rebuilt) == (2, False)
    # A third deploy is numbered after every version, not after the active one.
    await deploy(cluster, agent, bundle(tmp_path, "three"))
    assert (await cluster.control.get_function("dev", NAME)).version == 3


async def test_rollback_refuses_unknown_failed_and_missing_versions(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, bundle(tmp_path, "one"))
    with pytest.raises(InvalidArgument) as no_earlier:
        await cluster.control.rollback("dev", NAME)
    assert no_earlier.value.field == "version"
    await deploy(cluster, agent, bundle(tmp_path, "broken"), ok=False)
    with pytest.raises(InvalidArgument) as failed:
        await cluster.control.rollback("dev", NAME, 2)
    assert failed.value.field == "version" and "failed" in failed.value.message
    with pytest.raises(NotFound) as unknown:
        await cluster.control.rollback("dev", NAME, 9)
    assert unknown.value.field == "version"
    # Rolling back to the active version changes nothing.
    fn, rebuilt = await cluster.control.rollback("dev", NAME, 1)
    assert (fn.version, rebuilt) == (1, False)


async def test_old_snapshots_are_kept_for_rollback_then_rebuilt_once_collected(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    count = RETAINED_VERSIONS + 2
    for n in range(1, count + 1):
        await deploy(cluster, agent, bundle(tmp_path, f"v{n}"))
    await cluster.settle()
    assert await cluster.control.collect_garbage() == 0
    # The active version and the RETAINED_VERSIONS before it keep their snapshots.
    assert agent.kept == [str(n) for n in range(count - RETAINED_VERSIONS, count + 1)]
    _fn, versions = await cluster.control.list_versions("dev", NAME)
    states = {v.version: v.snapshot_state for v in versions}
    assert states[1] == "collected" and states[2] == "ready"

    builds = len(agent.builds)
    rolling = asyncio.create_task(cluster.control.rollback("dev", NAME, 1))
    await agent.finish(ok=True)
    fn, rebuilt = await rolling
    assert (fn.version, rebuilt) == (1, True)
    assert len(agent.builds) == builds + 1
    request, _ = agent.builds[-1]
    assert request.function.version == "1"
    _fn, versions = await cluster.control.list_versions("dev", NAME)
    assert {v.version: v.snapshot_state for v in versions}[1] == "ready"


async def test_a_rollback_supersedes_a_build_in_progress(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, bundle(tmp_path, "one"))
    await deploy(cluster, agent, bundle(tmp_path, "two"))
    deploying = asyncio.create_task(
        cluster.control.create_function("dev", bundle(tmp_path, "three"), wait=True))
    await agent.building()
    fn, _ = await cluster.control.rollback("dev", NAME, 1)
    assert fn.version == 1
    await agent.finish(ok=True)
    after = await deploying
    assert after.version == 1  # the late build did not switch
    v3 = await cluster.control.store.run(cluster.control.versions.get, fn.id, 3)
    assert v3.state is VersionState.FAILED and "rollback" in v3.reason


async def test_a_restart_fails_builds_it_interrupted_and_the_old_version_serves_on(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add_gated_node(cluster)
    await deploy(cluster, agent, bundle(tmp_path, "one"))
    asyncio.create_task(cluster.control.create_function("dev", bundle(tmp_path, "two"),
                                                        wait=False))
    await agent.building()
    # A new scheduler process over the same DB (the old one's build never reports).
    restarted = make_control(tmp_path, cluster.clock, cluster.agents)
    try:
        await restarted.recover()
        fn, versions = await restarted.list_versions("dev", NAME)
        assert fn.state is FunctionState.READY and fn.version == 1
        assert versions[0].state is VersionState.FAILED
        assert "restarted" in versions[0].reason
    finally:
        await restarted.close()
        restarted.store.close()

"""The scheduler keeps each running build's current step as its node's heartbeats
report it, shows it on the function's latest build (FunctionInfo, ListVersions), and
drops it when the build ends: a late heartbeat cannot bring it back, and steps of
builds it does not run are ignored. Control plane over SQLite, fake agents."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from tests.scheduler.conftest import Cluster, FakeAgent
from tests.scheduler.test_build_retry import built, bundle, register
from thaw.proto import agent_pb2, scheduler_pb2
from thaw.scheduler.build_steps import WAITING, BuildSteps
from thaw.scheduler.service import function_info
from thaw.scheduler.states import FunctionState


@dataclass
class HeldAgent(FakeAgent):
    """Builds once `release` is set; `fail`: the build's setup fails then."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    fail: bool = False

    async def build_snapshot(self, request: agent_pb2.BuildSnapshotRequest,
                             timeout: float) -> agent_pb2.BuildSnapshotResponse:
        self._check()
        self.started.set()
        await self.release.wait()
        if self.fail:
            return agent_pb2.BuildSnapshotResponse(
                ok=False, stage="environment",
                reason="resolving the environment failed: No solution found when "
                       "resolving dependencies: nothing provides missing-pkg")
        return built(request)

    async def prepare_template(self, request: agent_pb2.PrepareTemplateRequest,
                               timeout: float) -> agent_pb2.PrepareTemplateResponse:
        return agent_pb2.PrepareTemplateResponse()


async def add(cluster: Cluster, node_id: str, **kwargs: bool) -> HeldAgent:
    return await register(cluster, node_id,
                          HeldAgent(f"{node_id}:1", **kwargs))  # type: ignore[arg-type]


def step(text: str, progress: float | None = None, name: str = "built",
         version: int = 1) -> scheduler_pb2.BuildStep:
    return scheduler_pb2.BuildStep(tenant="dev", name=name, version=version, step=text,
                                   progress=progress)


async def report(cluster: Cluster, node_id: str, *steps: scheduler_pb2.BuildStep) -> None:
    assert await cluster.control.heartbeat(scheduler_pb2.HeartbeatRequest(
        node_id=node_id, devices=cluster.agent(node_id).devices(), building=list(steps)))


async def latest(cluster: Cluster) -> scheduler_pb2.VersionInfo:
    fn = await cluster.control.get_function("dev", "built")
    return (await function_info(cluster.control, fn)).latest_build


async def test_the_reported_step_shows_while_building_and_goes_with_the_build(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add(cluster, "n0")
    await cluster.control.create_function("dev", bundle(tmp_path), wait=False)
    await agent.started.wait()
    info = await latest(cluster)
    assert info.state == "building"
    assert info.build_step == "starting the build on node n0"
    assert not info.HasField("build_progress")

    await report(cluster, "n0", step("installing 12 packages", 5 / 12),
                 step("someone else's", 0.5, name="other"))
    info = await latest(cluster)
    assert info.build_step == "installing 12 packages"
    assert abs(info.build_progress - 5 / 12) < 1e-9
    await report(cluster, "n0", step("running setup() and capturing its state"))
    info = await latest(cluster)
    assert info.build_step == "running setup() and capturing its state"
    assert not info.HasField("build_progress")  # a step without a measure
    assert cluster.control.builds.steps.get(("dev", "other", 1)) is None

    agent.release.set()
    await asyncio.gather(*cluster.control.state.builds.values())
    info = await latest(cluster)
    assert info.state == "ready" and info.build_step == ""
    # A heartbeat sent before the end but read after it brings nothing back.
    await report(cluster, "n0", step("storing the snapshot", 0.9))
    assert (await latest(cluster)).build_step == ""


async def test_a_failed_resolve_keeps_the_resolvers_message_and_no_step(
        cluster: Cluster, tmp_path: Path) -> None:
    agent = await add(cluster, "n0", fail=True)
    await cluster.control.create_function("dev", bundle(tmp_path), wait=False)
    await agent.started.wait()
    await report(cluster, "n0", step("resolving 1 requirements from requirements.txt"))
    assert (await latest(cluster)).build_step.startswith("resolving 1 requirements")
    agent.release.set()
    await asyncio.gather(*cluster.control.state.builds.values())
    fn = await cluster.control.get_function("dev", "built")
    assert fn.state is FunctionState.FAILED
    info = await latest(cluster)
    assert info.state == "failed" and info.build_step == ""
    assert "No solution found when resolving dependencies" in info.reason
    assert info.reason.startswith("environment failed: resolving the environment failed")


def test_steps_are_kept_only_for_builds_begun_here() -> None:
    steps = BuildSteps()
    key = ("dev", "f", 3)
    steps.take("n0", [step("resolving", name="f", version=3)])
    assert steps.get(key) is None  # not a build this scheduler runs (say, after a restart)
    steps.begin(key)
    assert steps.get(key) is not None and steps.get(key).text == WAITING  # type: ignore[union-attr]
    steps.take("n0", [step("resolving", name="f", version=3),
                      step("", name="f", version=3)])  # an empty step changes nothing
    found = steps.get(key)
    assert found is not None and (found.text, found.progress, found.node_id) == (
        "resolving", None, "n0")
    info = scheduler_pb2.VersionInfo(version=3, state="building")
    steps.fill(info, "dev", "f")
    assert info.build_step == "resolving" and not info.HasField("build_progress")
    steps.end(key)
    steps.set(key, "preparing a template")  # after the end: ignored
    assert steps.get(key) is None
    other = scheduler_pb2.VersionInfo(version=3, state="building")
    steps.fill(other, "dev", "f")
    assert other.build_step == ""

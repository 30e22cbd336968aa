"""Image functions ([runtime] image) run only on nodes with the docker runtime: the
scheduler knows each node's runtime from its registration and places an image
function's snapshot build and instances on docker nodes only, on another docker node
when one lacks the image, and refuses at once (503) when no docker node can take it.
Plain functions go anywhere.

The control plane runs over a real SQLite store with fake agents that behave like
platform/agent.py does for the runtime they report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.scheduler.conftest import Cluster, FakeAgent
from thaw.core.errors import FunctionUnavailable, ImageNotOnNode, InstanceFailed
from thaw.core.grpcutil import decode_error, encode_error, status_for
from thaw.core.spec import pack_bundle
from thaw.gateway.app import node_json
from thaw.gateway.errors import status_of
from thaw.platform.agent import IMAGE_NEEDS_DOCKER
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.scheduler.control import NO_DOCKER_NODE, LeaseGrant
from thaw.scheduler.service import SchedulerService
from thaw.scheduler.states import FunctionState, NodeState, SnapshotState

IMAGE = "acme/embed:1@sha256:" + "ab" * 32
OTHER_IMAGE = "acme/other:2@sha256:" + "cd" * 32


@dataclass
class RuntimeAgent(FakeAgent):
    """A fake agent with a runtime: a process node refuses image functions (as
    platform/agent.py does), a docker node runs those whose image its engine has
    and raises ImageNotOnNode for the others (as platform/docker does)."""

    runtime: str = "process"
    images: set[str] = field(default_factory=set)
    builds: list[str] = field(default_factory=list)
    """Functions (name@version) whose snapshot build this node ran."""
    refused: list[str] = field(default_factory=list)
    """Builds and starts refused for lack of the image."""

    def _check_image(self, spec: agent_pb2.FunctionSpec, what: str) -> None:
        if not spec.image:
            return
        if self.runtime != "docker":
            raise InstanceFailed(f"runtime: {IMAGE_NEEDS_DOCKER}")
        if spec.image not in self.images:
            self.refused.append(what)
            raise ImageNotOnNode(f"image {spec.image} is not on node {self.address}'s "
                                 "docker engine")

    async def build_snapshot(self, request: agent_pb2.BuildSnapshotRequest,
                             timeout: float) -> agent_pb2.BuildSnapshotResponse:
        self._check()
        if request.function.image and self.runtime != "docker":
            return agent_pb2.BuildSnapshotResponse(ok=False, stage="runtime",
                                                   reason=IMAGE_NEEDS_DOCKER)
        self._check_image(request.function, "build")
        self.builds.append(f"{request.function.name}@{request.function.version}")
        manifest = manifest_pb2.SnapshotManifest(
            function=f"{request.function.tenant}/{request.function.name}",
            version=request.function.version)
        return agent_pb2.BuildSnapshotResponse(ok=True, manifest=manifest, stored_bytes=100)

    async def start_instance(self, request: agent_pb2.StartInstanceRequest,
                             timeout: float) -> agent_pb2.StartInstanceResponse:
        self._check_image(request.function, "start")
        return await super().start_instance(request, timeout)

    async def prepare_template(self, request: agent_pb2.PrepareTemplateRequest,
                               timeout: float) -> agent_pb2.PrepareTemplateResponse:
        return agent_pb2.PrepareTemplateResponse()

    async def prewarm(self, manifest: object, peers: list[str], timeout: float = 600.0,
                      *, background: bool = False) -> agent_pb2.PrewarmResponse:
        return agent_pb2.PrewarmResponse()


async def add_node(cluster: Cluster, node_id: str, runtime: str = "",
                   images: tuple[str, ...] = ()) -> RuntimeAgent:
    """Register a node; runtime "" is what an agent from before the field sends."""
    agent = RuntimeAgent(f"{node_id}:1", runtime=runtime or "process", images=set(images))
    cluster.agents[agent.address] = agent
    await cluster.control.register(scheduler_pb2.RegisterRequest(
        node_id=node_id, control_address=agent.address, data_url=f"http://{node_id}",
        devices=agent.devices(), runtime=runtime))
    return agent


def bundle(tmp_path: Path, name: str, image: str = "", snapshot: bool = True) -> bytes:
    folder = tmp_path / f"bundle-{name}"
    folder.mkdir()
    toml = f'name = "{name}"\nhandler = "app:Handler"\n'
    toml += "[scaling]\nmax_concurrency = 1\ntarget_concurrency = 1\nmax_instances = 10\n"
    if not snapshot:
        toml += "[snapshot]\nenabled = false\n"
    if image:
        toml += f'[runtime]\nimage = "{image}"\n'
    (folder / "thaw.toml").write_text(toml)
    (folder / "app.py").write_text(
        "class Handler:\n    def __call__(self, request):\n        return {}\n")
    return pack_bundle(str(folder))


async def hold(cluster: Cluster, name: str, count: int) -> list[LeaseGrant]:
    """`count` leases held at once (max_concurrency 1: one instance each)."""
    return [await cluster.control.acquire("dev", name, 5) for _ in range(count)]


async def test_an_image_function_builds_and_runs_only_on_docker_nodes(
        cluster: Cluster, tmp_path: Path) -> None:
    # The process nodes sort first by id and start with nothing in flight: without
    # the runtime, both the build and the first start would land on one of them.
    procs = [await add_node(cluster, "a-proc", "process"), await add_node(cluster, "b-old")]
    docker = await add_node(cluster, "z-docker", "docker", (IMAGE,))

    fn = await cluster.control.create_function("dev", bundle(tmp_path, "img", IMAGE), True)

    assert fn.state is FunctionState.READY, fn.reason
    assert docker.builds == ["img@1"]
    grants = await hold(cluster, "img", 3)
    assert {g.instance.node_id for g in grants} == {"z-docker"}
    assert len(docker.started) == 3
    assert all(not a.builds and not a.started for a in procs)


async def test_plain_functions_still_run_on_any_node(cluster: Cluster,
                                                     tmp_path: Path) -> None:
    proc = await add_node(cluster, "a-proc", "process")
    docker = await add_node(cluster, "z-docker", "docker")

    fn = await cluster.control.create_function("dev", bundle(tmp_path, "plain"), True)

    assert fn.state is FunctionState.READY, fn.reason
    assert proc.builds == ["plain@1"]  # the first node by id, though it runs processes
    grants = await hold(cluster, "plain", 2)
    assert grants[0].instance.node_id == "a-proc"
    await cluster.control.cordon("a-proc", True)
    more = await hold(cluster, "plain", 1)
    assert more[0].instance.node_id == "z-docker" and docker.started


async def test_with_no_docker_node_an_image_function_fails_at_once_with_the_reason(
        cluster: Cluster, tmp_path: Path) -> None:
    procs = [await add_node(cluster, "a-proc", "process"), await add_node(cluster, "b-old")]

    fn = await cluster.control.create_function("dev", bundle(tmp_path, "img", IMAGE), True)

    assert fn.state is FunctionState.FAILED
    assert fn.reason == f"snapshot build failed: {NO_DOCKER_NODE}"
    assert all(not a.builds for a in procs)
    with pytest.raises(FunctionUnavailable, match="no node runs the docker runtime") as exc:
        await cluster.control.acquire("dev", "img", 5)
    assert status_of(exc.value) == 503
    # A plain function on the same nodes is not affected.
    plain = await cluster.control.create_function("dev", bundle(tmp_path, "plain"), True)
    assert plain.state is FunctionState.READY


async def test_an_image_function_without_snapshots_is_refused_at_acquire(
        cluster: Cluster, tmp_path: Path) -> None:
    """No build to fail: the start itself answers 503 with the reason, at once rather
    than after waiting for room on the process nodes."""
    proc = await add_node(cluster, "a-proc", "process")
    await cluster.control.create_function(
        "dev", bundle(tmp_path, "fresh-img", IMAGE, snapshot=False), True)

    with pytest.raises(FunctionUnavailable, match=NO_DOCKER_NODE):
        await cluster.control.acquire("dev", "fresh-img", 5)
    assert not proc.started and cluster.control.room_waiters == 0


async def test_when_its_docker_node_is_lost_an_image_function_is_refused_not_misplaced(
        cluster: Cluster, tmp_path: Path) -> None:
    proc = await add_node(cluster, "a-proc", "process")
    docker = await add_node(cluster, "z-docker", "docker", (IMAGE,))
    await cluster.control.create_function("dev", bundle(tmp_path, "img", IMAGE), True)
    docker.down = True
    await cluster.advance(cluster.control.node_timeout + 1)
    await cluster.control.reconcile_once()
    assert cluster.control.nodes["z-docker"].state is NodeState.LOST

    with pytest.raises(FunctionUnavailable, match=r"no docker node is ready \(z-docker lost\)"):
        await cluster.control.acquire("dev", "img", 5)
    assert not proc.started


async def test_a_docker_node_without_the_image_is_skipped_for_the_build(
        cluster: Cluster, tmp_path: Path) -> None:
    lacking = await add_node(cluster, "d1", "docker", (OTHER_IMAGE,))
    having = await add_node(cluster, "d2", "docker", (IMAGE,))

    fn = await cluster.control.create_function("dev", bundle(tmp_path, "img", IMAGE), True)

    assert fn.state is FunctionState.READY, fn.reason
    assert lacking.refused == ["build"] and not lacking.builds
    assert having.builds == ["img@1"]
    snapshot = await cluster.control.store.run(cluster.control.store.get_snapshot,
                                               fn.snapshot_id)
    assert snapshot.node_id == "d2" and snapshot.state is SnapshotState.READY


async def test_a_docker_node_without_the_image_is_skipped_for_a_start(
        cluster: Cluster, tmp_path: Path) -> None:
    # Fresh starts (no snapshot holder to prefer): d1 comes first by id.
    lacking = await add_node(cluster, "d1", "docker")
    having = await add_node(cluster, "d2", "docker", (IMAGE,))
    await cluster.control.create_function(
        "dev", bundle(tmp_path, "fresh-img", IMAGE, snapshot=False), True)

    grants = await hold(cluster, "fresh-img", 2)

    assert {g.instance.node_id for g in grants} == {"d2"}
    assert lacking.refused == ["start", "start"] and not lacking.running
    assert len(having.started) == 2
    assert not cluster.control.nodes["d1"].slices  # the refused starts left no charge


async def test_an_image_on_no_docker_node_fails_naming_the_nodes_tried(
        cluster: Cluster, tmp_path: Path) -> None:
    await add_node(cluster, "d1", "docker")
    await add_node(cluster, "d2", "docker", (OTHER_IMAGE,))

    fn = await cluster.control.create_function("dev", bundle(tmp_path, "img", IMAGE), True)
    assert fn.state is FunctionState.FAILED
    assert f"image {IMAGE} is on no docker node's engine (tried d1, d2" in fn.reason

    await cluster.control.create_function(
        "dev", bundle(tmp_path, "fresh-img", IMAGE, snapshot=False), True)
    with pytest.raises(FunctionUnavailable, match=r"tried d1, d2; .*docker load") as exc:
        await cluster.control.acquire("dev", "fresh-img", 5)
    assert status_of(exc.value) == 503


async def test_the_registered_runtime_is_kept_and_shown(cluster: Cluster) -> None:
    await add_node(cluster, "a-proc", "process")
    await add_node(cluster, "b-old")  # an agent from before the field: processes
    await add_node(cluster, "z-docker", "docker")
    nodes = cluster.control.nodes
    assert {n: nodes[n].runtime for n in nodes} == {
        "a-proc": "process", "b-old": "process", "z-docker": "docker"}

    info = SchedulerService(cluster.control)._node_info(nodes["z-docker"])
    assert info.runtime == "docker"
    assert node_json(info)["runtime"] == "docker"
    assert node_json(scheduler_pb2.NodeInfo(id="older-scheduler"))["runtime"] == "process"

    # A node that comes back with another runtime (the agent restarted with
    # THAW_RUNTIME changed) is placed by the new one.
    await add_node(cluster, "a-proc", "docker")
    assert nodes["a-proc"].runtime == "docker"


async def test_with_one_docker_node_lacking_the_image_its_own_error_is_the_reason(
        cluster: Cluster, tmp_path: Path) -> None:
    await add_node(cluster, "a-proc", "process")
    await add_node(cluster, "d1", "docker")

    fn = await cluster.control.create_function("dev", bundle(tmp_path, "img", IMAGE), True)

    assert fn.state is FunctionState.FAILED
    assert fn.reason == (f"snapshot build failed: image {IMAGE} is not on node d1:1's "
                         "docker engine")


class _FailedCall(grpc.RpcError):
    """What a failed unary call raises on the client: a status and its details."""

    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        self._status, self._details = status, details

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details


def test_the_agents_refusal_crosses_grpc_as_image_not_on_node() -> None:
    """The scheduler tells a missing image (try another node) from any other failed
    start only by the class that decode_error rebuilds from the agent's status."""
    sent = ImageNotOnNode(f"image {IMAGE} is not on node d1's docker engine")
    got = decode_error(_FailedCall(status_for(sent), encode_error(sent)))
    assert type(got) is ImageNotOnNode and got.message == sent.message
    assert status_of(got) == 502  # a start that reaches a client unhandled: as InstanceFailed

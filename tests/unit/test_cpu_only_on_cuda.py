"""A CPU-only function (gpu_memory = 0) runs on a cuda node with no slice, and its
host-memory snapshot passes the node's fingerprint check (docs/gpu.md, "Snapshot
compatibility"). The agent runs over the cuda backend on the in-memory CUDA API and a
runtime that only records what it is asked to launch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from thaw.core.errors import ChunkNotFound, FingerprintMismatch
from thaw.platform.agent import Agent
from thaw.platform.cuda.allocator import CudaDevices
from thaw.platform.cuda.fake import InMemoryCudaApi
from thaw.platform.runtime import Ready, RuntimeCapabilities
from thaw.proto import agent_pb2, manifest_pb2

MiB = 1024**2
DIGEST = "b" * 64
CUDA_NODE = {"python": "3.11.7", "torch": "2.13.0+cu128", "numpy": "2.4.6",
             "device_type": "cuda", "gpu_model": "NVIDIA H100 80GB HBM3",
             "driver": "570.86.15", "compute_capability": "9.0"}


class Launched:
    """An instance process that reports ready at once (the test's own pid: alive)."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    async def next_status(self, timeout: float) -> Ready:
        return Ready(pid=self.pid, timings={"import": 0.1, "setup": 0.2})

    async def kill(self) -> None:
        pass

    async def exited(self) -> None:
        return None


class RecordingRuntime:
    name = "recording"
    capabilities = RuntimeCapabilities()

    def __init__(self) -> None:
        self.launched: list[Any] = []
        self.stopped: list[str] = []

    async def launch(self, spec: Any) -> Launched:
        self.launched.append(spec)
        return Launched()

    async def stop(self, handle: Any, reason: str) -> None:
        self.stopped.append(reason)

    async def close(self) -> None:
        pass


class NoChunks:
    """Snapshot tiers that hold nothing: a restore stops at fetching the chunks."""


@pytest.fixture
async def agent(tmp_path: Path) -> Any:
    devices = CudaDevices(InMemoryCudaApi([64 * MiB]), reserve_bytes=0,
                          instance_overhead_bytes=0, granularity=4096)
    (tmp_path / "home" / "bundles" / DIGEST).mkdir(parents=True)  # already extracted

    async def no_fetch(digest: str) -> bytes:
        raise AssertionError("the bundle is on the node")

    a = Agent(node_id="n1", home=tmp_path / "home", run_dir=tmp_path / "run",
              devices=devices, runtime=RecordingRuntime(),  # type: ignore[arg-type]
              snapshots=NoChunks(),  # type: ignore[arg-type]
              fetch_bundle=no_fetch, start_timeout=5.0, fingerprint=dict(CUDA_NODE))
    yield a
    for inst in list(a.instances.values()):
        await a.stop_instance(inst.id, "test over")


def spec(gpu_memory: int) -> agent_pb2.FunctionSpec:
    return agent_pb2.FunctionSpec(tenant="dev", name="embed", version="1",
                                  handler="app:Embedder", bundle_digest=DIGEST,
                                  gpu_memory_bytes=gpu_memory, max_concurrency=1)


async def test_a_cpu_only_function_starts_on_a_cuda_node_without_a_slice(agent: Any) -> None:
    await agent.start_instance(agent_pb2.StartInstanceRequest(
        instance_id="i-cpu", function=spec(0), kind=agent_pb2.START_FRESH))
    inst = agent.instances["i-cpu"]
    assert inst.slice_id is None and inst.slice_bytes == 0
    assert [u.used for u in agent.devices.usage()] == [0]
    (launched,) = agent.runtime.launched
    assert launched.slice is None

    # A function with gpu_memory gets its slice on the same node.
    await agent.start_instance(agent_pb2.StartInstanceRequest(
        instance_id="i-gpu", function=spec(16 * MiB), kind=agent_pb2.START_FRESH))
    assert agent.instances["i-gpu"].slice_id is not None
    assert sum(u.used for u in agent.devices.usage()) >= 16 * MiB


async def test_a_host_memory_snapshot_passes_the_check_of_a_cuda_node(agent: Any) -> None:
    """Taken on a CPU-only node (device type host): the cuda node does not refuse it;
    the restore goes on to fetch its chunks (which this node lacks)."""
    manifest = manifest_pb2.SnapshotManifest(
        function="dev/embed", version="1",
        host=manifest_pb2.Arena(size=4096, chunks=[manifest_pb2.Chunk(
            digest="c" * 64, offset=0, length=4096, stored_length=4096)]),
        fingerprint=manifest_pb2.Fingerprint(
            python="3.11.7", torch="2.13.0+cu128", numpy="2.4.6", device_type="host",
            function_version="1"))

    async def missing(manifest: Any, peers: list[str]) -> int:
        raise ChunkNotFound("1 chunk(s) of dev/embed's snapshot are on no reachable node")

    agent.chunks.ensure = missing
    with pytest.raises(ChunkNotFound):
        await agent.start_instance(agent_pb2.StartInstanceRequest(
            instance_id="i-restore", function=spec(0), kind=agent_pb2.START_RESTORE,
            manifest=manifest))
    # The same snapshot holding CUDA memory is refused by a host node's fingerprint.
    manifest.device.size = 16 * MiB
    agent.fingerprint = {**CUDA_NODE, "device_type": "host"}
    with pytest.raises(FingerprintMismatch) as err:
        await agent.start_instance(agent_pb2.StartInstanceRequest(
            instance_id="i-restore-2", function=spec(0), kind=agent_pb2.START_RESTORE,
            manifest=manifest))
    assert err.value.field == "fingerprint.device_type"

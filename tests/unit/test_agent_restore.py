"""The agent's restore with a fake runtime and the in-memory CUDA API: the slice is filled
with the device arena before the instance is asked to restore, the spawn request carries
the snapshot's memfds and the slice's descriptor (never a path), and restores sharing a
PCIe link beyond the activation budget wait their turn, the wait reported as `queue`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from thaw.blobstore import DiskTier, PinnedTier, store_arena
from thaw.platform.activation import ActivationBudget
from thaw.platform.agent import Agent
from thaw.platform.cuda import CudaDevices, InMemoryCudaApi
from thaw.platform.instances import InstanceState
from thaw.platform.runtime import (
    LaunchMode,
    LaunchSpec,
    RuntimeCapabilities,
    SpawnRequest,
    parse_status,
)
from thaw.platform.snapshots import NodeSnapshots
from thaw.proto import agent_pb2
from thaw.snapshotter.manifest import arena_message, build_manifest

KiB = 1024
MiB = 1024 * KiB


class FakeProcess:
    def __init__(self) -> None:
        self.returncode: int | None = None
        self.pid = 4242

    async def wait(self) -> int:
        return 0


class FakeTemplate:
    def __init__(self, fork_safe: bool = True) -> None:
        self.proc = FakeProcess()
        self.pid = self.proc.pid
        self.events = asyncio.StreamReader()
        self.fork_safe = fork_safe

    async def next_event(self, timeout: float) -> dict[str, Any]:
        return {"event": "template_ready", "pid": self.pid, "timings": {"import": 0.1},
                "fork_safe": self.fork_safe,
                "unsafe_reason": "" if self.fork_safe else "torch initialised CUDA"}

    async def next_status(self, timeout: float) -> Any:
        return parse_status(await self.next_event(timeout))

    async def kill(self) -> None:
        self.proc.returncode = -9
        self.events.feed_eof()


class RecordingRuntime:
    """Forks nothing: records what each spawn request carried, as the instance would
    see it at that moment, and holds a spawn until the test lets it go."""

    name = "recording"
    capabilities = RuntimeCapabilities()

    def __init__(self, api: InMemoryCudaApi, fork_safe: bool = True) -> None:
        self.api = api
        self.fork_safe = fork_safe
        self.seen: list[dict[str, Any]] = []
        self.release: dict[str, asyncio.Event] = {}
        self.templates: list[LaunchSpec] = []

    async def launch(self, spec: LaunchSpec) -> FakeTemplate:
        self.templates.append(spec)
        # A template answers as it is; a restore-mode instance always "imports" fine.
        return FakeTemplate(self.fork_safe or spec.mode is not LaunchMode.TEMPLATE)

    async def spawn(self, control: str, request: SpawnRequest,
                    timeout: float) -> tuple[int, dict[str, Any]]:
        line, fds = request.to_message()
        assert request.slice is not None
        opened = self.api.open_handle(bytes.fromhex(request.slice.ipc_handle))
        self.seen.append({
            "control": control, "line": line.decode(), "names": list(request.fds),
            "memfds": [os.readlink(f"/proc/self/fd/{fd}") for fd in fds],
            "slice": self.api.read(opened, 0, 4 * KiB), "slice_kind": request.slice.kind,
        })
        event = self.release.setdefault(request.instance_id, asyncio.Event())
        await event.wait()
        return 5000 + len(self.seen), {"event": "ready"}


def bundle_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in (("thaw.toml", 'name = "m"\nhandler = "app:M"\n'),
                           ("app.py", "class M: ...\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_agent(tmp_path: Path, runtime_fork_safe: bool = True
               ) -> tuple[Agent, RecordingRuntime, NodeSnapshots, bytes, Any, Any]:
    api = InMemoryCudaApi([64 * MiB], mps=True)
    devices = CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0,
                          granularity=4 * KiB)
    runtime = RecordingRuntime(api, runtime_fork_safe)
    snapshots = NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(16 * MiB),
                              tmp_path / "shm")
    packed = bundle_bytes()

    async def fetch_bundle(digest: str) -> bytes:
        return packed

    agent = Agent(node_id="n1", home=tmp_path / "home", run_dir=tmp_path / "run",
                  devices=devices, runtime=runtime, snapshots=snapshots,  # type: ignore[arg-type]
                  fetch_bundle=fetch_bundle, start_timeout=5.0,
                  fingerprint={"device_type": "cuda"},
                  activation=ActivationBudget(per_link=1))
    device = bytes(range(256)) * (4 * KiB)
    arenas = {name: arena_message(len(data), store_arena(snapshots.disk, data,
                                                         chunk_size=64 * KiB))
              for name, data in (("pickle", b"p" * 100), ("host", b"h" * 8 * KiB),
                                 ("device", device))}
    manifest = build_manifest({"modules": ["app"]}, function="t/m", version="1", **arenas)
    spec = agent_pb2.FunctionSpec(tenant="t", name="m", version="1", handler="app:M",
                                  bundle_digest="d1", gpu_memory_bytes=4 * MiB,
                                  gpu_compute=30)
    return agent, runtime, snapshots, device, manifest, spec


async def test_slices_are_filled_then_handed_over_and_restores_queue_per_link(
        tmp_path: Path) -> None:
    agent, runtime, snapshots, device, manifest, spec = make_agent(tmp_path)

    async def restore(instance_id: str) -> list[tuple[str, float]]:
        inst = agent._new_instance(instance_id, spec, InstanceState.RESTORING)
        await agent._allocate_slice(inst, spec, True)
        return await agent._restore(inst, spec, manifest, [])

    tasks = {name: asyncio.create_task(restore(name)) for name in ("i1", "i2")}
    while not runtime.seen:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    # One restore per link at a time: whichever got in first, the other waits for it.
    assert len(runtime.seen) == 1
    first = json.loads(runtime.seen[0]["line"])["instance_id"]
    second = "i2" if first == "i1" else "i1"
    assert not tasks[second].done()
    runtime.release.setdefault(first, asyncio.Event()).set()
    first_timings = dict(await tasks[first])
    while len(runtime.seen) < 2:
        await asyncio.sleep(0.01)
    runtime.release.setdefault(second, asyncio.Event()).set()
    second_timings = dict(await tasks[second])
    assert first_timings["queue"] == 0.0 and second_timings["queue"] > 0.0

    for seen in runtime.seen:
        # Filled before the instance was asked to restore.
        assert seen["slice"] == device[:4 * KiB] and seen["slice_kind"] == "cuda"
        assert seen["names"] == ["snapshot_json", "pickle", "host_arena"]
        assert all(m.startswith("/memfd:thaw-") for m in seen["memfds"]), seen["memfds"]
        # Nothing names the store: its chunks or its host-memory folder.
        assert str(tmp_path / "chunks") not in seen["line"]
        assert str(tmp_path / "shm") not in seen["line"]
        # What the slice needs in the instance: its GPU, and its compute share (MPS).
        env = json.loads(seen["line"])["env"]
        assert env["CUDA_VISIBLE_DEVICES"].startswith("GPU-")
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    # The template got its snapshot.json as text, for a descriptor: no path either.
    [template] = runtime.templates
    assert template.snapshot is not None and '"modules": ["app"]' in (
        template.snapshot.snapshot_json)
    assert "--snapshot-json" not in template.command()
    snapshots.close()


async def test_a_template_that_may_not_fork_restores_in_restore_mode_with_the_same_request(
        tmp_path: Path) -> None:
    agent, runtime, snapshots, device, manifest, spec = make_agent(tmp_path, False)
    inst = agent._new_instance("i1", spec, InstanceState.RESTORING)
    await agent._allocate_slice(inst, spec, True)
    runtime.release["i1"] = asyncio.Event()
    runtime.release["i1"].set()
    await agent._restore(inst, spec, manifest, [])
    template, restore_mode = runtime.templates
    assert template.mode is LaunchMode.TEMPLATE and restore_mode.mode is LaunchMode.RESTORE
    # A fresh interpreter of its own, its slice's environment set from the start.
    assert restore_mode.instance_id == "i1" and restore_mode.function == "t/m"
    assert restore_mode.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert restore_mode.env["CUDA_VISIBLE_DEVICES"].startswith("GPU-")
    [seen] = runtime.seen
    assert seen["control"] == restore_mode.control != template.control
    assert seen["names"] == ["snapshot_json", "pickle", "host_arena"]
    assert seen["slice"] == device[:4 * KiB]  # filled before, as for a fork
    assert inst.process is not None and inst.pid == inst.process.pid
    snapshots.close()

"""The node's volume materialiser (platform/volumes.py) with an in-memory scheduler:
files assembled from verified chunks into a shared read-only folder, a chunk that
arrives damaged fetched again (or refused), unsafe manifest paths refused; and the
launch gets the folder as a read-only mount at its path (both runtimes' plans)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from thaw.core.errors import CorruptChunk, InstanceFailed, InvalidArgument, ThawError
from thaw.ops.uploads import bytes_pieces, file_pieces, scan, volume_path
from thaw.platform.docker.spec import ContainerLayout, ContainerSettings, container_mounts
from thaw.platform.runtime import (
    LaunchMode,
    LaunchSpec,
    MountKind,
    RuntimeCapabilities,
    SandboxPolicy,
)
from thaw.platform.sandbox.plan import SandboxSettings, build_plan
from thaw.platform.volumes import NodeVolumes, with_volumes
from thaw.proto import agent_pb2
from thaw.scheduler.volumes import VolumeFile, canonical


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeScheduler:
    """Chunks by digest; `damage` answers a digest damaged that many times."""

    def __init__(self) -> None:
        self.chunks: dict[str, bytes] = {}
        self.damage: dict[str, int] = {}
        self.asked: list[str] = []

    def add(self, data: bytes) -> str:
        self.chunks[sha(data)] = data
        return sha(data)

    def manifest(self, files: dict[str, bytes], chunk: int = 4) -> str:
        entries = []
        for path, data in files.items():
            digests = [self.add(data[i:i + chunk]) for i in range(0, len(data), chunk)]
            entries.append(VolumeFile(path, len(data), 0o644, tuple(digests)))
        return self.add(canonical(entries))

    async def fetch(self, tenant: str, digest: str) -> bytes:
        assert tenant == "acme"
        self.asked.append(digest)
        if self.damage.get(digest, 0) > 0:
            self.damage[digest] -= 1
            return b"garbage"
        return self.chunks[digest]


def test_a_manifest_is_assembled_once_read_only(tmp_path: Path) -> None:
    sched = FakeScheduler()
    files = {"config.json": b'{"dim": 4}', "weights/model.bin": bytes(range(256)) * 3,
             "empty.txt": b""}
    digest = sched.manifest(files)
    volumes = NodeVolumes(tmp_path / "volumes", sched.fetch)
    folder = asyncio.run(volumes.ensure("acme", digest))
    assert folder == tmp_path / "volumes" / digest
    for path, data in files.items():
        assert (folder / path).read_bytes() == data
        assert stat.S_IMODE((folder / path).stat().st_mode) == 0o444
    assert stat.S_IMODE(folder.stat().st_mode) == 0o555
    assert stat.S_IMODE((folder / "weights").stat().st_mode) == 0o555
    asked = len(sched.asked)
    assert asyncio.run(volumes.ensure("acme", digest)) == folder
    assert len(sched.asked) == asked  # made once, reused
    assert not [p for p in (tmp_path / "volumes").iterdir() if p.name.startswith(".")]


def test_a_damaged_chunk_is_fetched_again_or_refused(tmp_path: Path) -> None:
    sched = FakeScheduler()
    digest = sched.manifest({"a.bin": b"abcdefgh"})
    first = sha(b"abcd")
    sched.damage[first] = 1
    volumes = NodeVolumes(tmp_path / "v", sched.fetch)
    folder = asyncio.run(volumes.ensure("acme", digest))
    assert (folder / "a.bin").read_bytes() == b"abcdefgh"
    assert sched.asked.count(first) == 2

    other = sched.manifest({"b.bin": b"12345678"})
    sched.damage[sha(b"5678")] = 2
    with pytest.raises(CorruptChunk):
        asyncio.run(volumes.ensure("acme", other))
    assert not (tmp_path / "v" / other).exists()
    assert not [p for p in (tmp_path / "v").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("path", ["../escape", "/abs", "a/../../b", "a//b"])
def test_an_unsafe_manifest_path_is_refused(tmp_path: Path, path: str) -> None:
    sched = FakeScheduler()
    chunk = sched.add(b"x")
    digest = sched.add(json.dumps({"files": [
        {"path": path, "size": 1, "mode": 420, "chunks": [chunk]}]}).encode())
    with pytest.raises(InstanceFailed, match="unsafe path"):
        asyncio.run(NodeVolumes(tmp_path / "v", sched.fetch).ensure("acme", digest))
    assert not (tmp_path / "escape").exists()


def test_the_launch_mounts_volumes_read_only_in_both_runtimes(tmp_path: Path) -> None:
    sched = FakeScheduler()
    digest = sched.manifest({"w.bin": b"weights"})
    spec = agent_pb2.FunctionSpec(tenant="acme", name="f", volumes=[
        agent_pb2.VolumeMount(path="/models", name="w", manifest_digest=digest),
        agent_pb2.VolumeMount(path="/empty", name="e", manifest_digest="")])
    launch = LaunchSpec(mode=LaunchMode.FRESH, bundle=str(tmp_path / "b"), handler="a:B",
                        log_path=str(tmp_path / "log"), instance_id="i1")
    volumes = NodeVolumes(tmp_path / "v", sched.fetch)
    sandboxed = RuntimeCapabilities(uid_per_tenant=True)
    mounted = asyncio.run(with_volumes(volumes, launch, spec, sandboxed))
    host = str(tmp_path / "v" / digest)
    assert mounted.volumes == ((host, "/models"), (str(tmp_path / "v" / "empty"), "/empty"))
    found = [m for m in mounted.mounts() if m.kind is MountKind.VOLUME]
    assert [(m.path, m.inside, m.read_only) for m in found][0] == (host, "/models", True)
    # The process runtime's sandbox binds it at the path, read-only.
    plan = build_plan(replace(mounted, sandbox=SandboxPolicy(uid=1234, gid=1234)),
                      SandboxSettings(), sys.executable, {})
    assert [host, "/models"] in plan["volumes"]  # type: ignore[operator]
    assert host not in plan["writable"]  # type: ignore[operator]
    # Docker: a read-only bind at the path.
    layout = ContainerLayout("c1", 1234, str(tmp_path / "status"), str(tmp_path / "logs"),
                             "/logs")
    binds = container_mounts(mounted, layout, ContainerSettings(
        image="python:3.11", node_id="n", agent_id="a", agent_pid=1))
    assert any(b.target == "/models" and b.source == host and b.read_only for b in binds)
    # A runtime without a root of its own per instance refuses, saying why.
    with pytest.raises(InstanceFailed, match="cannot mount volumes"):
        asyncio.run(with_volumes(volumes, launch, spec, RuntimeCapabilities()))
    assert asyncio.run(with_volumes(None, launch, agent_pb2.FunctionSpec(),
                                    RuntimeCapabilities())) is launch


def test_the_client_chunker_and_paths(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f.bin").write_bytes(data)
    (tmp_path / "d" / "a.txt").write_bytes(b"hello")
    pieces = file_pieces(tmp_path / "d" / "sub" / "f.bin", 4096)
    assert [p.length for p in pieces] == [4096, 4096, 1808]
    assert b"".join(p.read() for p in pieces) == data
    assert [p.digest for p in pieces] == [p.digest for p in bytes_pieces(data, 4096)]
    files = scan(tmp_path / "d", "models/tiny", 4096)
    assert [(f.path, f.size) for f in files] == [("models/tiny/a.txt", 5),
                                                 ("models/tiny/sub/f.bin", 10_000)]
    assert [f.path for f in scan(tmp_path / "d" / "a.txt")] == ["a.txt"]
    assert volume_path("f", "/models/") == "models/f"
    for relative, prefix in (("f", "../x"), ("f", "a/../../b"), ("../f", "")):
        with pytest.raises(InvalidArgument, match="unsafe"):
            volume_path(relative, prefix)
    # A file changed after it was hashed is not sent as its old chunk.
    (tmp_path / "d" / "sub" / "f.bin").write_bytes(os.urandom(10_000))
    with pytest.raises(ThawError, match="changed"):
        pieces[0].read()


def test_idle_folders_are_collected_and_held_ones_kept(tmp_path: Path) -> None:
    sched = FakeScheduler()
    one = sched.manifest({"a.bin": b"one"})
    two = sched.manifest({"b.bin": b"two!"})
    volumes = NodeVolumes(tmp_path / "v", sched.fetch)
    launch = LaunchSpec(mode=LaunchMode.FRESH, bundle="/b", handler="a:B",
                        log_path="/l", instance_id="inst-1")
    sandboxed = RuntimeCapabilities(uid_per_tenant=True)

    def spec(digest: str) -> agent_pb2.FunctionSpec:
        return agent_pb2.FunctionSpec(tenant="acme", volumes=[
            agent_pb2.VolumeMount(path="/m", name="v", manifest_digest=digest)])

    asyncio.run(with_volumes(volumes, launch, spec(one), sandboxed))
    asyncio.run(with_volumes(volumes, replace(launch, instance_id="inst-2"), spec(two),
                             sandboxed))
    (tmp_path / "v" / ".left-by-a-crash").mkdir()
    volumes.release("inst-2")
    # Held by inst-1: kept; let go by inst-2 but not yet idle: kept; the crash's
    # staging folder: removed.
    assert asyncio.run(volumes.collect(idle_seconds=3600)) == (1, 0)
    assert (tmp_path / "v" / one).is_dir() and (tmp_path / "v" / two).is_dir()
    assert asyncio.run(volumes.collect(idle_seconds=0)) == (1, 4)
    assert (tmp_path / "v" / one).is_dir() and not (tmp_path / "v" / two).exists()
    volumes.release("inst-1")
    assert asyncio.run(volumes.collect(idle_seconds=0)) == (1, 3)
    assert not any((tmp_path / "v").iterdir())
    # A folder made before this agent started is kept for one idle period first.
    again = NodeVolumes(tmp_path / "v", sched.fetch)
    asyncio.run(volumes.ensure("acme", one))
    assert asyncio.run(again.collect(idle_seconds=0)) == (0, 0)
    assert asyncio.run(again.collect(idle_seconds=0)) == (1, 3)

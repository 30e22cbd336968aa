"""Every way a chunk's bytes reach memory a restore maps checks them against their
digest first: a byte altered on disk (raw or LZ4) or in a peer's answer makes the
restore refuse (CorruptChunk, the snapshot's own fault) before any instance is handed
anything, on each path: the snapshot's memfds, a host slice, a cuda slice from the
pinned tier or through staging, the agent's whole restore, and a peer fetch."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from tests.unit.test_agent_restore import make_agent
from thaw.blobstore import ChunkRef, DiskTier, PinnedTier, store_arena
from thaw.core.errors import ChunkNotFound, CorruptChunk
from thaw.platform.cuda import CudaDevices, InMemoryCudaApi
from thaw.platform.devices import HostDevices
from thaw.platform.instances import InstanceState
from thaw.platform.peers import PeerChunks
from thaw.platform.restore_faults import restore_fault
from thaw.platform.slice_fill import fill_slice
from thaw.platform.snapshots import NodeSnapshots
from thaw.proto import agent_pb2, agent_pb2_grpc, manifest_pb2
from thaw.scheduler.restore_book import Fault, fault_of
from thaw.snapshotter.manifest import arena_message, chunk_dicts

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB


def pattern(length: int, seed: int) -> bytes:
    """Bytes LZ4 cannot shrink, so the disk tier stores them raw."""
    return random.Random(seed).randbytes(length)


def make_manifest(disk: DiskTier, *, host: bytes, device: bytes = b""
                  ) -> manifest_pb2.SnapshotManifest:
    def arena(data: bytes) -> manifest_pb2.Arena:
        return arena_message(len(data), store_arena(disk, data, chunk_size=CHUNK))

    return manifest_pb2.SnapshotManifest(format=1, function="t/f", version="1",
                                         pickle=arena(b"pickled " + host[:8]),
                                         host=arena(host), device=arena(device))


def refs_of(arena: manifest_pb2.Arena) -> list[ChunkRef]:
    return [ChunkRef.from_dict(d) for d in chunk_dicts(arena)]


def corrupt_on_disk(disk: DiskTier, ref: ChunkRef) -> None:
    """Flip one byte of the chunk's file, as stored (raw or LZ4)."""
    path = disk.path_of(ref.digest)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def snapshots(tmp_path: Path) -> Iterator[NodeSnapshots]:
    made = NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(8 * MiB), tmp_path / "shm")
    yield made
    made.close()


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "lz4"])
def test_the_arena_memfd_is_never_made_from_a_corrupt_chunk(
        snapshots: NodeSnapshots, compressed: bool) -> None:
    # Zeros compress (stored LZ4); the pattern does not (stored raw).
    host = bytes(200 * KiB) if compressed else pattern(200 * KiB, 1)
    snap = make_manifest(snapshots.disk, host=host)
    victim = refs_of(snap.host)[1]
    assert snapshots.disk.stat(victim.digest).compression == ("lz4" if compressed else "none")
    corrupt_on_disk(snapshots.disk, victim)
    with pytest.raises(CorruptChunk, match=victim.digest):
        snapshots.materialize(snap)
    assert [m.name for m in snapshots.held_memfds(snap)
            if m.name.startswith("thaw-arena-")] == []
    # Healed on disk, the next restore makes it, and it verifies.
    snapshots.disk.put(host[victim.offset:victim.end])
    assert snapshots.materialize(snap).host_arena.size == len(host)


def test_a_prewarm_keeps_nothing_of_a_corrupt_snapshot(snapshots: NodeSnapshots) -> None:
    snap = make_manifest(snapshots.disk, host=pattern(300 * KiB, 2))
    victim = refs_of(snap.host)[3]
    corrupt_on_disk(snapshots.disk, victim)
    with pytest.raises(CorruptChunk, match=victim.digest):
        snapshots.prewarm(snap)
    assert snapshots.pinned.digests() == [] and snapshots.pinned_keys() == []


def test_a_host_slice_is_not_filled_from_a_corrupt_device_chunk(
        snapshots: NodeSnapshots) -> None:
    snap = make_manifest(snapshots.disk, host=pattern(4 * KiB, 3),
                         device=pattern(300 * KiB, 4))
    victim = refs_of(snap.device)[2]
    corrupt_on_disk(snapshots.disk, victim)
    devices = HostDevices([64 * MiB])
    sl = devices.allocate(MiB, "fn")
    try:
        with pytest.raises(CorruptChunk, match=victim.digest):
            fill_slice(devices, sl, snap, snapshots)
    finally:
        devices.release(sl.id)


@pytest.mark.parametrize("pinned_capacity", [8 * MiB, 64 * KiB], ids=["pinned", "staged"])
def test_a_cuda_slice_is_not_filled_from_a_corrupt_device_chunk(
        tmp_path: Path, pinned_capacity: int) -> None:
    """Through the pinned tier (read there in batches) or, without room, a staging
    copy: either way the chunk is checked before a copy to the device."""
    snapshots = NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(pinned_capacity),
                              tmp_path / "shm")
    device = pattern(5 * CHUNK + 100, 5)
    snap = make_manifest(snapshots.disk, host=pattern(4 * KiB, 6), device=device)
    victim = refs_of(snap.device)[1]
    corrupt_on_disk(snapshots.disk, victim)
    api = InMemoryCudaApi([16 * MiB])
    devices = CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0,
                          granularity=4 * KiB)
    sl = devices.allocate(MiB, "fn")
    try:
        with pytest.raises(CorruptChunk, match=victim.digest):
            fill_slice(devices, sl, snap, snapshots)
        assert not snapshots.pinned.has(victim.digest)
        # The altered bytes never reached the device.
        altered = bytearray(device[victim.offset:victim.end])
        altered[len(altered) // 2] ^= 0x01
        opened = api.open_handle(bytes.fromhex(sl.ipc_handle))
        assert api.read(opened, victim.offset, victim.length) != bytes(altered)
    finally:
        devices.release(sl.id)
        snapshots.close()


@pytest.mark.parametrize("arena", ["pickle", "host", "device"])
async def test_the_agents_restore_refuses_a_corrupt_chunk_before_any_handover(
        tmp_path: Path, arena: str) -> None:
    agent, runtime, snapshots, _device, manifest, spec = make_agent(tmp_path)
    victim = refs_of(getattr(manifest, arena))[0]
    corrupt_on_disk(snapshots.disk, victim)
    inst = agent._new_instance("i1", spec, InstanceState.RESTORING)
    await agent._allocate_slice(inst, spec, True)
    with pytest.raises(CorruptChunk, match=victim.digest) as raised:
        await agent._restore(inst, spec, manifest, [])
    assert runtime.seen == []  # no instance was handed a descriptor
    # The snapshot's own fault: the scheduler quarantines it.
    assert fault_of(restore_fault(raised.value)) is Fault.SNAPSHOT
    snapshots.close()


class LyingPeer(agent_pb2_grpc.AgentServicer):
    """A peer agent whose answer is altered: one byte off, or another chunk's bytes
    under the digest asked for."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self.answers = answers

    async def FetchChunks(self, request: agent_pb2.FetchChunksRequest,
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[agent_pb2.ChunkData]:
        for digest in request.digests:
            yield agent_pb2.ChunkData(digest=digest, data=self.answers[digest])


async def serve(peer: LyingPeer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("lie", ["flipped", "swapped"])
async def test_a_peers_corrupt_answer_is_refused_and_never_stored(
        tmp_path: Path, lie: str) -> None:
    source = DiskTier(tmp_path / "peer")
    host = pattern(200 * KiB, 7)
    snap = make_manifest(source, host=host)
    answers = {ref.digest: source.get(ref.digest)
               for arena in (snap.pickle, snap.host, snap.device) for ref in refs_of(arena)}
    victim, other = refs_of(snap.host)[1], refs_of(snap.host)[2]
    if lie == "flipped":
        answers[victim.digest] = bytes([answers[victim.digest][0] ^ 1]) + \
            answers[victim.digest][1:]
    else:
        answers[victim.digest] = answers[other.digest]
    server, address = await serve(LyingPeer(answers))
    node = NodeSnapshots(DiskTier(tmp_path / "node"), PinnedTier(8 * MiB), tmp_path / "shm")
    chunks = PeerChunks(node)
    try:
        with pytest.raises(CorruptChunk, match=victim.digest):
            await chunks._fetch_from(address, [victim.digest])
        assert not node.disk.has(victim.digest)
        # The restore's own call: the fetch stops at the bad chunk, which is not kept,
        # and the snapshot stays unrestorable here (nothing is mapped from it).
        with pytest.raises(ChunkNotFound):
            await chunks.ensure(snap, [address])
        assert not node.disk.has(victim.digest)
        with pytest.raises(ChunkNotFound):
            await asyncio.to_thread(node.materialize, snap)
        # An honest answer for it completes the snapshot.
        answers[victim.digest] = source.get(victim.digest)
        assert await chunks.ensure(snap, [address]) >= victim.length
        assert chunks.missing(snap) == []
        assert node.materialize(snap).host_arena.size == len(host)
    finally:
        await chunks.close()
        await server.stop(None)
        node.close()


@pytest.mark.parametrize("backend", ["host", "cuda"])
@pytest.mark.parametrize("pinned_first", [True, False], ids=["pinned", "disk"])
def test_a_reference_longer_than_its_chunk_is_refused(
        tmp_path: Path, backend: str, pinned_first: bool) -> None:
    """A manifest whose chunk reference claims more bytes than the chunk has would,
    copied from the pinned tier, carry the bytes after it (its neighbour in the
    region, never checked against this digest) into the slice."""
    snapshots = NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(8 * MiB),
                              tmp_path / "shm")
    device = pattern(2 * CHUNK, 8)
    honest = make_manifest(snapshots.disk, host=pattern(4 * KiB, 9), device=device)
    first, second = refs_of(honest.device)
    forged = manifest_pb2.SnapshotManifest()
    forged.CopyFrom(honest)
    forged.device.CopyFrom(arena_message(len(device), [ChunkRef(
        first.digest, 0, 2 * CHUNK, first.stored_length, first.compression)]))
    if pinned_first:
        # Both chunks back to back in one region: the forged copy would read both.
        snapshots.pinned.prewarm([first, second], snapshots.disk)
    devices = (HostDevices([64 * MiB]) if backend == "host" else CudaDevices(
        InMemoryCudaApi([16 * MiB]), reserve_bytes=0, instance_overhead_bytes=0,
        granularity=4 * KiB))
    sl = devices.allocate(MiB, "fn")
    try:
        with pytest.raises(CorruptChunk, match=first.digest):
            fill_slice(devices, sl, forged, snapshots)
        fill_slice(devices, sl, honest, snapshots)  # the honest manifest restores
    finally:
        devices.release(sl.id)
        snapshots.close()


async def test_a_chunk_of_an_old_sha256_snapshot_is_fetched_from_a_peer(
        tmp_path: Path) -> None:
    from thaw.blobstore.chunks import sha256_digest_of

    data = pattern(64 * KiB, 3)
    old = sha256_digest_of(data)  # how snapshots stored before BLAKE3 name a chunk
    server, address = await serve(LyingPeer({old: data}))
    node = NodeSnapshots(DiskTier(tmp_path / "node"), PinnedTier(8 * MiB), tmp_path / "shm")
    chunks = PeerChunks(node)
    try:
        assert await chunks._fetch_from(address, [old]) == len(data)
        assert node.disk.has(old) and node.disk.get(old) == data
        # The same name with other bytes is still refused.
        bad = bytes([data[0] ^ 1]) + data[1:]
        server2, address2 = await serve(LyingPeer({old: bad}))
        try:
            other = NodeSnapshots(DiskTier(tmp_path / "other"), PinnedTier(8 * MiB),
                                  tmp_path / "shm2")
            fetcher = PeerChunks(other)
            with pytest.raises(CorruptChunk, match=old):
                await fetcher._fetch_from(address2, [old])
            assert not other.disk.has(old)
            await fetcher.close()
            other.close()
        finally:
            await server2.stop(None)
    finally:
        await chunks.close()
        await server.stop(None)
        node.close()

"""The node's side of a restore, without instances: snapshots materialized as sealed
memfds shared by content, and the slice filled with the device arena and described for
the instance, on the host backend and on cuda (with the in-memory CUDA API)."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from thaw.blobstore import ChunkRef, DiskTier, PinnedTier, store_arena
from thaw.core.errors import SnapshotError
from thaw.platform.background import BACKGROUND_NICE
from thaw.platform.cuda import CudaDevices, InMemoryCudaApi
from thaw.platform.devices import HostDevices
from thaw.platform.memfds import ARENA_SEALS
from thaw.platform.slice_fill import fill_slice, slice_handover
from thaw.platform.snapshots import NodeSnapshots
from thaw.proto import manifest_pb2
from thaw.snapshotter.manifest import arena_message, chunk_dicts

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB


def pattern(length: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(length))


def arena(disk: DiskTier, data: bytes) -> manifest_pb2.Arena:
    return arena_message(len(data), store_arena(disk, data, chunk_size=CHUNK))


def manifest(disk: DiskTier, *, host: bytes, device: bytes = b"",
             function: str = "t/f") -> manifest_pb2.SnapshotManifest:
    return manifest_pb2.SnapshotManifest(
        format=1, function=function, version="1", pickle=arena(disk, b"pickled " + host[:8]),
        host=arena(disk, host), device=arena(disk, device))


@pytest.fixture
def snapshots(tmp_path: Path) -> NodeSnapshots:
    return NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(8 * MiB), tmp_path / "shm")


def test_arenas_become_sealed_memfds_shared_by_content(snapshots: NodeSnapshots) -> None:
    weights = pattern(300 * KiB, 1)
    first = snapshots.materialize(manifest(snapshots.disk, host=weights))
    copy = snapshots.materialize(manifest(snapshots.disk, host=weights, function="t/copy"))
    assert first.seconds > 0 and first.key != copy.key
    # Same weights, one memfd; its name is what an instance's maps show.
    assert copy.host_arena is first.host_arena
    fd = first.host_arena.fd
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:thaw-arena-")
    assert os.pread(fd, len(weights) + 1, 0) == weights
    # Sealed: nobody holding it may write, resize it or lift the seals.
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & ARENA_SEALS == ARENA_SEALS
    for change in (lambda: os.pwrite(fd, b"x", 0), lambda: os.ftruncate(fd, 1)):
        with pytest.raises(PermissionError):
            change()
    assert set(first.descriptors()) == {"snapshot_json", "pickle", "host_arena"}
    assert b'"modules"' in os.pread(first.meta.fd, 1 << 20, 0)
    # Materialized once: the second restore reuses the memfds.
    assert snapshots.materialize(manifest(snapshots.disk, host=weights)).seconds == 0.0


def test_eviction_and_collection_close_the_memfds(snapshots: NodeSnapshots,
                                                  tmp_path: Path) -> None:
    kept = manifest(snapshots.disk, host=pattern(100 * KiB, 2))
    gone = manifest(snapshots.disk, host=pattern(100 * KiB, 3), function="t/gone")
    kept_mat, gone_mat = snapshots.materialize(kept), snapshots.materialize(gone)
    snapshots.collect_garbage([kept])
    assert gone_mat.host_arena.closed and gone_mat.pickle.closed and gone_mat.meta.closed
    assert not kept_mat.host_arena.closed
    snapshots.evict(kept)
    assert kept_mat.host_arena.closed
    assert not [p for p in tmp_path.rglob("*") if "arena" in p.name]  # no files


def test_prewarm_leaves_out_the_arenas_the_node_holds_as_memfds(
        snapshots: NodeSnapshots) -> None:
    """A restore here made the host arena's and the pickle's memfds: prewarm copies only
    the device arena, and the snapshot counts as held in host memory."""
    host, device = pattern(300 * KiB, 6), pattern(200 * KiB, 7)
    snap = manifest(snapshots.disk, host=host, device=device)
    made = snapshots.materialize(snap)
    assert snapshots.prewarm(snap) == len(device)
    assert snapshots.pinned_keys() == [made.key]
    # Once evicted (memfds closed), a prewarm loads every arena again.
    snapshots.evict(snap)
    assert snapshots.pinned_keys() == []
    assert snapshots.prewarm(snap) == len(device) + len(host) + snap.pickle.size
    assert snapshots.pinned_keys() == [made.key]


def test_a_prewarm_runs_on_a_thread_at_background_priority(
        snapshots: NodeSnapshots, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = manifest(snapshots.disk, host=pattern(100 * KiB, 8))
    prewarm = snapshots.pinned.prewarm
    seen: list[tuple[int, int]] = []

    def recording(refs: list[ChunkRef], source: Any) -> int:
        seen.append((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0)))
        return prewarm(refs, source)

    monkeypatch.setattr(snapshots.pinned, "prewarm", recording)
    snapshots.prewarm(snap)
    assert seen and seen[0][0] != threading.get_native_id()
    assert seen[0][1] == BACKGROUND_NICE
    assert os.getpriority(os.PRIO_PROCESS, 0) != BACKGROUND_NICE  # the caller's own


def test_a_host_slice_is_filled_with_the_device_arena_and_sent_as_its_memfd(
        snapshots: NodeSnapshots) -> None:
    device = pattern(200 * KiB + 12, 4)
    snap = manifest(snapshots.disk, host=pattern(4 * KiB, 5), device=device)
    devices = HostDevices([64 * MiB])
    sl = devices.allocate(MiB, "fn")
    try:
        assert fill_slice(devices, sl, snap, snapshots) > 0
        assert os.pread(sl.fd, len(device), 0) == device
        assert os.pread(sl.fd, 16, len(device)) == bytes(16)  # the rest is the function's
        descriptor, fd = slice_handover(sl)
        assert (descriptor.kind, descriptor.size, descriptor.offset) == ("host", MiB, 0)
        assert fd == sl.fd
    finally:
        devices.release(sl.id)
    small = devices.allocate(64 * KiB, "fn")
    with pytest.raises(SnapshotError, match="gpu_memory"):
        fill_slice(devices, small, snap, snapshots)


def make_cuda() -> tuple[CudaDevices, InMemoryCudaApi]:
    api = InMemoryCudaApi([16 * MiB])
    return CudaDevices(api, reserve_bytes=0, instance_overhead_bytes=0,
                       granularity=4 * KiB), api


@pytest.mark.parametrize("pinned_capacity", [8 * MiB, 64 * KiB])
def test_a_cuda_slice_is_filled_from_the_pinned_tier_and_sent_as_its_ipc_handle(
        tmp_path: Path, pinned_capacity: int) -> None:
    """With room in the pinned tier the snapshot is prewarmed there and copied on
    several streams; without, through a staging copy of the arena."""
    snapshots = NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(pinned_capacity),
                              tmp_path / "shm")
    device = pattern(5 * CHUNK + 100, 6)
    snap = manifest(snapshots.disk, host=pattern(4 * KiB, 7), device=device)
    devices, api = make_cuda()
    sl = devices.allocate(MiB, "fn")
    fill_slice(devices, sl, snap, snapshots)
    opened = api.open_handle(bytes.fromhex(sl.ipc_handle))
    assert api.read(opened, 0, len(device)) == device
    prewarmed = pinned_capacity > len(device)
    assert (snapshots.pinned.usage().used >= len(device)) is prewarmed
    assert len(api.calls_named("copy")) >= (2 if prewarmed else 1)
    descriptor, fd = slice_handover(sl)
    assert fd is None
    assert descriptor.kind == "cuda" and descriptor.ipc_handle == sl.ipc_handle
    assert descriptor.size == MiB and descriptor.pci_bus_id == sl.pci_bus_id
    devices.release(sl.id)


def test_chunks_not_yet_pinned_are_read_in_batches_and_copied_as_they_arrive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Part of the arena already pinned (shared weights), the rest read from disk batch
    by batch, each batch copied while the next is read; the whole arena lands."""
    import thaw.platform.slice_fill as slice_fill

    monkeypatch.setattr(slice_fill, "FILL_BATCH_CHUNKS", 2)
    snapshots = NodeSnapshots(DiskTier(tmp_path / "chunks"), PinnedTier(8 * MiB),
                              tmp_path / "shm")
    device = pattern(7 * CHUNK + 300, 8)
    snap = manifest(snapshots.disk, host=pattern(4 * KiB, 9), device=device)
    refs = [ChunkRef.from_dict(d) for d in chunk_dicts(snap.device)]
    snapshots.pinned.prewarm(refs[2:4], snapshots.disk)  # some already there
    read: list[list[str]] = []
    prewarm = snapshots.pinned.prewarm

    def recording_prewarm(batch: list[ChunkRef], source: Any) -> int:
        read.append([ref.digest for ref in batch])
        return prewarm(batch, source)

    monkeypatch.setattr(snapshots.pinned, "prewarm", recording_prewarm)
    devices, api = make_cuda()
    sl = devices.allocate(MiB, "fn")
    fill_slice(devices, sl, snap, snapshots)
    assert api.read(api.open_handle(bytes.fromhex(sl.ipc_handle)), 0, len(device)) == device
    missing = [ref.digest for ref in refs if ref not in refs[2:4]]
    assert [d for batch in read for d in batch] == missing  # in batches of two
    assert len(read) == 3 and all(len(batch) <= 2 for batch in read)
    # The device arena stays in the tier for the next restore; nothing is left held,
    # and the snapshot is not booked as prewarmed (its host arena was not loaded).
    assert all(snapshots.pinned.has(ref.digest) for ref in refs)
    assert snapshots.pinned.usage().pinned == 0 and snapshots.pinned_keys() == []

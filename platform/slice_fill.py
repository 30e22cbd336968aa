"""An instance's slice before its restore: the snapshot's device arena copied in by the
agent, and the descriptor the instance opens it by (DESIGN.md §6). Both backends run
this one path: on the host backend the slice is a memfd and the copy a memcpy from the
pinned tier (or disk); on cuda it is a device allocation filled by `CudaDevices`' multi-
stream copies from the pinned tier, and the descriptor carries its IPC handle.

Blocking throughout: the agent calls these from a thread, never on its event loop.
"""

from __future__ import annotations

import mmap
import time
from concurrent.futures import ThreadPoolExecutor

from thaw.blobstore import ChunkRef
from thaw.core.errors import InvalidArgument, OutOfMemory, SnapshotError
from thaw.platform.cuda.allocator import CudaDevices
from thaw.platform.cuda.slices import CudaSlice
from thaw.platform.devices import DeviceBackend, HostSlice, Slice, SliceDescriptor
from thaw.platform.snapshots import NodeSnapshots
from thaw.proto import manifest_pb2
from thaw.snapshotter.manifest import chunk_dicts

# Chunks (a few MiB each) read from disk into the pinned tier per batch, while the
# batch before is copied to the device: big enough for multi-stream copies, small
# enough that reading and copying overlap.
FILL_BATCH_CHUNKS = 8


def slice_handover(sl: Slice) -> tuple[SliceDescriptor, int | None]:
    """How the instance opens `sl`: its descriptor, and the file descriptor to send with
    it (a host slice's memfd; None for a cuda slice, which travels as its IPC handle)."""
    if isinstance(sl, HostSlice):
        return sl.descriptor(), sl.fd
    if isinstance(sl, CudaSlice):
        opened = sl.descriptor()
        # Addressable: what was allocated (a restore allocates only its arena); the
        # rest of the slice is the instance allocator's cap.
        return SliceDescriptor(kind="cuda", size=min(sl.size, sl.allocated),
                               limit=sl.size, pci_bus_id=opened["pci_bus_id"],
                               device_index=opened["device_index"],
                               ipc_handle=opened["ipc_handle"]), None
    raise InvalidArgument(f"slice {sl.id} is of no kind an instance can open "
                          f"({type(sl).__name__})", field="slice")


def fill_slice(devices: DeviceBackend, sl: Slice, manifest: manifest_pb2.SnapshotManifest,
               snapshots: NodeSnapshots) -> float:
    """Copy the snapshot's device arena to the start of `sl`; returns the seconds it
    took. SnapshotError when the arena is larger than the slice (the function's
    gpu_memory is too small for its own snapshot: the same on every node)."""
    arena = manifest.device
    if arena.size == 0:
        return 0.0
    if arena.size > sl.size:
        raise SnapshotError(f"the snapshot's device arena ({arena.size} bytes) does not fit "
                          f"the function's {sl.size}-byte slice (resources.gpu_memory)")
    refs = [ChunkRef.from_dict(d) for d in chunk_dicts(arena)]
    started = time.perf_counter()
    if isinstance(sl, HostSlice):
        with mmap.mmap(sl.fd, sl.size) as mm, memoryview(mm) as view:
            snapshots.restore_into(refs, view)
    elif isinstance(devices, CudaDevices) and isinstance(sl, CudaSlice):
        _fill_cuda(devices, sl, manifest, refs, snapshots)
    else:
        raise InvalidArgument(f"slice {sl.id} cannot be filled by the "
                              f"{devices.kind} backend", field="slice")
    return time.perf_counter() - started


def _fill_cuda(devices: CudaDevices, sl: CudaSlice, manifest: manifest_pb2.SnapshotManifest,
               refs: list[ChunkRef], snapshots: NodeSnapshots) -> None:
    """From the pinned tier (page-locked: the copies run at PCIe speed). Chunks not
    there yet are read into it in batches, each copied to the device while the next
    is read; where the tier has no room for them, through a staging copy of the arena
    in pageable memory."""
    pinned = snapshots.pinned
    missing = [ref for ref in refs if not pinned.has(ref.digest)]
    if not missing:
        pinned.check_lengths(refs)
        devices.restore_into_slice(sl, refs, pinned)
        return
    missing_digests = {ref.digest for ref in missing}
    present = [ref for ref in refs if ref.digest not in missing_digests]
    batches = [missing[at:at + FILL_BATCH_CHUNKS]
               for at in range(0, len(missing), FILL_BATCH_CHUNKS)]
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="thaw-fill-read") as reader:
            reading = reader.submit(pinned.prewarm, batches[0], snapshots.disk)
            if present:
                pinned.check_lengths(present)
                devices.restore_into_slice(sl, present, pinned)
            for index, batch in enumerate(batches):
                reading.result()
                # Kept from eviction (by the next batch's read, say) until copied.
                digests = list(dict.fromkeys(ref.digest for ref in batch))
                pinned.pin(digests)
                try:
                    pinned.check_lengths(batch)
                    if index + 1 < len(batches):
                        reading = reader.submit(pinned.prewarm, batches[index + 1],
                                                snapshots.disk)
                    devices.restore_into_slice(sl, batch, pinned)
                finally:
                    pinned.unpin(digests)
    except OutOfMemory:
        _fill_cuda_staged(devices, sl, refs, manifest.device.size, snapshots)


def _fill_cuda_staged(devices: CudaDevices, sl: CudaSlice, refs: list[ChunkRef], size: int,
                      snapshots: NodeSnapshots) -> None:
    with mmap.mmap(-1, size) as staging, memoryview(staging) as view:
        snapshots.restore_into(refs, view)
        devices.copy_into_slice(sl, [(0, view)])

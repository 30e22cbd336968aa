"""`CudaDevices`, the cuda DeviceBackend: one device allocation per slice, placed on the
GPU with room behind the PCIe link with the fewest restores in flight (best fit by
memory among equals), zeroed before it is handed out and again before it is freed, and
filled from host memory by `transfer`'s multi-stream copies."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterable

import structlog

from thaw.blobstore import ChunkRef, PinnedTier
from thaw.blobstore.chunks import BytesLike, as_byte_view
from thaw.core.errors import ChunkNotFound, InvalidArgument, NotFound, OutOfMemory, ThawError
from thaw.core.units import parse_size
from thaw.platform.activation import ActivationBudget
from thaw.platform.cuda.api import CudaApi, CudaUnavailable, GiB, MiB
from thaw.platform.cuda.driver import CupyCudaApi
from thaw.platform.cuda.slices import (
    CudaSlice,
    DeviceBook,
    SliceNotZeroed,
    SliceRecord,
    SliceState,
)
from thaw.platform.cuda.topology import PcieLink, pcie_links
from thaw.platform.cuda.transfer import (
    DEFAULT_COPY_STREAMS,
    CopyStats,
    check_pieces,
    pinned_pieces,
    plan_stream_copies,
    run_copies,
)
from thaw.platform.devices import DeviceSettings, DeviceUsage, SandboxNeeds, Slice
from thaw.platform.devices import gpu_info as nvml_gpu_info

log = structlog.get_logger()

# cudaMalloc maps device memory in 2 MiB pages and may pack smaller allocations into a
# shared page (which an IPC handle would then expose). A slice is allocated (and zeroed,
# and booked) rounded up to this: it owns whole pages, the books match what the device
# loses, and any padding the instance can reach through its handle is scrubbed too.
ALLOCATION_GRANULARITY = 2 * MiB

# Kept back from each device's total: the agent's own CUDA context (300-500 MiB on CUDA
# 12), memory the driver reserves (NVML counts it in `total`) and some headroom.
DEFAULT_RESERVE_BYTES = 1 * GiB

# Booked beside every slice: each instance that opens a handle creates its own CUDA
# context on the device (~300-500 MiB without MPS, with lazy module loading; far less as
# an MPS client). Leaving it out would pack slices into memory the instances then need.
DEFAULT_INSTANCE_OVERHEAD_BYTES = 512 * MiB

# The copy `measure_h2d_gbps` times on each link: large enough that the per-copy launch
# cost (microseconds) is noise, small enough to fit beside the reserve on any GPU.
H2D_MEASURE_BYTES = 256 * MiB


class CudaDevices:
    """The cuda DeviceBackend: slices are device allocations of their own on real GPUs.

    Thread-safe: the agent allocates, fills and releases from worker threads. A slice's
    IPC handle must not be released while an instance still has it open: freeing memory
    another process maps is undefined behaviour in CUDA, so the agent stops the instance
    before it calls `release`.

    Placement: a slice goes to a GPU with room behind the PCIe link
    (thaw.platform.cuda.topology) with the fewest restores in flight by `activation`, the
    node's activation budget; among those, best fit by memory. `allocate(...,
    restore=True)` counts the restore on its link at once (a hold the agent's `admit`
    of the slice takes over), so that a burst of starts spreads over the links.
    """

    kind = "cuda"

    def __init__(self, api: CudaApi | None = None, *,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                 instance_overhead_bytes: int = DEFAULT_INSTANCE_OVERHEAD_BYTES,
                 granularity: int = ALLOCATION_GRANULARITY,
                 mps: bool | None = None,
                 activation: ActivationBudget | None = None) -> None:
        """`api` defaults to CuPy (CudaUnavailable without it or a GPU); `mps` None asks
        the api whether an MPS daemon runs; `activation` (the node's budget) defaults to
        a new one of the documented default size."""
        for name, value, least in (("reserve_bytes", reserve_bytes, 0),
                                   ("instance_overhead_bytes", instance_overhead_bytes, 0),
                                   ("granularity", granularity, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidArgument(f"{name} must be an integer >= {least}, got {value!r}",
                                      field=name)
        self._api: CudaApi = api if api is not None else CupyCudaApi()
        infos = self._api.devices()
        if not infos:
            raise CudaUnavailable("the cuda device backend found no GPU")
        self._links = pcie_links(infos, self._api.topology())
        link_of = {index: link for link in self._links for index in link.devices}
        self._devices = [DeviceBook(info, f"cuda{info.index}",
                                    max(0, info.total_bytes - reserve_bytes),
                                    link=link_of[position].id,
                                    numa_node=link_of[position].numa_node)
                         for position, info in enumerate(infos)]
        if all(d.capacity == 0 for d in self._devices):
            largest = max(info.total_bytes for info in infos)
            raise InvalidArgument(f"a reserve of {reserve_bytes} bytes leaves no memory on "
                                  f"any GPU (largest: {largest} bytes)", field="reserve_bytes")
        self._overhead = instance_overhead_bytes
        self._granularity = granularity
        self._mps = self._api.mps_active() if mps is None else mps
        self._activation = activation if activation is not None else ActivationBudget()
        self._lock = threading.Lock()
        log.info("cuda devices", gpus=len(infos), mps=self._mps,
                 links={link.id: [f"cuda{infos[i].index}" for i in link.devices]
                        for link in self._links})

    @classmethod
    def from_settings(cls, settings: DeviceSettings) -> CudaDevices:
        """The backend as the agent's settings size it, on CuPy (CudaUnavailable
        without it or a GPU)."""
        modes: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
        if settings.cuda_mps not in modes:
            raise InvalidArgument(f"cuda_mps must be auto, on or off, got "
                                  f"{settings.cuda_mps!r}", field="cuda_mps")
        return cls(reserve_bytes=parse_size(settings.cuda_reserve),
                   instance_overhead_bytes=parse_size(settings.cuda_instance_overhead),
                   mps=modes[settings.cuda_mps])

    @property
    def mps(self) -> bool:
        return self._mps

    @property
    def activation(self) -> ActivationBudget:
        """The node's activation budget, by which slices are placed."""
        return self._activation

    @property
    def links(self) -> list[PcieLink]:
        """The PCIe links to host memory and the GPUs behind each."""
        return list(self._links)

    def compute_shares_enforced(self) -> bool:
        """Whether a function's gpu_compute applies (an MPS daemon serves the GPUs)."""
        return self._mps

    def measure_h2d_gbps(self) -> float | None:
        """Host-to-device GB/s from page-locked memory: the slowest link's, measured on
        its first GPU; None (logged) if no link could be measured."""
        figures = []
        for link in self._links:
            device = self._devices[link.devices[0]].info.index
            try:
                figures.append(self._api.h2d_gbps(device, H2D_MEASURE_BYTES))
            except ThawError as exc:
                log.warning("could not measure host-to-device bandwidth", link=link.id,
                            error=exc.message)
        return min(figures) if figures else None

    # -- DeviceBackend --

    def allocate(self, size: int, owner: str, *, compute_percent: int = 0,
                 restore: bool = False, resident: int | None = None) -> CudaSlice:
        """A zeroed slice of `size` bytes on a device that fits it: behind the link with
        the fewest restores in flight, then the one with the least memory left (best
        fit); the next one if the driver refuses; OutOfMemory naming the sizes when none
        can take it. `restore`: a restore will fill it, counted on its link from now
        (until the budget admits the slice, or it is released). `resident`: the bytes
        allocated as device memory now (a restore's device arena); the rest of `size`
        stays booked for what the instance allocates itself, capped at it. None: all of
        `size` is allocated."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgument(f"slice size must be an integer >= 1, got {size!r}",
                                  field="size")
        if (isinstance(compute_percent, bool) or not isinstance(compute_percent, int)
                or not 0 <= compute_percent <= 100):
            raise InvalidArgument(f"compute_percent must be 0-100, got {compute_percent!r}",
                                  field="gpu_compute")
        if resident is not None and (isinstance(resident, bool)
                                     or not isinstance(resident, int) or resident < 0):
            raise InvalidArgument(f"resident bytes must be an integer >= 0, got {resident!r}",
                                  field="resident")
        whole = -(-size // self._granularity) * self._granularity
        # At least one page: the instance opens its slice by the allocation's IPC handle.
        wanted = size if resident is None else max(1, min(resident, size))
        allocated = -(-wanted // self._granularity) * self._granularity
        booked = whole + self._overhead
        refused: list[str] = []
        tried: set[str] = set()
        while True:
            with self._lock:
                record = self._book(size, allocated, booked, owner, compute_percent, tried)
                if record is None:
                    raise OutOfMemory(self._no_room_message(size, booked, refused))
                if restore:
                    self._activation.hold(record.device.link, record.id)
            tried.add(record.device.id)
            try:
                self._materialize(record)
            except OutOfMemory as exc:
                self._unbook(record)
                refused.append(f"{record.device.id} refused it ({exc.message})")
                continue
            except BaseException:
                self._unbook(record)
                raise
            with self._lock:
                record.move(SliceState.READY)
            assert record.slice is not None
            return record.slice

    def release(self, slice_id: str) -> None:
        """Zero the slice on its stream, wait for that, then free it. NotFound if there
        is no such slice; SliceNotZeroed (memory kept, never reused) if scrubbing fails."""
        with self._lock:
            record = self._find(slice_id)
            record.move(SliceState.ZEROING)
        self._activation.drop(slice_id)
        self._retire(record)

    def usage(self) -> list[DeviceUsage]:
        with self._lock:
            return [DeviceUsage(d.id, self.kind, d.capacity, d.booked, gpu=True)
                    for d in self._devices]

    def close(self) -> None:
        """Scrub and free every slice left; a failure is logged and the rest go on."""
        with self._lock:
            left = [r for d in self._devices for r in d.records.values()
                    if r.state in (SliceState.READY, SliceState.QUARANTINED)]
            for record in left:
                record.move(SliceState.ZEROING)
        for record in left:
            try:
                self._retire(record)
            except ThawError as exc:
                log.error("cuda slice left allocated at close", slice=record.id,
                          device=record.device.id, error=exc.message)

    def sandbox_needs(self) -> SandboxNeeds:
        """The slice's GPU, and the agent's PID namespace: a legacy CUDA IPC handle opens
        only from a process that sees the exporter's (the package docstring's
        "Containers")."""
        return SandboxNeeds(gpus=True, host_pid_namespace=True)

    def gpu_info(self) -> tuple[str, str]:
        return nvml_gpu_info()

    # -- filling a slice --

    def copy_into_slice(self, sl: Slice | str, pieces: Iterable[tuple[int, BytesLike]], *,
                        streams: int = DEFAULT_COPY_STREAMS) -> CopyStats:
        """Copy host bytes into the slice: each piece is (slice offset, bytes); the bytes
        are split evenly across `streams` new streams as async host-to-device copies,
        and this returns once every stream has finished (or raises once every stream
        has stopped: no DMA reads the sources after this returns either way).

        Sources should be page-locked (the pinned tier with CudaPinnedAllocator): from
        pageable memory the driver stages each copy and the streams barely overlap.
        """
        if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
            raise InvalidArgument(f"streams must be an integer >= 1, got {streams!r}",
                                  field="streams")
        slice_id = sl if isinstance(sl, str) else sl.id
        views = [(offset, as_byte_view(data)) for offset, data in pieces]
        with self._lock:
            record = self._find(slice_id)
        check_pieces(views, record.size)
        plan = plan_stream_copies([(offset, view.nbytes) for offset, view in views], streams)
        total = sum(view.nbytes for _, view in views)
        with record.busy:
            with self._lock:
                if record.state is not SliceState.READY:
                    raise NotFound(f"no slice {slice_id} (it was released)")
            started = time.perf_counter()
            if plan:
                run_copies(self._api, record.device.info.index, record.device.id,
                           record.ptr, views, plan)
            seconds = time.perf_counter() - started
        return CopyStats(bytes=total, streams=len(plan), seconds=seconds,
                         gbps=total / seconds / 1e9 if seconds > 0 else 0.0)

    def restore_into_slice(self, sl: Slice | str, chunks: Iterable[ChunkRef],
                           pinned: PinnedTier, *,
                           streams: int = DEFAULT_COPY_STREAMS) -> CopyStats:
        """Copy an arena's chunks from the pinned tier into the slice at their offsets
        (held there for the copy). Chunks that sit back to back both in a pinned region
        and in the arena go as one copy. ChunkNotFound, before copying anything, if any
        chunk is not in the pinned tier: prewarm the snapshot first."""
        refs = sorted(chunks, key=lambda ref: ref.offset)
        with pinned.hold(ref.digest for ref in refs) as held:
            missing = [ref.digest for ref in refs if ref.digest not in held]
            if missing:
                raise ChunkNotFound(f"{len(missing)} chunks of the arena are not in the "
                                    f"pinned tier (first: {missing[0]}); prewarm it first")
            # A reference longer than its held chunk would copy unverified bytes.
            pinned.check_lengths(refs)
            pieces = pinned_pieces(refs, held)
            return self.copy_into_slice(sl, pieces, streams=streams)

    # -- internals --

    def _book(self, size: int, allocated: int, booked: int, owner: str,
              compute_percent: int, tried: set[str]) -> SliceRecord | None:
        fitting = [d for d in self._devices if d.id not in tried and d.free >= booked]
        if not fitting:
            return None
        load = {link: self._activation.load(link) for link in {d.link for d in fitting}}
        device = min(fitting, key=lambda d: (load[d.link], d.free - booked, d.info.index))
        record = SliceRecord(id=f"{owner}-{uuid.uuid4().hex[:8]}", device=device,
                             size=size, allocated=allocated, booked=booked,
                             compute_percent=compute_percent)
        device.records[record.id] = record
        return record

    def _unbook(self, record: SliceRecord) -> None:
        with self._lock:
            record.move(SliceState.FREED)
            record.device.records.pop(record.id, None)
        self._activation.drop(record.id)

    def _no_room_message(self, size: int, booked: int, refused: list[str]) -> str:
        free = ", ".join(f"{d.id} {d.free}" for d in self._devices)
        message = (f"no GPU has room for a {size}-byte slice ({booked} bytes with "
                   f"allocation rounding and the instance's context); free bytes: {free}")
        return message + ("; " + "; ".join(refused) if refused else "")

    def _materialize(self, record: SliceRecord) -> None:
        """Allocate, scrub and export the slice's memory; on failure give back whatever
        was taken. (No tenant has seen this allocation yet, so it is freed even when its
        scrub failed: that hands the driver nothing it did not hand us.)"""
        api, device = self._api, record.device.info.index
        record.ptr = api.malloc(device, record.allocated)
        try:
            record.stream = api.create_stream(device)
            # cudaMalloc may return pages another process's context used last: scrub them
            # too rather than trust the driver to have.
            api.memset_async(device, record.ptr, 0, record.allocated, record.stream)
            api.synchronize(device, record.stream)
            handle = api.ipc_handle(device, record.ptr)
        except BaseException:
            if record.stream:
                with contextlib.suppress(ThawError):
                    api.synchronize(device, record.stream)
                with contextlib.suppress(ThawError):
                    api.destroy_stream(device, record.stream)
            try:
                api.free(device, record.ptr)
            except ThawError as exc:
                log.error("could not free a slice that failed to set up",
                          device=record.device.id, error=exc.message)
            raise
        info = record.device.info
        record.slice = CudaSlice(
            id=record.id, device_id=record.device.id, size=record.size, path="",
            device_index=info.index, pci_bus_id=info.pci_bus_id, device_uuid=info.uuid,
            ipc_handle=handle.hex(), allocated=record.allocated,
            compute_percent=record.compute_percent, mps=self._mps,
            pcie_link=record.device.link, numa_node=record.device.numa_node)

    def _retire(self, record: SliceRecord) -> None:
        """Scrub then free a slice in ZEROING; a copy still filling it finishes first."""
        api, device = self._api, record.device.info.index
        with record.busy:
            zeroed = False
            try:
                api.memset_async(device, record.ptr, 0, record.allocated, record.stream)
                api.synchronize(device, record.stream)
                zeroed = True
                api.destroy_stream(device, record.stream)
                api.free(device, record.ptr)
            except ThawError as exc:
                with self._lock:
                    record.move(SliceState.QUARANTINED)
                what = "freed" if zeroed else "zeroed"
                raise SliceNotZeroed(
                    f"slice {record.id} on {record.device.id} could not be {what} "
                    f"({exc.message}); its {record.allocated} bytes stay booked and are "
                    "never handed out again") from exc
        with self._lock:
            record.move(SliceState.FREED)
            record.device.records.pop(record.id, None)

    def _find(self, slice_id: str) -> SliceRecord:
        for device in self._devices:
            record = device.records.get(slice_id)
            if record is not None and record.state is SliceState.READY:
                return record
        raise NotFound(f"no slice {slice_id}")

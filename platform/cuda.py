"""The cuda device backend (DESIGN.md §6): one device allocation per slice, handed to the
instance as a CUDA IPC handle, packed best-fit by memory, zeroed before anyone else can
get its memory, and filled from the pinned tier by async copies on several streams.

Every CUDA and NVML call goes through `CudaApi`: `CupyCudaApi` is the real one (CuPy and
pynvml, both imported lazily, so importing this module never needs a GPU), and
`InMemoryCudaApi` keeps "device memory" in bytearrays and runs stream work only when the
stream is synchronised, so unit tests catch a free or a return that comes before the
work it depends on.

The instance's end (open the handle, view ranges as torch tensors) is
`thaw.platform.cuda_copy`, which imports nothing from thaw so that it can move into the
in-instance runtime.

Containers. Legacy CUDA IPC (cudaIpcGetMemHandle / cudaIpcOpenMemHandle) only opens in a
process that sees the exporter's PID namespace; from a container with a private one the
open fails ("invalid device context"). So the docker runtime (platform/docker_runtime.py)
starts cuda instances in the host PID namespace (`pid_mode="host"`, or
`"container:<agent>"` were the agent itself in a container) with the GPU requested by a
DeviceRequest; naming the slice's `device_uuid` there, rather than every GPU, keeps an
instance off GPUs it has no slice on. `open_slice` finds the GPU by PCI bus id, so the
container's own numbering does not matter. The way out of the shared PID namespace is
the VMM API (cuMemCreate exported as a POSIX file descriptor, passed over the instance's
unix socket with SCM_RIGHTS); CuPy does not wrap it, so it is left for later.

MPS. Where an MPS control daemon runs, a function's `gpu_compute` percent is applied by
starting its instance with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=<percent> in its
environment (`CudaSlice.instance_env`), plus CUDA_MPS_PIPE_DIRECTORY if the daemon does
not use the default pipe directory (and, under docker, that directory mounted and
`ipc_mode="host"`). The percentage caps the SMs a client may use; it reserves nothing,
so shares are not packed: their sum on a device may pass 100. Without MPS the share is
kept on the slice as data and not enforced.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import structlog

from thaw.blobstore import ChunkRef, PinnedTier
from thaw.blobstore.chunks import BytesLike, as_byte_view
from thaw.core.errors import ChunkNotFound, InvalidArgument, NotFound, OutOfMemory, ThawError
from thaw.platform.devices import DeviceUsage, Slice

log = structlog.get_logger()

MiB = 1024 * 1024
GiB = 1024 * MiB

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

# Host-to-device copies of a restore: several streams let the copy engines (one or two
# for H2D on datacenter GPUs) overlap the pieces. Four is a guess, not a measurement (no
# GPU where this was written): enough to keep two engines fed; tune it on a GPU node.
DEFAULT_COPY_STREAMS = 4

# Streams split the bytes at page multiples: the pinned tier's runs start page-aligned, so
# every stream's first DMA does too.
COPY_SPLIT_ALIGNMENT = 4096

# Values from cuda_runtime_api.h / driver_types.h; they are ABI and never change.
CUDA_MEMCPY_HOST_TO_DEVICE = 1
CUDA_STREAM_NON_BLOCKING = 0x01
CUDA_ERROR_MEMORY_ALLOCATION = 2
CUDA_IPC_HANDLE_BYTES = 64

# Where nvidia-cuda-mps-control listens unless CUDA_MPS_PIPE_DIRECTORY says otherwise.
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"


class CudaUnavailable(ThawError):
    """CuPy, the CUDA driver or a GPU is missing: the cuda device backend cannot run."""

    code = "cuda_unavailable"


class SliceNotZeroed(ThawError):
    """A slice's memory could not be zeroed (or, once zeroed, freed): it stays booked and
    is never handed out again."""

    code = "slice_not_zeroed"


class IllegalSliceTransition(ThawError):
    """A slice was asked to move along an edge its lifecycle does not have."""

    code = "illegal_transition"


# ---- the CUDA/NVML seam ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CudaDeviceInfo:
    """One GPU as the agent's CUDA runtime numbers it."""

    index: int
    """CUDA ordinal in the agent's process (after CUDA_VISIBLE_DEVICES)."""
    name: str
    """Model, e.g. "NVIDIA A100-SXM4-40GB"."""
    pci_bus_id: str
    """"0000:3b:00.0": the same GPU whatever a process's CUDA_VISIBLE_DEVICES says."""
    uuid: str
    """"GPU-…": what docker DeviceRequests and MPS limits name a GPU by."""
    total_bytes: int
    """Device memory in bytes (NVML's figure when NVML answers)."""


class CudaApi(Protocol):
    """The CUDA runtime and NVML calls the backend makes, each on an explicit device.

    Implementations translate their library's errors: OutOfMemory when the device has no
    room, ThawError (never a CuPy or NVML exception) for anything else.
    """

    def devices(self) -> list[CudaDeviceInfo]:
        """Every GPU visible to this process, in CUDA ordinal order."""
        ...

    def mps_active(self) -> bool:
        """Whether an MPS control daemon is serving this machine."""
        ...

    def malloc(self, device: int, nbytes: int) -> int:
        """A new device allocation of its own (never a block of a shared pool)."""
        ...

    def free(self, device: int, ptr: int) -> None: ...

    def ipc_handle(self, device: int, ptr: int) -> bytes:
        """The 64-byte IPC handle of the allocation that starts at `ptr`."""
        ...

    def create_stream(self, device: int) -> int:
        """A non-blocking stream: it never waits on, or for, the legacy default stream."""
        ...

    def destroy_stream(self, device: int, stream: int) -> None: ...

    def memset_async(self, device: int, ptr: int, value: int, nbytes: int,
                     stream: int) -> None: ...

    def copy_to_device_async(self, device: int, dst: int, src: memoryview,
                             stream: int) -> None:
        """Queue a copy of `src` (host bytes) to `dst`; `src` must stay alive and
        unchanged until `stream` is synchronised."""
        ...

    def synchronize(self, device: int, stream: int) -> None:
        """Wait for everything queued on `stream`; raises if any of it failed."""
        ...


class CupyCudaApi:  # pragma: no cover - needs CuPy and a GPU (tests/gpu)
    """CudaApi on CuPy's runtime bindings, with pynvml for capacity and identity."""

    def __init__(self) -> None:
        try:
            import cupy  # type: ignore[import-not-found]
        except ImportError as exc:
            raise CudaUnavailable(
                "the cuda device backend needs CuPy, which is not importable here "
                f"({exc}); install cupy-cuda12x (or cupy-cuda11x) to match the driver, or "
                "run the agent with THAW_DEVICE=host") from exc
        self._cupy: Any = cupy
        self._rt: Any = cupy.cuda.runtime
        try:
            count = int(self._rt.getDeviceCount())
        except Exception as exc:  # CUDARuntimeError: no driver, driver too old, ...
            raise CudaUnavailable(f"the cuda device backend found no usable CUDA driver: "
                                  f"{exc}") from exc
        if count == 0:
            raise CudaUnavailable("the cuda device backend found no GPU (check the driver "
                                  "and CUDA_VISIBLE_DEVICES), or run with THAW_DEVICE=host")
        self._count = count

    @contextlib.contextmanager
    def _translated(self, what: str, device: int) -> Iterator[None]:
        """Turn CuPy's errors into thaw's: OutOfMemory for an allocation failure."""
        oom = getattr(getattr(self._cupy.cuda, "memory", None), "OutOfMemoryError", ())
        try:
            yield
        except ThawError:
            raise
        except oom as exc:
            raise OutOfMemory(f"{what} on cuda{device}: {exc}") from exc
        except self._rt.CUDARuntimeError as exc:
            if getattr(exc, "status", None) == CUDA_ERROR_MEMORY_ALLOCATION:
                raise OutOfMemory(f"{what} on cuda{device}: {exc}") from exc
            raise ThawError(f"{what} on cuda{device} failed: {exc}") from exc

    @contextlib.contextmanager
    def _on(self, device: int, what: str) -> Iterator[None]:
        """Run with `device` current in this thread (CUDA's current device is per
        thread, and the agent calls from a thread pool), translating errors."""
        with self._translated(what, device), self._cupy.cuda.Device(device):
            yield

    def devices(self) -> list[CudaDeviceInfo]:
        infos = []
        with _Nvml() as nvml:
            for index in range(self._count):
                # Without making the device current: on CUDA 12 that creates its context.
                with self._translated("reading device properties", index):
                    props = self._rt.getDeviceProperties(index)
                    bus = str(self._rt.deviceGetPCIBusId(index))
                name = props.get("name", b"")
                name = name.decode() if isinstance(name, bytes) else str(name)
                raw_uuid = props.get("uuid")
                cuda_uuid = (f"GPU-{uuid.UUID(bytes=bytes(raw_uuid))}"
                             if isinstance(raw_uuid, bytes) and len(raw_uuid) == 16 else "")
                total, nvml_uuid = nvml.memory_and_uuid(bus)
                infos.append(CudaDeviceInfo(
                    index=index, name=name, pci_bus_id=bus, uuid=nvml_uuid or cuda_uuid,
                    total_bytes=total or int(props["totalGlobalMem"])))
        return infos

    def mps_active(self) -> bool:
        pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_MPS_PIPE_DIRECTORY)
        return os.path.exists(os.path.join(pipe, "control"))

    def malloc(self, device: int, nbytes: int) -> int:
        # The runtime's cudaMalloc, not cupy.cuda.alloc: that draws from CuPy's pool, whose
        # blocks share one cudaMalloc, and a block's IPC handle would open all of it. Not
        # cupy.cuda.Memory either: it frees in __dealloc__, where an error cannot surface.
        with self._on(device, f"allocating {nbytes} bytes"):
            return int(self._rt.malloc(nbytes))

    def free(self, device: int, ptr: int) -> None:
        with self._on(device, "freeing a slice"):
            self._rt.free(ptr)

    def ipc_handle(self, device: int, ptr: int) -> bytes:
        with self._on(device, "exporting an IPC handle"):
            return bytes(self._rt.ipcGetMemHandle(ptr))

    def create_stream(self, device: int) -> int:
        with self._on(device, "creating a stream"):
            return int(self._rt.streamCreateWithFlags(CUDA_STREAM_NON_BLOCKING))

    def destroy_stream(self, device: int, stream: int) -> None:
        with self._on(device, "destroying a stream"):
            self._rt.streamDestroy(stream)

    def memset_async(self, device: int, ptr: int, value: int, nbytes: int,
                     stream: int) -> None:
        with self._on(device, "zeroing a slice"):
            self._rt.memsetAsync(ptr, value, nbytes, stream)

    def copy_to_device_async(self, device: int, dst: int, src: memoryview,
                             stream: int) -> None:
        import numpy as np

        # Reads the address without copying; works for the pinned tier's read-only views.
        host = int(np.frombuffer(src, dtype=np.uint8).ctypes.data)
        with self._on(device, f"copying {src.nbytes} bytes to the device"):
            self._rt.memcpyAsync(dst, host, src.nbytes, CUDA_MEMCPY_HOST_TO_DEVICE, stream)

    def synchronize(self, device: int, stream: int) -> None:
        with self._on(device, "waiting for a stream"):
            self._rt.streamSynchronize(stream)


class _Nvml:  # pragma: no cover - needs NVML
    """pynvml for a device's memory and UUID, looked up by PCI bus id (NVML numbers GPUs
    in PCI order, CUDA fastest first, and CUDA_VISIBLE_DEVICES renumbers only CUDA)."""

    def __init__(self) -> None:
        self._pynvml: Any = None

    def __enter__(self) -> _Nvml:
        try:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError: fall back to CUDA's figures
            log.warning("NVML unavailable; using CUDA's device memory figures", error=str(exc))
            return self
        self._pynvml = pynvml
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pynvml is not None:
            with contextlib.suppress(Exception):
                self._pynvml.nvmlShutdown()

    def memory_and_uuid(self, pci_bus_id: str) -> tuple[int, str]:
        """(total bytes, "GPU-…"), or (0, "") when NVML cannot say."""
        nvml = self._pynvml
        if nvml is None:
            return 0, ""
        try:
            handle = nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
            total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            found = nvml.nvmlDeviceGetUUID(handle)
        except nvml.NVMLError as exc:
            log.warning("NVML cannot describe a GPU", pci_bus_id=pci_bus_id, error=str(exc))
            return 0, ""
        return total, found.decode() if isinstance(found, bytes) else str(found)


# ---- the in-memory fake ------------------------------------------------------------------


@dataclass(eq=False)
class _FakeAllocation:
    device: int
    start: int
    size: int
    ptr: int


@dataclass(eq=False)
class _FakeStream:
    device: int
    pending: list[tuple[int, int, Callable[[], None]]] = field(default_factory=list)
    """(ptr, nbytes, work) queued and not yet run."""


class InMemoryCudaApi:
    """A CudaApi whose devices are bytearrays: for unit tests and laptops.

    It behaves like the hardware where the backend's correctness depends on it: freed
    memory keeps its bytes and is handed out again first-fit (so a missing scrub shows up
    as another tenant's bytes), stream work runs only at `synchronize` (so returning or
    freeing before synchronising shows up), and freeing memory with work still queued on
    it raises. Every call is appended to `calls` as a tuple, name first.
    """

    def __init__(self, totals: Sequence[int], *, mps: bool = False,
                 names: Sequence[str] | None = None) -> None:
        self.infos = [
            CudaDeviceInfo(index=i, name=(names[i] if names else "Fake GPU"),
                           pci_bus_id=f"0000:{i + 1:02x}:00.0",
                           uuid=f"GPU-00000000-0000-0000-0000-{i:012x}", total_bytes=total)
            for i, total in enumerate(totals)]
        self.memory = [bytearray(total) for total in totals]
        self.mps = mps
        self.calls: list[tuple[Any, ...]] = []
        self.allocations: dict[int, _FakeAllocation] = {}
        self.streams: dict[int, _FakeStream] = {}
        self._handles: dict[bytes, int] = {}
        self._next_stream = 1
        self._failures: dict[str, list[Exception]] = {}
        self._lock = threading.Lock()

    # -- test hooks --

    def fail_next(self, call: str, error: Exception, *, after: int = 0) -> None:
        """Make the call named `call` raise `error`, after letting `after` calls pass."""
        self._failures.setdefault(call, []).extend([_PASS] * after + [error])

    def open_handle(self, handle: bytes) -> int:
        """What an instance's cudaIpcOpenMemHandle returns: the allocation's pointer."""
        with self._lock:
            ptr = self._handles.get(bytes(handle))
            if ptr is None or ptr not in self.allocations:
                raise ThawError("fake cuda: IPC handle of a freed or unknown allocation")
            return ptr

    def write(self, ptr: int, offset: int, data: bytes) -> None:
        """A kernel of the tenant's writing device memory through its mapping."""
        alloc = self._allocation(ptr)
        if offset < 0 or offset + len(data) > alloc.size:
            raise ThawError("fake cuda: write outside the allocation")
        at = alloc.start + offset
        self.memory[alloc.device][at:at + len(data)] = data

    def read(self, ptr: int, offset: int, nbytes: int) -> bytes:
        alloc = self._allocation(ptr)
        if offset < 0 or offset + nbytes > alloc.size:
            raise ThawError("fake cuda: read outside the allocation")
        at = alloc.start + offset
        return bytes(self.memory[alloc.device][at:at + nbytes])

    def calls_named(self, *names: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] in names]

    # -- CudaApi --

    def devices(self) -> list[CudaDeviceInfo]:
        self._record("devices")
        return list(self.infos)

    def mps_active(self) -> bool:
        return self.mps

    def malloc(self, device: int, nbytes: int) -> int:
        self._record("malloc", device, nbytes)
        with self._lock:
            start = self._first_fit(device, nbytes)
            if start is None:
                raise OutOfMemory(f"allocating {nbytes} bytes on cuda{device}: "
                                  "cudaErrorMemoryAllocation (fake)")
            # Pointers carry the device in their high bits, as unified addressing does.
            ptr = ((device + 1) << 40) + start
            self.allocations[ptr] = _FakeAllocation(device, start, nbytes, ptr)
            return ptr

    def free(self, device: int, ptr: int) -> None:
        self._record("free", device, ptr)
        with self._lock:
            alloc = self.allocations.get(ptr)
            if alloc is None or alloc.device != device:
                raise ThawError(f"fake cuda: freeing {ptr:#x}, not an allocation on "
                                f"cuda{device}")
            for stream_id, stream in self.streams.items():
                if any(p == ptr for p, _, _ in stream.pending):
                    raise ThawError(f"fake cuda: freeing {ptr:#x} while stream {stream_id} "
                                    "still has work queued on it")
            del self.allocations[ptr]
            self._handles = {h: p for h, p in self._handles.items() if p != ptr}

    def ipc_handle(self, device: int, ptr: int) -> bytes:
        self._record("ipc_handle", device, ptr)
        alloc = self._allocation(ptr)
        if alloc.device != device or alloc.ptr != ptr:
            raise ThawError("fake cuda: IPC handle of something that is not an allocation")
        handle = b"fake-ipc" + ptr.to_bytes(8, "little") + os.urandom(8)
        handle = handle.ljust(CUDA_IPC_HANDLE_BYTES, b"\0")
        with self._lock:
            self._handles[handle] = ptr
        return handle

    def create_stream(self, device: int) -> int:
        with self._lock:
            stream = self._next_stream
            self._next_stream += 1
            self.streams[stream] = _FakeStream(device)
        self._record("create_stream", device, stream)
        return stream

    def destroy_stream(self, device: int, stream: int) -> None:
        self._record("destroy_stream", device, stream)
        with self._lock:
            found = self.streams.get(stream)
            if found is None or found.device != device:
                raise ThawError(f"fake cuda: no stream {stream} on cuda{device}")
            if found.pending:
                raise ThawError(f"fake cuda: destroying stream {stream} with work queued")
            del self.streams[stream]

    def memset_async(self, device: int, ptr: int, value: int, nbytes: int,
                     stream: int) -> None:
        self._record("memset", device, ptr, value, nbytes, stream)
        alloc, at = self._locate(device, ptr, nbytes)
        memory = self.memory[device]

        def work() -> None:
            memory[at:at + nbytes] = bytes([value]) * nbytes

        self._queue(device, stream, alloc.ptr, nbytes, work)

    def copy_to_device_async(self, device: int, dst: int, src: memoryview,
                             stream: int) -> None:
        self._record("copy", device, dst, src.nbytes, stream)
        alloc, at = self._locate(device, dst, src.nbytes)
        memory = self.memory[device]

        def work() -> None:
            # Read at synchronisation, as the DMA engine would: a caller that lets the
            # source go before synchronising copies whatever is there by then.
            memory[at:at + src.nbytes] = src.tobytes()

        self._queue(device, stream, alloc.ptr, src.nbytes, work)

    def synchronize(self, device: int, stream: int) -> None:
        self._record("synchronize", device, stream)
        with self._lock:
            found = self.streams.get(stream)
            if found is None or found.device != device:
                raise ThawError(f"fake cuda: no stream {stream} on cuda{device}")
            pending, found.pending = found.pending, []
        for _, _, work in pending:
            work()

    # -- internals --

    def _record(self, name: str, *args: Any) -> None:
        with self._lock:
            self.calls.append((name, *args))
            queue = self._failures.get(name)
            failure = queue.pop(0) if queue else None
        if failure is not None and failure is not _PASS:
            raise failure

    def _allocation(self, ptr: int) -> _FakeAllocation:
        with self._lock:
            for alloc in self.allocations.values():
                if alloc.ptr <= ptr < alloc.ptr + alloc.size:
                    return alloc
        raise ThawError(f"fake cuda: {ptr:#x} is not in any allocation")

    def _locate(self, device: int, ptr: int, nbytes: int) -> tuple[_FakeAllocation, int]:
        alloc = self._allocation(ptr)
        if alloc.device != device:
            raise ThawError(f"fake cuda: {ptr:#x} is on cuda{alloc.device}, not cuda{device}")
        offset = ptr - alloc.ptr
        if offset + nbytes > alloc.size:
            raise ThawError(f"fake cuda: {nbytes} bytes at {ptr:#x} overrun the allocation")
        return alloc, alloc.start + offset

    def _queue(self, device: int, stream: int, ptr: int, nbytes: int,
               work: Callable[[], None]) -> None:
        with self._lock:
            found = self.streams.get(stream)
            if found is None or found.device != device:
                raise ThawError(f"fake cuda: no stream {stream} on cuda{device}")
            found.pending.append((ptr, nbytes, work))

    def _first_fit(self, device: int, nbytes: int) -> int | None:
        taken = sorted((a.start, a.start + a.size) for a in self.allocations.values()
                       if a.device == device)
        cursor = 0
        for start, end in taken:
            if start - cursor >= nbytes:
                return cursor
            cursor = max(cursor, end)
        return cursor if len(self.memory[device]) - cursor >= nbytes else None


_PASS = Exception("not a failure")  # placeholder in InMemoryCudaApi's failure queues


# ---- slices ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaSlice(Slice):
    """A slice on a GPU. `path` is empty: there is no file; the instance opens
    `ipc_handle` instead (`thaw.platform.cuda_copy.open_slice(**descriptor())`)."""

    device_index: int
    """CUDA ordinal in the agent's process."""
    pci_bus_id: str
    """How the instance finds the same GPU whatever its CUDA_VISIBLE_DEVICES."""
    device_uuid: str
    """"GPU-…": for the docker runtime's DeviceRequest and MPS limits."""
    ipc_handle: str
    """The allocation's cudaIpcMemHandle_t, hex."""
    allocated: int
    """Bytes allocated (and zeroed): `size` rounded up to the allocation granularity."""
    compute_percent: int
    """The function's gpu_compute share (0 = none asked)."""
    mps: bool
    """Whether MPS is on, i.e. whether `compute_percent` is enforced."""

    def descriptor(self) -> dict[str, Any]:
        """What the instance needs to open the slice: keyword arguments of
        `thaw.platform.cuda_copy.open_slice`, JSON-ready."""
        return {"ipc_handle": self.ipc_handle, "size": self.size,
                "device_index": self.device_index, "pci_bus_id": self.pci_bus_id}

    def instance_env(self) -> dict[str, str]:
        """Environment the instance must start with for its compute share to apply."""
        if self.mps and self.compute_percent:
            return {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(self.compute_percent)}
        return {}


class SliceState(str, Enum):
    ALLOCATING = "allocating"
    """Booked; device memory being allocated and zeroed. Not yet visible to callers."""
    READY = "ready"
    """Handed out: the instance may map it, restores may fill it."""
    ZEROING = "zeroing"
    """Being scrubbed, then freed."""
    QUARANTINED = "quarantined"
    """Scrubbing or freeing failed: the memory stays booked and is never handed out."""
    FREED = "freed"


_MOVES: dict[SliceState, set[SliceState]] = {
    SliceState.ALLOCATING: {SliceState.READY, SliceState.FREED},
    SliceState.READY: {SliceState.ZEROING},
    SliceState.ZEROING: {SliceState.FREED, SliceState.QUARANTINED},
    # `close` tries once more to scrub what a failed release left behind.
    SliceState.QUARANTINED: {SliceState.ZEROING},
    SliceState.FREED: set(),
}


@dataclass(eq=False)
class _Record:
    id: str
    device: _Device
    size: int
    allocated: int
    booked: int
    compute_percent: int
    state: SliceState = SliceState.ALLOCATING
    ptr: int = 0
    stream: int = 0
    slice: CudaSlice | None = None
    busy: threading.Lock = field(default_factory=threading.Lock)
    """Held by a copy into the slice, and by its scrub: one waits for the other."""

    def move(self, target: SliceState) -> None:
        if target not in _MOVES[self.state]:
            raise IllegalSliceTransition(
                f"slice {self.id} cannot move from {self.state.value} to {target.value}")
        self.state = target


@dataclass(eq=False)
class _Device:
    info: CudaDeviceInfo
    id: str
    capacity: int
    records: dict[str, _Record] = field(default_factory=dict)

    @property
    def booked(self) -> int:
        return sum(r.booked for r in self.records.values())

    @property
    def free(self) -> int:
        return self.capacity - self.booked


@dataclass(frozen=True, slots=True)
class CopyOp:
    """Part of one source piece, copied on one stream: `length` bytes from
    `pieces[piece][start:]` to slice offset `pieces[piece].offset + start`."""

    piece: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class CopyStats:
    """How one copy into a slice went. gbps is gigabytes (1e9 bytes) per second."""

    bytes: int
    """Bytes copied to the device."""
    streams: int
    """Streams the bytes were split across."""
    seconds: float
    """Wall-clock time from the first enqueue to the last stream's completion."""
    gbps: float
    """bytes / seconds / 1e9."""


def plan_stream_copies(pieces: Sequence[tuple[int, int]], streams: int,
                       alignment: int = COPY_SPLIT_ALIGNMENT) -> list[list[CopyOp]]:
    """Split `pieces` ((slice offset, length) each) into one run of copies per stream:
    taken in slice order, the bytes are cut at the multiples of `alignment` nearest
    below each k/streams of the total, so stream k copies the k-th share and no share
    is `alignment` bytes or more off the mean. Every byte is in exactly one op; empty
    streams are left out."""
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        raise InvalidArgument(f"streams must be an integer >= 1, got {streams!r}",
                              field="streams")
    order = sorted(range(len(pieces)), key=lambda i: pieces[i][0])
    total = sum(pieces[i][1] for i in order)
    cuts = sorted({0, total} | {k * total // streams // alignment * alignment
                                for k in range(1, streams)})
    ends = cuts[1:]  # distinct and sorted: every share is non-empty
    plan: list[list[CopyOp]] = [[] for _ in ends]
    share = 0  # index into `ends` of the share being filled
    position = 0  # bytes planned so far
    for index in order:
        length = pieces[index][1]
        done = 0
        while done < length:
            if position == ends[share]:
                share += 1
            take = min(ends[share] - position, length - done)
            plan[share].append(CopyOp(index, done, take))
            done += take
            position += take
    return plan


# ---- the backend -------------------------------------------------------------------------


class CudaDevices:
    """The cuda DeviceBackend: slices are device allocations of their own on real GPUs.

    Thread-safe. A slice's IPC handle must not be released while an instance still has
    it open: freeing memory another process maps is undefined behaviour in CUDA, so the
    agent stops the instance first (as it does today before `release`).
    """

    kind = "cuda"

    def __init__(self, api: CudaApi | None = None, *,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                 instance_overhead_bytes: int = DEFAULT_INSTANCE_OVERHEAD_BYTES,
                 granularity: int = ALLOCATION_GRANULARITY,
                 mps: bool | None = None) -> None:
        """`api` defaults to CuPy (CudaUnavailable without it or a GPU); `mps` None asks
        the api whether an MPS daemon runs."""
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
        self._devices = [_Device(info, f"cuda{info.index}", max(0, info.total_bytes
                                                                 - reserve_bytes))
                         for info in infos]
        if all(d.capacity == 0 for d in self._devices):
            largest = max(info.total_bytes for info in infos)
            raise InvalidArgument(f"a reserve of {reserve_bytes} bytes leaves no memory on "
                                  f"any GPU (largest: {largest} bytes)", field="reserve_bytes")
        self._overhead = instance_overhead_bytes
        self._granularity = granularity
        self._mps = self._api.mps_active() if mps is None else mps
        self._lock = threading.Lock()

    @property
    def mps(self) -> bool:
        return self._mps

    # -- DeviceBackend --

    def allocate(self, size: int, owner: str, *, compute_percent: int = 0) -> CudaSlice:
        """A zeroed slice of `size` bytes on the device with the least memory left that
        still fits it (best fit), trying the next one if the driver refuses; OutOfMemory
        naming the sizes when none can take it."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgument(f"slice size must be an integer >= 1, got {size!r}",
                                  field="size")
        if (isinstance(compute_percent, bool) or not isinstance(compute_percent, int)
                or not 0 <= compute_percent <= 100):
            raise InvalidArgument(f"compute_percent must be 0-100, got {compute_percent!r}",
                                  field="gpu_compute")
        allocated = -(-size // self._granularity) * self._granularity
        booked = allocated + self._overhead
        refused: list[str] = []
        tried: set[str] = set()
        while True:
            with self._lock:
                record = self._book(size, allocated, booked, owner, compute_percent, tried)
                if record is None:
                    raise OutOfMemory(self._no_room_message(size, booked, refused))
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
        self._retire(record)

    def usage(self) -> list[DeviceUsage]:
        with self._lock:
            return [DeviceUsage(d.id, self.kind, d.capacity, d.booked) for d in self._devices]

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
        _check_pieces(views, record.size)
        plan = plan_stream_copies([(offset, view.nbytes) for offset, view in views], streams)
        total = sum(view.nbytes for _, view in views)
        with record.busy:
            with self._lock:
                if record.state is not SliceState.READY:
                    raise NotFound(f"no slice {slice_id} (it was released)")
            started = time.perf_counter()
            if plan:
                self._run_copies(record, views, plan)
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
            runs: list[list[Any]] = []  # [slice offset, region, region start, length]
            for ref in refs:
                span = held[ref.digest]
                last = runs[-1] if runs else None
                if (last is not None and last[1] is span.region
                        and last[2] + last[3] == span.start and last[0] + last[3] == ref.offset):
                    last[3] += ref.length
                else:
                    runs.append([ref.offset, span.region, span.start, ref.length])
            pieces = [(at, region[start:start + length]) for at, region, start, length in runs]
            return self.copy_into_slice(sl, pieces, streams=streams)

    # -- internals --

    def _book(self, size: int, allocated: int, booked: int, owner: str,
              compute_percent: int, tried: set[str]) -> _Record | None:
        fitting = [d for d in self._devices if d.id not in tried and d.free >= booked]
        if not fitting:
            return None
        device = min(fitting, key=lambda d: (d.free - booked, d.info.index))
        record = _Record(id=f"{owner}-{uuid.uuid4().hex[:8]}", device=device, size=size,
                         allocated=allocated, booked=booked, compute_percent=compute_percent)
        device.records[record.id] = record
        return record

    def _unbook(self, record: _Record) -> None:
        with self._lock:
            record.move(SliceState.FREED)
            record.device.records.pop(record.id, None)

    def _no_room_message(self, size: int, booked: int, refused: list[str]) -> str:
        free = ", ".join(f"{d.id} {d.free}" for d in self._devices)
        message = (f"no GPU has room for a {size}-byte slice ({booked} bytes with "
                   f"allocation rounding and the instance's context); free bytes: {free}")
        return message + ("; " + "; ".join(refused) if refused else "")

    def _materialize(self, record: _Record) -> None:
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
            compute_percent=record.compute_percent, mps=self._mps)

    def _retire(self, record: _Record) -> None:
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

    def _find(self, slice_id: str) -> _Record:
        for device in self._devices:
            record = device.records.get(slice_id)
            if record is not None and record.state is SliceState.READY:
                return record
        raise NotFound(f"no slice {slice_id}")

    def _run_copies(self, record: _Record, views: list[tuple[int, memoryview]],
                    plan: list[list[CopyOp]]) -> None:
        api, device = self._api, record.device.info.index
        created: list[int] = []
        error: BaseException | None = None
        try:
            for ops in plan:
                stream = api.create_stream(device)
                created.append(stream)
                for op in ops:
                    at, view = views[op.piece]
                    api.copy_to_device_async(device, record.ptr + at + op.start,
                                             view[op.start:op.start + op.length], stream)
        except BaseException as exc:
            error = exc
        # Wait for every stream even after a failure: the caller may free the sources
        # (unpin the chunks) as soon as this returns.
        for stream in created:
            try:
                api.synchronize(device, stream)
            except ThawError as exc:
                error = error or exc
        for stream in created:
            try:
                api.destroy_stream(device, stream)
            except ThawError as exc:
                log.warning("could not destroy a copy stream", device=record.device.id,
                            error=exc.message)
        if error is not None:
            raise error


def _check_pieces(views: list[tuple[int, memoryview]], size: int) -> None:
    """Pieces must land inside the slice and not on each other: two streams writing one
    byte would race."""
    for offset, _ in views:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgument(f"piece offset must be an integer >= 0, got {offset!r}",
                                  field="pieces")
    end = 0
    for offset, view in sorted(views, key=lambda piece: piece[0]):
        if offset + view.nbytes > size:
            raise InvalidArgument(f"{view.nbytes} bytes at offset {offset} overrun a "
                                  f"{size}-byte slice", field="pieces")
        if view.nbytes and offset < end:
            raise InvalidArgument(f"pieces overlap at slice offset {offset}", field="pieces")
        end = max(end, offset + view.nbytes)

"""`InMemoryCudaApi`: a CudaApi whose devices are bytearrays, for unit tests and laptops
(no CuPy, no GPU)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from thaw.core.errors import OutOfMemory, ThawError
from thaw.platform.cuda.api import (
    CUDA_IPC_HANDLE_BYTES,
    NVML_TOPOLOGY_INTERNAL,
    NVML_TOPOLOGY_NODE,
    NVML_TOPOLOGY_SINGLE,
    NVML_TOPOLOGY_SYSTEM,
    CudaDeviceInfo,
    DeviceTopology,
)


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
                 names: Sequence[str] | None = None,
                 switches: Sequence[int] | None = None,
                 numa_nodes: Sequence[int] | None = None,
                 h2d_gbps: float = 25.0) -> None:
        """`switches` and `numa_nodes` (one entry per GPU) describe a fake NVML
        topology: GPUs with the same switch number share a PCIe switch, else they meet
        at their NUMA node or across the system. Without `switches` NVML is "missing"
        (`topology` is empty). `h2d_gbps` is what measuring a copy reports."""
        for name, given in (("switches", switches), ("numa_nodes", numa_nodes)):
            if given is not None and len(given) != len(totals):
                raise ValueError(f"{name} needs one entry per GPU")
        self.infos = [
            CudaDeviceInfo(index=i, name=(names[i] if names else "Fake GPU"),
                           pci_bus_id=f"0000:{i + 1:02x}:00.0",
                           uuid=f"GPU-00000000-0000-0000-0000-{i:012x}", total_bytes=total)
            for i, total in enumerate(totals)]
        self.memory = [bytearray(total) for total in totals]
        self.mps = mps
        self.switches = list(switches) if switches is not None else None
        self.numa_nodes = list(numa_nodes) if numa_nodes is not None else [-1] * len(totals)
        self.bandwidth_gbps = h2d_gbps
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

    def topology(self) -> list[DeviceTopology]:
        self._record("topology")
        switches = self.switches
        if switches is None:
            return []

        def level(a: int, b: int) -> int:
            if a == b:
                return NVML_TOPOLOGY_INTERNAL
            if switches[a] == switches[b]:
                return NVML_TOPOLOGY_SINGLE
            if self.numa_nodes[a] == self.numa_nodes[b] != -1:
                return NVML_TOPOLOGY_NODE
            return NVML_TOPOLOGY_SYSTEM

        count = len(self.infos)
        return [DeviceTopology(self.numa_nodes[a], tuple(level(a, b) for b in range(count)))
                for a in range(count)]

    def h2d_gbps(self, device: int, nbytes: int) -> float:
        self._record("h2d_gbps", device, nbytes)
        if not 0 <= device < len(self.infos):
            raise ThawError(f"fake cuda: no device {device}")
        return self.bandwidth_gbps

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

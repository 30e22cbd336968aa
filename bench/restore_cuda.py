"""`thaw bench restore --device cuda`: how close a restore into a GPU slice gets to the
PCIe link, measured against the link's ceiling in the same run.

Both sides copy the same incompressible state from page-locked host memory to the same
GPU, rounds interleaved so both see the same machine:
- restore: the platform's path exactly as the agent runs it: the state stored as chunks
  on a disk tier, prewarmed into a pinned tier whose memory comes from the allocator the
  agent uses on cuda (`open_devices`), then `CudaDevices.restore_into_slice` into a slice
  of the cuda backend (several streams), timed around the whole call;
- ceiling: one plain host-to-device copy of the whole state from a page-locked buffer
  (cudaHostAlloc) into a device allocation of the same size, on one stream, waited for:
  what cudaMemcpy from pinned memory achieves.
The restored slice is then read back from another process (as an instance opens it) and
compared with the state, so a fast but wrong copy fails the benchmark.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from thaw.blobstore import CHUNK_SIZE, DiskTier, HostMemoryAllocator, PinnedTier, store_arena
from thaw.blobstore.copying import copy_bytes
from thaw.core.errors import InvalidArgument, ThawError
from thaw.platform.cuda import CudaApi, CudaDevices, CudaSlice, CudaUnavailable
from thaw.platform.cuda.transfer import DEFAULT_COPY_STREAMS

from .restore import incompressible_state
from .slice_probe import ProbeRequest, SliceProbe, SubprocessSliceProbe

# The words a run without a GPU starts its error with (`thaw doctor gpu` says the same).
NO_CUDA_DEVICE = "no CUDA device"

class PinnedBuffers(Protocol):
    """Plain page-locked host buffers: the ceiling copy's source."""

    def allocate(self, nbytes: int) -> memoryview: ...

    def free(self, buffer: memoryview) -> None: ...


# Interleaved rounds of restore-vs-ceiling, best of each. A 2 GiB copy at PCIe 5 speed
# is ~40 ms, so rounds are cheap; five ride out a first-touch or a busy neighbour.
CUDA_ROUNDS = 5


@dataclass(frozen=True)
class CudaBenchParts:
    """What the GPU restore benchmark runs on, injected so that tests run it on the
    in-memory CUDA fake."""

    devices: CudaDevices
    """The platform's cuda device backend: the restore's destination slices."""
    api: CudaApi
    """CUDA calls for the ceiling copy (the same devices as `devices`)."""
    tier_memory: HostMemoryAllocator | None
    """Where the pinned tier's regions come from: the agent's allocator on cuda (None:
    the tier's default)."""
    baseline_memory: PinnedBuffers
    """The ceiling's page-locked source buffer."""
    probe: SliceProbe
    """Reads a slice from another process."""
    gpu_name: str = ""


def run_cuda_restore_bench(size_bytes: int, parts: CudaBenchParts, *,
                           chunk_size: int = CHUNK_SIZE, rounds: int = CUDA_ROUNDS,
                           streams: int = DEFAULT_COPY_STREAMS, workers: int | None = None
                           ) -> dict[str, float | int | str]:
    """Restore `size_bytes` into a GPU slice vs the pinned host-to-device ceiling; the
    `thaw bench restore --device cuda --json` object. Rates are GB/s (1e9 bytes/s)."""
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 1:
        raise InvalidArgument(f"size must be a positive number of bytes, got {size_bytes!r}",
                              field="size")
    if rounds < 1:
        raise InvalidArgument(f"rounds must be >= 1, got {rounds!r}", field="rounds")
    state = incompressible_state(size_bytes)
    expected = hashlib.sha256(state.data).hexdigest()
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="thaw-bench-")))
        disk = DiskTier(scratch / "chunks")
        refs = store_arena(disk, state.data, chunk_size, workers)
        pinned = PinnedTier(size_bytes, allocator=parts.tier_memory)
        # Evicting gives the regions back through the allocator (unregistered first on
        # cuda), rather than leaving page-locked mappings to the garbage collector.
        stack.callback(lambda: pinned.evict(pinned.digests()))
        pinned.prewarm(refs, disk, workers=workers)
        pinned_memory = pinned.allocator.name
        sl = parts.devices.allocate(size_bytes, "bench")
        stack.callback(parts.devices.release, sl.id)
        if not isinstance(sl, CudaSlice):
            raise ThawError("the cuda backend handed out a slice that is not on a GPU")
        ceiling = stack.enter_context(_Ceiling(parts, sl.device_index, state))

        restore_best = ceiling_best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            stats = parts.devices.restore_into_slice(sl, refs, pinned, streams=streams)
            restore_best = min(restore_best, time.perf_counter() - started)
            if stats.bytes != size_bytes:
                raise ThawError(f"the restore copied {stats.bytes} of {size_bytes} bytes")
            ceiling_best = min(ceiling_best, ceiling.copy())
        report = parts.probe(sl.descriptor(), ProbeRequest(digest_bytes=size_bytes))
        if report.sha256 != expected:
            raise ThawError("the slice read back from another process differs from the "
                            "state that was restored into it")
    restore_gbps = size_bytes / restore_best / 1e9
    h2d_gbps = size_bytes / ceiling_best / 1e9
    return {
        "device": "cuda",
        "gpu": parts.gpu_name,
        "bytes": size_bytes,
        "restore_gbps": round(restore_gbps, 3),
        "h2d_gbps": round(h2d_gbps, 3),
        "ratio": round(restore_gbps / h2d_gbps, 3),
        "streams": streams,
        "chunk_size": chunk_size,
        "rounds": rounds,
        "pinned_memory": pinned_memory,
    }


class _Ceiling:
    """A device allocation and a page-locked copy of the state, for timing plain copies
    of one into the other."""

    def __init__(self, parts: CudaBenchParts, device: int, state: np.ndarray) -> None:
        self._parts, self._device = parts, device
        self._source = state.data
        self._buffer: memoryview | None = None
        self._ptr = 0
        self._stream = 0

    def __enter__(self) -> _Ceiling:
        api, size = self._parts.api, self._source.nbytes
        self._buffer = self._parts.baseline_memory.allocate(size)
        try:
            copy_bytes(self._buffer[:size], self._source)
            self._ptr = api.malloc(self._device, size)
            self._stream = api.create_stream(self._device)
        except BaseException:
            self.__exit__()
            raise
        return self

    def copy(self) -> float:
        """Seconds for one copy of the whole buffer to the device, waited for."""
        assert self._buffer is not None
        api = self._parts.api
        started = time.perf_counter()
        api.copy_to_device_async(self._device, self._ptr, self._buffer[:self._source.nbytes],
                                 self._stream)
        api.synchronize(self._device, self._stream)
        return time.perf_counter() - started

    def __exit__(self, *exc: object) -> None:
        api = self._parts.api
        if self._stream:
            api.destroy_stream(self._device, self._stream)
            self._stream = 0
        if self._ptr:
            api.free(self._device, self._ptr)
            self._ptr = 0
        if self._buffer is not None:
            self._parts.baseline_memory.free(self._buffer)
            self._buffer = None


def run_cuda_restore_bench_here(size_bytes: int, workers: int | None = None
                                ) -> dict[str, float | int | str]:
    """`run_cuda_restore_bench` on this machine's GPUs (`open_cuda_parts`)."""
    with (tempfile.TemporaryDirectory(prefix="thaw-bench-") as tmp,
          open_cuda_parts(Path(tmp)) as parts):
        return run_cuda_restore_bench(size_bytes, parts, workers=workers)


@contextlib.contextmanager
def open_cuda_parts(slice_dir: Path) -> Iterator[CudaBenchParts]:
    """The parts on this machine's GPUs: the agent's cuda backend and pinned allocator
    (`open_devices` with device=cuda and the agent's other settings from the
    environment and config file), CuPy for the ceiling, a child process for reading
    back. CudaUnavailable ("no CUDA device: ...") when CuPy, the driver or a GPU is
    missing."""
    from thaw.core.config import AgentConfig
    from thaw.platform.cuda import CupyCudaApi
    from thaw.platform.device_setup import open_devices

    try:
        api = CupyCudaApi()
    except CudaUnavailable as exc:
        raise CudaUnavailable(f"{NO_CUDA_DEVICE}: {exc.message}") from exc
    backend, allocator = open_devices(AgentConfig.load(device="cuda"), slice_dir)
    if not isinstance(backend, CudaDevices) or allocator is None:
        backend.close()
        raise CudaUnavailable("the agent's device settings did not open the cuda backend")
    gpus = sorted({info.name for info in api.devices()})
    try:
        yield CudaBenchParts(devices=backend, api=api, tier_memory=allocator,
                             baseline_memory=CudaHostAllocBuffers(),
                             probe=SubprocessSliceProbe(), gpu_name=", ".join(gpus))
    finally:
        backend.close()


class CudaHostAllocBuffers:  # pragma: no cover - needs CuPy and a GPU
    """Page-locked host memory straight from cudaHostAlloc (no pool, no rounding)."""

    def __init__(self) -> None:
        import cupy  # type: ignore[import-not-found, unused-ignore]

        self._runtime = cupy.cuda.runtime
        self._pointers: dict[int, int] = {}

    def allocate(self, nbytes: int) -> memoryview:
        try:
            ptr = int(self._runtime.hostAlloc(nbytes, 0))
        except Exception as exc:  # CUDARuntimeError
            raise ThawError(f"cudaHostAlloc of {nbytes} bytes failed: {exc}") from exc
        view = memoryview((ctypes.c_ubyte * nbytes).from_address(ptr)).cast("B")
        self._pointers[id(view)] = ptr
        return view

    def free(self, buffer: memoryview) -> None:
        ptr = self._pointers.pop(id(buffer), 0)
        buffer.release()
        if ptr:
            self._runtime.freeHost(ptr)

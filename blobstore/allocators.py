"""Where the pinned tier's bytes live: an allocator injected into `PinnedTier`.

The tier asks for one region per prewarm (a snapshot's missing chunks, laid out in arena
order, so a restore copies long runs in single calls) and gives pages back chunk by chunk
as it evicts. The host device uses ordinary anonymous memory; with CUDA the region must
be page-locked so host-to-device copies run at PCIe speed (DESIGN.md section 5), which
`CudaPinnedAllocator` provides behind the same three methods.
"""

from __future__ import annotations

import errno
import mmap
from typing import Protocol

import numpy as np

from thaw.core.errors import OutOfMemory, ThawError

PAGE_SIZE = mmap.PAGESIZE


class HostMemoryAllocator(Protocol):
    """Hands out writable, page-aligned byte regions and takes their pages back."""

    name: str
    """Shown in logs and telemetry: "host", "cuda-pinned"."""

    def allocate(self, nbytes: int) -> memoryview:
        """A writable 1-D unsigned-byte region of `nbytes` (> 0), page-aligned, contents
        undefined. OutOfMemory if the system cannot provide it."""
        ...

    def discard(self, region: memoryview, start: int, length: int) -> None:
        """Return the pages of `region[start:start + length]` (page-aligned `start`) while
        the rest of the region stays in use; their contents become undefined."""
        ...

    def free(self, region: memoryview) -> None:
        """Give back a whole region. Views a reader still holds keep it mapped until they
        are dropped."""
        ...


# madvise(MADV_POPULATE_WRITE), Linux >= 5.14 (Python 3.11's mmap module does not name it):
# fault in every page of a range for writing in one call.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class AnonymousMemoryAllocator:
    """Private anonymous mappings (pageable host memory): the default off CUDA.

    Regions are populated when allocated: the tier's memory must be resident anyway, one
    populate call beats taking the faults page by page during the copy (measured on a
    2-core KVM guest: 4.4 GB/s populated vs 2.7 GB/s by faults, and under 1 GB/s either
    way the first time the host backs the pages), and a system out of memory shows up as
    OutOfMemory here instead of as a kill later.
    """

    name = "host"

    def allocate(self, nbytes: int) -> memoryview:
        try:
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as exc:
            raise OutOfMemory(f"allocating {nbytes} bytes of host memory: {exc}") from exc
        try:
            region.madvise(MADV_POPULATE_WRITE)
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                region.close()
                raise OutOfMemory(f"populating {nbytes} bytes of host memory: {exc}") from exc
            # EINVAL: a kernel without populate; pages then fault in on first write.
        return memoryview(region)

    def discard(self, region: memoryview, start: int, length: int) -> None:
        mapping = region.obj
        if isinstance(mapping, mmap.mmap) and length > 0:
            # Private anonymous pages: DONTNEED frees them at once (reads give zeros).
            mapping.madvise(mmap.MADV_DONTNEED, start, length)

    def free(self, region: memoryview) -> None:
        # The mapping is unmapped when its last view goes; closing it here would fail
        # (BufferError) while a restore still holds a view.
        del region


class CudaPinnedAllocator:  # pragma: no cover - needs CUDA and CuPy
    """Page-locked host memory from CuPy's pinned pool, for the cuda device backend.

    Page-locked memory cannot be returned page by page: `discard` is a no-op and an
    evicted chunk's memory comes back when the rest of its region is evicted too.
    """

    name = "cuda-pinned"

    def __init__(self) -> None:
        try:
            import cupyx
        except ImportError as exc:
            raise ThawError("the cuda pinned tier needs CuPy (pip install cupy-cuda12x)") from exc
        self._cupyx = cupyx

    def allocate(self, nbytes: int) -> memoryview:
        try:
            array = self._cupyx.empty_pinned((nbytes,), dtype=np.uint8)
        except Exception as exc:  # CuPy raises its own CUDARuntimeError / OutOfMemoryError
            raise OutOfMemory(f"allocating {nbytes} bytes of pinned host memory: {exc}") from exc
        return array.data  # type: ignore[no-any-return]

    def discard(self, region: memoryview, start: int, length: int) -> None:
        del region, start, length

    def free(self, region: memoryview) -> None:
        # The array behind the view owns the PinnedMemoryPointer; CuPy's pinned pool takes
        # the block back when the last view of it is dropped.
        del region

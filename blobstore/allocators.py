"""Where the pinned tier's bytes live: an allocator injected into `PinnedTier`.

The tier asks for one region per prewarm (a snapshot's missing chunks, laid out in arena
order, so a restore copies long runs in single calls), fills it, then seals it. The
default, `MemfdAllocator`, holds each region in its own memfd ("thaw-pinned-..."), of
exactly the bytes asked for rounded up to a page: filled through a writable shared
mapping, then sealed against writes (F_SEAL_WRITE, with SHRINK and GROW) and mapped
read-only, so nothing can alter a verified chunk, and its descriptor can be handed to an
instance. A `PageLocker` then locks the sealed mapping: `mlock` on the host backend,
`cudaHostRegister` on CUDA (`CudaPinnedAllocator`), so host-to-device copies run at PCIe
speed (DESIGN.md section 5).

Eviction and sealing: a sealed memfd's pages cannot be given back one range at a time
(FALLOC_FL_PUNCH_HOLE and MADV_REMOVE are writes, refused with EPERM under F_SEAL_WRITE;
pages under cudaHostRegister stay pinned until the whole range is unregistered anyway).
So a sealed region returns its memory as a whole, when its last chunk is evicted: the
tier keeps an evicted chunk's bytes accounted until then (`discard` says whether pages
really went). Before sealing (a chunk another prewarm published first) pages are given
back at once. `AnonymousMemoryAllocator` (private anonymous memory, no descriptor, no
seal) gives pages back chunk by chunk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import mmap
import os
from typing import Any, Protocol

from thaw.core.errors import OutOfMemory, ThawError
from thaw.core.memfd import (
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    add_seals,
    mapping_address,
    populate,
)

from .pagelock import CudaHostRegistrar, LockRefused, MlockLocker, PageLocker

PAGE_SIZE = mmap.PAGESIZE

MEMFD_PREFIX = "thaw-pinned-"
"""Name prefix of the tier's memfds: /proc/<pid>/fd and /proc/<pid>/maps show
"/memfd:thaw-pinned-<pid>-<n>"."""

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
"""Seals of a filled region: no write, no resize, and no seal added or removed later by
whoever holds a descriptor."""



# Numbers the memfds of this process, so each region's name is its own.
_region_numbers = itertools.count()


def page_round(nbytes: int) -> int:
    """`nbytes` rounded up to whole pages."""
    return -(-nbytes // PAGE_SIZE) * PAGE_SIZE


class HostRegion:
    """One region of the pinned tier: writable through `buffer` while it is filled,
    read-only through `view` once sealed. `fd` is its memfd (-1: anonymous memory)."""

    def __init__(self, mapping: mmap.mmap, size: int, fd: int = -1) -> None:
        self.size = size
        """Bytes of memory the region takes (its mapping's length)."""
        self.fd = fd
        self.mapping = mapping
        self.buffer: memoryview | None = memoryview(mapping)
        self.view: memoryview = self.buffer.toreadonly()
        self.sealed = False
        self.returns_whole = False
        """Its pages go back only all at once (`free`), never a range at a time."""
        self.locked = False
        """Its pages are locked (mlock / cudaHostRegister)."""
        self.lock_refusal = ""
        """Why they are not, when a locker refused."""
        self.locked_at = 0

    def writable(self) -> memoryview:
        """The fill buffer; ThawError once the region is sealed."""
        if self.buffer is None:
            raise ThawError("the pinned region is sealed: it cannot be written")
        return self.buffer


class HostMemoryAllocator(Protocol):
    """Hands out page-aligned regions, seals them once filled and takes them back."""

    name: str
    """Shown in logs and telemetry: "host", "cuda-pinned"."""

    def allocate(self, nbytes: int) -> HostRegion:
        """A writable region of at least `nbytes` (> 0) bytes, at most one page more,
        contents undefined. OutOfMemory if the system cannot provide it."""
        ...

    def seal(self, region: HostRegion) -> None:
        """The region is filled and verified: from now on it is read-only (and locked
        where the allocator locks). No view of `buffer` may still be held."""
        ...

    def discard(self, region: HostRegion, start: int, length: int) -> bool:
        """Give back the pages of `[start, start + length)` (page-aligned) while the rest
        stays in use; True if they went (their contents become undefined), False where
        the region can only be given back whole (sealed)."""
        ...

    def free(self, region: HostRegion) -> None:
        """Give back a whole region (unlocked first). Views a reader still holds keep
        its mapping until they are dropped."""
        ...

    def refusal_for(self, capacity: int) -> str:
        """Why a tier of `capacity` bytes would not be page-locked ("" if it would)."""
        ...


def _populate(mapping: mmap.mmap, advice: int, nbytes: int) -> None:
    """Fault in the whole mapping in one call. The tier's memory must be resident anyway:
    one call beats taking the faults page by page during a copy (measured on a 2-core
    KVM guest: 4.4 GB/s populated vs 2.7 GB/s by faults), and a system out of memory
    shows up as OutOfMemory here instead of as a kill later."""
    try:
        populate(mapping, advice)
    except OSError as exc:
        if exc.errno in (errno.ENOMEM, errno.EFAULT):
            raise OutOfMemory(f"populating {nbytes} bytes of host memory: {exc}") from exc
        # EINVAL: a kernel without populate; pages then fault in on first touch.


def _unmap(region: HostRegion) -> None:
    """Drop the tier's views and close the mapping; BufferError if a view of it is still
    exported somewhere."""
    for view in (region.view, region.buffer):
        if view is not None:
            view.release()
    region.buffer = None
    region.mapping.close()


class AnonymousMemoryAllocator:
    """Private anonymous mappings (pageable, no descriptor, never sealed): pages are
    given back chunk by chunk. The tier's default is `MemfdAllocator`."""

    name = "anonymous"

    def allocate(self, nbytes: int) -> HostRegion:
        size = page_round(nbytes)
        try:
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as exc:
            raise OutOfMemory(f"allocating {nbytes} bytes of host memory: {exc}") from exc
        try:
            _populate(mapping, MADV_POPULATE_WRITE, nbytes)
        except OutOfMemory:
            mapping.close()
            raise
        return HostRegion(mapping, size)

    def seal(self, region: HostRegion) -> None:
        # The tier stops writing; the mapping itself stays writable.
        region.buffer = None
        region.sealed = True

    def discard(self, region: HostRegion, start: int, length: int) -> bool:
        if length > 0:
            # Private anonymous pages: DONTNEED frees them at once (reads give zeros).
            region.mapping.madvise(mmap.MADV_DONTNEED, start, length)
        return True

    def free(self, region: HostRegion) -> None:
        # The mapping is unmapped when its last view goes; closing it here would fail
        # (BufferError) while a reader still holds a view.
        del region

    def refusal_for(self, capacity: int) -> str:
        del capacity
        return "pageable anonymous memory (no page locking)"


class MemfdAllocator:
    """Regions in sealed memfds of exact size (whole pages), locked by `locker`."""

    name = "host"

    def __init__(self, locker: PageLocker | None = None) -> None:
        """`locker`: what locks sealed regions (None: they stay pageable)."""
        self._locker = locker

    @property
    def locker(self) -> PageLocker | None:
        return self._locker

    def allocate(self, nbytes: int) -> HostRegion:
        size = page_round(nbytes)
        name = f"{MEMFD_PREFIX}{os.getpid()}-{next(_region_numbers)}"
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise OutOfMemory(f"creating a memfd for {nbytes} bytes: {exc}") from exc
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise OutOfMemory(f"mapping {nbytes} bytes of host memory: {exc}") from exc
        try:
            _populate(mapping, MADV_POPULATE_WRITE, nbytes)
        except OutOfMemory:
            mapping.close()
            os.close(fd)
            raise
        return HostRegion(mapping, size, fd)

    def seal(self, region: HostRegion) -> None:
        """Unmap the writable mapping, seal, map read-only, then lock. The order is the
        kernel's: F_SEAL_WRITE is refused (EBUSY) while any shared mapping that could
        become writable exists, and while pages are pinned (cudaHostRegister), so
        locking comes last, on the read-only mapping."""
        if region.sealed:
            return
        try:
            _unmap(region)
        except BufferError as exc:
            raise ThawError("a view of a pinned region outlived its fill: it cannot be "
                            "sealed") from exc
        try:
            add_seals(region.fd, SEALS)
            mapping = mmap.mmap(region.fd, region.size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ)
        except OSError as exc:
            raise ThawError(f"sealing a pinned region: {exc}") from exc
        region.mapping = mapping
        region.view = memoryview(mapping)
        region.sealed = region.returns_whole = True
        if self._locker is None:
            _populate(mapping, MADV_POPULATE_READ, region.size)
            return
        address = mapping_address(mapping)
        try:
            self._locker.lock(address, region.size)  # populates the pages too
        except LockRefused as refusal:
            region.lock_refusal = str(refusal)
            _populate(mapping, MADV_POPULATE_READ, region.size)
            return
        region.locked = True
        region.locked_at = address

    def discard(self, region: HostRegion, start: int, length: int) -> bool:
        if region.sealed:
            return False
        if length > 0:
            # Shared memfd pages: REMOVE punches a hole, freeing them from the file.
            region.mapping.madvise(mmap.MADV_REMOVE, start, length)
        return True

    def free(self, region: HostRegion) -> None:
        try:
            if region.locked and self._locker is not None:
                region.locked = False
                self._locker.unlock(region.locked_at, region.size)
        finally:
            # Gone even when unlocking failed. A reader that still holds a view keeps
            # the mapping until it drops it.
            with contextlib.suppress(BufferError):
                _unmap(region)
            if region.fd >= 0:
                os.close(region.fd)
                region.fd = -1

    def refusal_for(self, capacity: int) -> str:
        if self._locker is None:
            return "no page locking configured"
        return self._locker.refusal_for(capacity)


class CudaPinnedAllocator(MemfdAllocator):
    """Sealed memfd regions page-locked with `cudaHostRegister` over their exact size,
    for the cuda device backend."""

    name = "cuda-pinned"

    def __init__(self, runtime: Any = None) -> None:
        """`runtime`: CuPy's `cupy.cuda.runtime` by default (a fake in tests)."""
        super().__init__(CudaHostRegistrar(runtime))


def host_allocator() -> MemfdAllocator:
    """The host backend's pinned tier memory: sealed memfds, mlock'ed where
    RLIMIT_MEMLOCK allows."""
    return MemfdAllocator(MlockLocker())

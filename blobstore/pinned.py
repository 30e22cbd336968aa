"""The pinned tier: verified raw chunks in host memory, with a byte budget and LRU eviction.

A restore from here is copies only. Chunks are keyed by digest, so identical weights in
many functions take memory once. A prewarm lays the chunks it loads out in one region in
arena order, so a restore copies long runs with single calls: on the measured machine
glibc switches to streaming stores only for copies over ~99 MiB, and those run ~1.7x
faster than per-4-MiB-chunk copies (see bench/restore.py). Chunks a restore is copying
from are pinned (a refcount) and never evicted until it is done. Memory comes from an
injected allocator: by default sealed memfds, mlock'ed where RLIMIT_MEMLOCK allows;
for CUDA the same memfds page-locked with cudaHostRegister (blobstore/allocators.py).
A sealed region gives its memory back whole, with its last chunk: until then an
evicted chunk's bytes stay counted in `used` (and in `dead`), so the budget is the
memory really held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from thaw.core.errors import ChunkNotFound, CorruptChunk, InvalidArgument, OutOfMemory

from .allocators import PAGE_SIZE, HostMemoryAllocator, HostRegion, host_allocator
from .bounded import resolve_workers, run_bounded
from .chunks import BytesLike, ChunkRef, as_byte_view, digest_of, verify
from .copying import copy_bytes


class ChunkSource(Protocol):
    """Where `prewarm` reads chunks from (the disk tier; later a peer)."""

    def read_into(self, digest: str, out: memoryview) -> None:
        """Fill `out` with the chunk's raw bytes, verified against `digest`."""
        ...


@dataclass(frozen=True, slots=True)
class PinnedUsage:
    """A snapshot of the tier's accounting, for heartbeats and metrics."""

    capacity: int
    """Byte budget."""
    used: int
    """Bytes held, including loads in progress; never above `capacity`."""
    chunks: int
    """Distinct chunks held."""
    pinned: int
    """Bytes that cannot be evicted right now (a restore or prewarm is using them)."""
    hits: int
    """Chunk lookups served from this tier."""
    misses: int
    """Chunk lookups that had to go elsewhere."""
    evictions: int
    """Chunks dropped, by LRU or by `evict`."""
    dead: int = 0
    """Bytes of evicted chunks still in memory (counted in `used`): their sealed region
    holds chunks still in use and goes back whole, with its last chunk."""
    locked: bool = False
    """Every region is page-locked (mlock / cudaHostRegister) and a full tier would be."""
    lock_refusal: str = ""
    """Why not, when `locked` is False (e.g. "RLIMIT_MEMLOCK 8.0 MiB < 2.0 GiB")."""


@dataclass(frozen=True, eq=False, slots=True)
class PinnedSpan:
    """Where a held chunk's bytes are: `region[start:start + length]` (read-only), and
    the same bytes as `length` bytes at `file_offset` of the sealed memfd `fd` (-1 when
    the tier's allocator has no descriptors), for handing to another process.

    Chunks prewarmed together share one `region` object (and one `fd`), in arena order:
    a restore copies a run of them in one call when their spans follow each other in
    the same region. Valid only while the chunk is held (`PinnedTier.hold`): an evicted
    chunk's memory goes back to the system, and `fd` is closed with its region (dup it
    to keep it).
    """

    region: memoryview
    start: int
    length: int
    fd: int = -1
    file_offset: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length

    def view(self) -> memoryview:
        return self.region[self.start:self.end]


@dataclass(eq=False, slots=True)
class _Region:
    host: HostRegion
    live: int = 0  # chunks in it that are still entries
    held: int = 0  # bytes of it counted in the tier's `used`: live chunks plus `dead`
    dead: int = 0  # evicted chunks whose memory goes back only with the whole region


@dataclass(eq=False, slots=True)
class _Entry:
    region: _Region
    start: int
    length: int
    pins: int = 0


class PinnedTier:
    """Host-memory chunk cache with capacity accounting in bytes. Thread-safe."""

    def __init__(self, capacity_bytes: int, *,
                 allocator: HostMemoryAllocator | None = None) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise InvalidArgument(f"capacity_bytes must be an integer >= 0, "
                                  f"got {capacity_bytes!r}", field="capacity_bytes")
        self._capacity = capacity_bytes
        self._allocator: HostMemoryAllocator = allocator or host_allocator()
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._regions: set[_Region] = set()
        self._used = 0  # entries, dead bytes and reservations for loads in progress
        self._dead = 0
        self._pinned = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def allocator(self) -> HostMemoryAllocator:
        return self._allocator

    # -- lookups ---------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def get(self, digest: str) -> bytes:
        """A copy of the chunk's raw bytes; ChunkNotFound if it is not here. (Zero-copy
        access is `hold`, which keeps the chunk from being evicted while it is read.)"""
        with self.hold([digest]) as held:
            span = held.get(digest)
            if span is None:
                raise ChunkNotFound(f"chunk {digest} is not in the pinned tier")
            with span.view() as view:
                return bytes(view)

    @contextmanager
    def hold(self, digests: Iterable[str]) -> Iterator[dict[str, PinnedSpan]]:
        """Pin whichever of `digests` are here for the duration of the block and yield
        where their bytes are; the absent ones count as misses."""
        held: dict[str, PinnedSpan] = {}
        with self._lock:
            for digest in dict.fromkeys(digests):
                entry = self._entries.get(digest)
                if entry is None:
                    self._misses += 1
                    continue
                self._hits += 1
                self._pin_entry(entry)
                self._entries.move_to_end(digest)
                host = entry.region.host
                held[digest] = PinnedSpan(host.view, entry.start, entry.length,
                                          host.fd, entry.start)
        try:
            yield held
        finally:
            self.unpin(held)

    def check_lengths(self, refs: Iterable[ChunkRef]) -> None:
        """CorruptChunk for a ref whose length is not that of the chunk held under its
        digest. A copy from here takes `ref.length` bytes from where the chunk starts,
        so a longer ref would carry its neighbours' bytes, never verified, into the
        destination. (A chunk's length is part of its content: the disk tier checks it
        on every read.) Chunks not held are left to the read that brings them."""
        with self._lock:
            for ref in refs:
                entry = self._entries.get(ref.digest)
                if entry is not None and entry.length != ref.length:
                    raise CorruptChunk(_length_mismatch(ref, entry.length))

    def usage(self) -> PinnedUsage:
        refusal = self._allocator.refusal_for(self._capacity)
        with self._lock:
            if not refusal:
                refusal = next((r.host.lock_refusal for r in self._regions
                                if not r.host.locked), "")
            return PinnedUsage(
                capacity=self._capacity,
                used=self._used,
                chunks=len(self._entries),
                pinned=self._pinned,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                dead=self._dead,
                locked=not refusal,
                lock_refusal=refusal,
            )

    def digests(self) -> list[str]:
        """Digests held, least recently used first."""
        with self._lock:
            return list(self._entries)

    # -- changes ---------------------------------------------------------------------

    def put(self, data: BytesLike, digest: str | None = None) -> str:
        """Hold a copy of `data`; returns its digest. Idempotent: known bytes are not
        copied again. If `digest` is given and the bytes do not hash to it, CorruptChunk.
        OutOfMemory if it cannot fit even after evicting every unpinned chunk."""
        raw = as_byte_view(data)
        if digest is None:
            actual = digest_of(raw)
        else:
            # Kept under the digest it was asked by: a snapshot written before BLAKE3
            # names its chunks by SHA-256, and its restores look them up by that name.
            verify(digest, raw)
            actual = digest
        with self._lock:
            if actual in self._entries:
                self._entries.move_to_end(actual)
                return actual
        self._reserve(len(raw))
        try:
            region = self._allocate(len(raw))
        except BaseException:
            self._unreserve(len(raw))
            raise
        try:
            with region.host.writable()[: len(raw)] as slot:
                copy_bytes(slot, raw)
        except BaseException:
            self._abandon(region, len(raw))
            raise
        self._commit(region, [(actual, 0, len(raw))])
        return actual

    def prewarm(self, refs: Iterable[ChunkRef], source: ChunkSource, *,
                workers: int | None = None) -> int:
        """Bring a snapshot's chunks here from `source`, verified as they arrive; returns
        the bytes loaded (chunks already here, e.g. shared weights, cost nothing).

        All or nothing: OutOfMemory before loading anything if the missing chunks cannot
        fit beside what is pinned, and on a failed read nothing of this prewarm is kept.
        The chunks already here are pinned meanwhile, so it never evicts its own.
        """
        lengths: dict[str, int] = {}
        for ref in sorted(refs, key=lambda ref: ref.offset):
            lengths.setdefault(ref.digest, ref.length)
        present: list[str] = []
        missing: list[tuple[str, int]] = []
        with self._lock:
            for digest, length in lengths.items():
                entry = self._entries.get(digest)
                if entry is None:
                    missing.append((digest, length))
                else:
                    self._pin_entry(entry)
                    self._entries.move_to_end(digest)
                    present.append(digest)
        try:
            return self._load(missing, source, resolve_workers(workers))
        finally:
            self.unpin(present)

    def evict(self, digests: Iterable[str]) -> int:
        """Drop these chunks now, except pinned ones; returns the bytes freed (a sealed
        region's memory, its evicted chunks included, is freed with its last chunk)."""
        freed = 0
        with self._lock:
            for digest in digests:
                entry = self._entries.get(digest)
                if entry is None or entry.pins:
                    continue
                freed += self._drop_locked(digest)
        return freed

    def pin(self, digests: Iterable[str]) -> None:
        """Keep these chunks from eviction until `unpin` (counted: pin twice, unpin
        twice). All or nothing: ChunkNotFound, and nothing pinned, if one is absent."""
        wanted = list(digests)
        with self._lock:
            for digest in wanted:
                if digest not in self._entries:
                    raise ChunkNotFound(f"chunk {digest} is not in the pinned tier")
            for digest in wanted:
                self._pin_entry(self._entries[digest])

    def unpin(self, digests: Iterable[str]) -> None:
        """Undo one `pin` of each digest; InvalidArgument if one is not pinned."""
        wanted = list(digests)
        with self._lock:
            for digest in wanted:
                entry = self._entries.get(digest)
                if entry is None or entry.pins == 0:
                    raise InvalidArgument(f"chunk {digest} is not pinned", field="digest")
            for digest in wanted:
                entry = self._entries[digest]
                entry.pins -= 1
                if entry.pins == 0:
                    self._pinned -= entry.length

    # -- internals -------------------------------------------------------------------

    def _load(self, missing: list[tuple[str, int]], source: ChunkSource,
              workers: int) -> int:
        """Read `missing` chunks into one new region, in order, then publish them."""
        if not missing:
            return 0
        total = sum(length for _, length in missing)
        self._reserve(total)
        try:
            region = self._allocate(sum(_slot(length) for _, length in missing))
        except BaseException:
            self._unreserve(total)
            raise
        placed: list[tuple[str, int, int]] = []
        start = 0
        for digest, length in missing:
            placed.append((digest, start, length))
            start += _slot(length)
        buffer = region.host.writable()

        def read(item: tuple[str, int, int]) -> None:
            digest, at, length = item
            with buffer[at:at + length] as slot:
                source.read_into(digest, slot)

        try:
            run_bounded(read, placed, workers)
        except BaseException:
            self._abandon(region, total)
            raise
        self._commit(region, placed)
        return total

    def _reserve(self, nbytes: int) -> None:
        """Account for `nbytes`, evicting least recently used unpinned chunks to make
        room; evicts nothing and raises OutOfMemory if that would not be enough.

        A chunk of a region that goes back only whole frees memory only together with
        the rest of its region: such chunks are evicted only where their whole region
        goes (so no eviction is wasted on memory that would stay)."""
        with self._lock:
            if nbytes > self._capacity:
                raise OutOfMemory(f"{nbytes} bytes do not fit in the pinned tier "
                                  f"({self._capacity} bytes)")
            shortfall = self._used + nbytes - self._capacity
            chosen: list[str] = []
            left: dict[_Region, int] = {}  # whole-only regions: live chunks not chosen
            for digest, entry in self._entries.items():
                if shortfall <= 0:
                    break
                if entry.pins:
                    continue
                region = entry.region
                chosen.append(digest)
                if not region.host.returns_whole:
                    shortfall -= entry.length
                    continue
                left[region] = left.get(region, region.live) - 1
                if left[region] == 0:
                    shortfall -= region.held
            if shortfall > 0:
                raise OutOfMemory(f"no room for {nbytes} bytes in the pinned tier: "
                                  f"{self._used} of {self._capacity} used, "
                                  f"{self._pinned} pinned, {self._dead} held by "
                                  f"evicted chunks of regions still in use")
            for digest in chosen:
                if left.get(self._entries[digest].region, 0) == 0:
                    self._drop_locked(digest)
            self._used += nbytes

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes

    def _allocate(self, nbytes: int) -> _Region:
        return _Region(self._allocator.allocate(max(nbytes, 1)))

    def _abandon(self, region: _Region, reserved: int) -> None:
        """A load that failed: its region goes back, its reservation too."""
        self._unreserve(reserved)
        self._allocator.free(region.host)

    def _commit(self, region: _Region, placed: list[tuple[str, int, int]]) -> None:
        """Seal a filled region and publish its chunks. One another thread published
        meanwhile is kept as theirs: its slot here is given back (with a sealed region,
        whose locking and populating map every page of it, only with the region)."""
        total = sum(length for _, _, length in placed)
        with self._lock:
            if all(digest in self._entries for digest, _, _ in placed):
                for digest, _, _ in placed:
                    self._entries.move_to_end(digest)
                self._used -= total
                self._allocator.free(region.host)
                return
        try:
            self._allocator.seal(region.host)
        except BaseException:
            self._abandon(region, total)
            raise
        with self._lock:
            for digest, start, length in placed:
                region.held += length
                if digest in self._entries:
                    self._entries.move_to_end(digest)
                    self._release_slot_locked(region, start, length)
                    continue
                self._entries[digest] = _Entry(region, start, length)
                region.live += 1
            if region.live == 0:
                self._free_region_locked(region)
            else:
                self._regions.add(region)

    def _pin_entry(self, entry: _Entry) -> None:
        if entry.pins == 0:
            self._pinned += entry.length
        entry.pins += 1

    def _drop_locked(self, digest: str) -> int:
        """Forget a chunk; returns the bytes that left `used` (its own, or its whole
        region's when it was the last chunk of a region that goes back only whole)."""
        entry = self._entries.pop(digest)
        self._evictions += 1
        region = entry.region
        region.live -= 1
        if region.live == 0:
            return self._free_region_locked(region)
        return self._release_slot_locked(region, entry.start, entry.length)

    def _release_slot_locked(self, region: _Region, start: int, length: int) -> int:
        """Give back one chunk's slot of a region still in use; returns the bytes that
        left `used` (0 when the region goes back only whole: the bytes turn dead)."""
        if self._allocator.discard(region.host, start, _slot(length)):
            region.held -= length
            self._used -= length
            return length
        region.dead += length
        self._dead += length
        return 0

    def _free_region_locked(self, region: _Region) -> int:
        self._regions.discard(region)
        freed = region.held
        self._used -= freed
        self._dead -= region.dead
        region.held = region.dead = 0
        self._allocator.free(region.host)
        return freed


def _length_mismatch(ref: ChunkRef, held: int) -> str:
    return (f"chunk {ref.digest} is {held} bytes, its reference at offset {ref.offset} "
            f"says {ref.length}")


def _slot(length: int) -> int:
    """Bytes a chunk takes in a region: whole pages, so evicting one gives back exactly
    its own pages; for page-multiple chunks (every one but an arena's last) the slots are
    back to back, which is what lets a restore copy runs of them in one call."""
    return -(-length // PAGE_SIZE) * PAGE_SIZE

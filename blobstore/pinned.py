"""The pinned tier: verified raw chunks in host memory, with a byte budget and LRU eviction.

A restore from here is copies only. Chunks are keyed by digest, so identical weights in
many functions take memory once. A prewarm lays the chunks it loads out in one region in
arena order, so a restore copies long runs with single calls: on the measured machine
glibc switches to streaming stores only for copies over ~99 MiB, and those run ~1.7x
faster than per-4-MiB-chunk copies (see bench/restore.py). Chunks a restore is copying
from are pinned (a refcount) and never evicted until it is done. Memory comes from an
injected allocator: anonymous memory by default, CuPy page-locked memory for CUDA.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from thaw.core.errors import ChunkNotFound, CorruptChunk, InvalidArgument, OutOfMemory

from .allocators import PAGE_SIZE, AnonymousMemoryAllocator, HostMemoryAllocator
from .bounded import resolve_workers, run_bounded
from .chunks import BytesLike, ChunkRef, as_byte_view, check_digest, digest_of
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


@dataclass(frozen=True, eq=False, slots=True)
class PinnedSpan:
    """Where a held chunk's bytes are: `region[start:start + length]` (read-only).

    Chunks prewarmed together share one `region` object, in arena order: a restore copies
    a run of them in one call when their spans follow each other in the same region.
    Valid only while the chunk is held (`PinnedTier.hold`): an evicted chunk's pages are
    given back to the system.
    """

    region: memoryview
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    def view(self) -> memoryview:
        return self.region[self.start:self.end]


@dataclass(eq=False, slots=True)
class _Region:
    buffer: memoryview
    readonly: memoryview
    live: int = 0  # chunks in it that are still entries


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
        self._allocator: HostMemoryAllocator = allocator or AnonymousMemoryAllocator()
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._used = 0  # entries plus reservations for loads in progress
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
                held[digest] = PinnedSpan(entry.region.readonly, entry.start, entry.length)
        try:
            yield held
        finally:
            self.unpin(held)

    def usage(self) -> PinnedUsage:
        with self._lock:
            return PinnedUsage(
                capacity=self._capacity,
                used=self._used,
                chunks=len(self._entries),
                pinned=self._pinned,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
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
        actual = digest_of(raw)
        if digest is not None and check_digest(digest) != actual:
            raise CorruptChunk(f"chunk {digest} is corrupt: its bytes hash to {actual}")
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
        with region.buffer[: len(raw)] as slot:
            copy_bytes(slot, raw)
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
        """Drop these chunks now, except pinned ones; returns the bytes freed."""
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

        def read(item: tuple[str, int, int]) -> None:
            digest, at, length = item
            with region.buffer[at:at + length] as slot:
                source.read_into(digest, slot)

        try:
            run_bounded(read, placed, workers)
        except BaseException:
            self._unreserve(total)
            self._allocator.discard(region.buffer, 0, len(region.buffer))
            self._allocator.free(region.buffer)
            raise
        self._commit(region, placed)
        return total

    def _reserve(self, nbytes: int) -> None:
        """Account for `nbytes`, evicting least recently used unpinned chunks to make
        room; evicts nothing and raises OutOfMemory if that would not be enough."""
        with self._lock:
            if nbytes > self._capacity:
                raise OutOfMemory(f"{nbytes} bytes do not fit in the pinned tier "
                                  f"({self._capacity} bytes)")
            shortfall = self._used + nbytes - self._capacity
            victims: list[str] = []
            for digest, entry in self._entries.items():
                if shortfall <= 0:
                    break
                if entry.pins == 0:
                    victims.append(digest)
                    shortfall -= entry.length
            if shortfall > 0:
                raise OutOfMemory(f"no room for {nbytes} bytes in the pinned tier: "
                                  f"{self._used} of {self._capacity} used, "
                                  f"{self._pinned} pinned")
            for digest in victims:
                self._drop_locked(digest)
            self._used += nbytes

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes

    def _allocate(self, nbytes: int) -> _Region:
        buffer = self._allocator.allocate(max(nbytes, 1))
        return _Region(buffer, buffer.toreadonly())

    def _commit(self, region: _Region, placed: list[tuple[str, int, int]]) -> None:
        """Publish loaded chunks. One another thread published meanwhile is kept as
        theirs: its slot here is given back."""
        with self._lock:
            for digest, start, length in placed:
                if digest in self._entries:
                    self._used -= length
                    self._allocator.discard(region.buffer, start, _slot(length))
                    self._entries.move_to_end(digest)
                    continue
                self._entries[digest] = _Entry(region, start, length)
                region.live += 1
            if region.live == 0:
                self._allocator.free(region.buffer)

    def _pin_entry(self, entry: _Entry) -> None:
        if entry.pins == 0:
            self._pinned += entry.length
        entry.pins += 1

    def _drop_locked(self, digest: str) -> int:
        entry = self._entries.pop(digest)
        self._used -= entry.length
        self._evictions += 1
        region = entry.region
        self._allocator.discard(region.buffer, entry.start, _slot(entry.length))
        region.live -= 1
        if region.live == 0:
            self._allocator.free(region.buffer)
        return entry.length


def _slot(length: int) -> int:
    """Bytes a chunk takes in a region: whole pages, so evicting one gives back exactly
    its own pages; for page-multiple chunks (every one but an arena's last) the slots are
    back to back, which is what lets a restore copy runs of them in one call."""
    return -(-length // PAGE_SIZE) * PAGE_SIZE

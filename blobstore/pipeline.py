"""Arenas in and out of the chunk store: split + hash + compress + write, and the restore
that streams chunks back into a slice at memory bandwidth.

From the pinned tier a restore is copies only, split into one equal byte range per
thread, exactly like a plain parallel memcpy. From disk each chunk is read -> verified ->
(decompressed) -> copied on a bounded pool, so at most `workers` chunks are in flight.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from thaw.core.errors import ChunkNotFound, CorruptChunk, InvalidArgument, ThawError

from .allocators import PAGE_SIZE
from .bounded import resolve_workers, run_bounded
from .chunks import CHUNK_SIZE, BytesLike, ChunkRef, as_byte_view, matches
from .copying import copy_bytes
from .disk import DiskTier
from .pinned import PinnedSpan, PinnedTier

# Chunk reads in flight on a restore from disk. A cold chunk is read with O_DIRECT
# (DiskTier.read_into), one synchronous read per thread, so the device sees as many
# requests at once as there are threads. Measured on the 2-core VM (virtio disk): 2 reads
# in flight 0.58 GB/s, 8 1.40, 16 1.53, `dd iflag=direct` 1.0-1.6. Each thread then hashes
# the chunk it read, so a core never waits on the disk while a read is pending elsewhere;
# the chunks land in the destination itself, so this costs no memory.
READS_IN_FLIGHT = 16

Refetch = Callable[[str], BytesLike]
"""Fetch a chunk's raw bytes from elsewhere (a peer agent) when the local copy is bad or
missing; the result is verified before use."""


@dataclass(frozen=True, slots=True)
class RestoreStats:
    """How one `restore_arena` went. gbps is gigabytes (1e9 bytes) per second, not bits."""

    bytes: int
    """Arena bytes written: the sum of the chunks' raw lengths."""
    seconds: float
    """Wall-clock time of the whole restore."""
    from_pinned_bytes: int
    """Copied from the pinned tier."""
    from_disk_bytes: int
    """Read, verified and decompressed from the disk tier."""
    refetched_bytes: int
    """Obtained through the refetch callback because the disk copy was bad or absent."""
    gbps: float
    """bytes / seconds / 1e9."""


def store_arena(disk: DiskTier, buffer: BytesLike, chunk_size: int = CHUNK_SIZE,
                workers: int | None = None,
                stored: Callable[[int], None] | None = None) -> list[ChunkRef]:
    """Split `buffer` into `chunk_size` chunks and store each on `disk` (dedupe, LZ4
    where it pays); returns the refs in arena order, ready for the manifest.
    `stored(length)` is called from the worker threads as each chunk is stored."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgument(f"chunk_size must be an integer >= 1, got {chunk_size!r}",
                              field="chunk_size")
    threads = resolve_workers(workers)
    with _flat_view(buffer) as arena:
        spans = [(start, min(start + chunk_size, len(arena)))
                 for start in range(0, len(arena), chunk_size)]

        def store(span: tuple[int, int]) -> ChunkRef:
            start, end = span
            with arena[start:end] as piece:
                put = disk.put(piece)
            if stored is not None:
                stored(end - start)
            return ChunkRef(digest=put.digest, offset=start, length=end - start,
                            stored_length=put.stored_length,
                            compression=put.compression)

        try:
            return run_bounded(store, spans, threads)
        except BaseException as exc:
            _drop_frame_locals(exc)
            raise


def _drop_frame_locals(exc: BaseException | None) -> None:
    """Clear the locals of a failed chunk's finished frames (kept by its traceback), so
    the views of the caller's buffer they hold go now. Otherwise closing an mmap the
    arena came from fails with `BufferError: cannot close exported pointers exist`,
    and that error, not the chunk's own, is what the caller sees."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


def restore_arena(chunks: Iterable[ChunkRef], dest: BytesLike, *, disk: DiskTier,
                  pinned: PinnedTier | None = None, workers: int | None = None,
                  refetch: Refetch | None = None,
                  reads_in_flight: int = READS_IN_FLIGHT) -> RestoreStats:
    """Write every chunk's raw bytes at its offset in `dest` (a writable buffer: a
    memoryview, bytearray or the slice's mmap).

    Chunks in `pinned` are copied from there (pinned for the duration); the rest come from
    `disk`, verified. A chunk that is corrupt or absent on disk is fetched through
    `refetch` if given (then verified and written back to disk), else the restore raises
    CorruptChunk / ChunkNotFound naming the digest. Chunks from disk are read, verified,
    decompressed and copied on max(workers, reads_in_flight) threads, each stage
    releasing the GIL, so reads overlap with the hashing of chunks already read. On any
    error no worker is still writing when this raises, but `dest` holds partial data:
    the caller must treat the slice as not restored.
    """
    refs = list(chunks)
    threads = resolve_workers(workers)
    if not isinstance(reads_in_flight, int) or reads_in_flight < 1:
        raise InvalidArgument(f"reads_in_flight must be an integer >= 1, got "
                              f"{reads_in_flight!r}", field="reads_in_flight")
    started = time.perf_counter()
    with _flat_view(dest) as out:
        if out.readonly:
            raise InvalidArgument("restore destination is read-only", field="dest")
        for ref in refs:
            if ref.end > len(out):
                raise InvalidArgument(f"chunk {ref.digest} at [{ref.offset}, {ref.end}) "
                                      f"overruns a {len(out)}-byte destination",
                                      field="chunks")
        with contextlib.ExitStack() as stack:
            held: Mapping[str, PinnedSpan] = {}
            if pinned is not None:
                held = stack.enter_context(pinned.hold(ref.digest for ref in refs))
            from_pinned = [ref for ref in refs if ref.digest in held]
            from_disk = [ref for ref in refs if ref.digest not in held]
            _copy_from_pinned(from_pinned, held, out, threads)
            refetched = run_bounded(
                lambda ref: _restore_from_disk(ref, out, disk, refetch), from_disk,
                max(threads, reads_in_flight))
    seconds = time.perf_counter() - started
    total = sum(ref.length for ref in refs)
    refetched_bytes = sum(refetched)
    pinned_bytes = sum(ref.length for ref in from_pinned)
    return RestoreStats(
        bytes=total,
        seconds=seconds,
        from_pinned_bytes=pinned_bytes,
        from_disk_bytes=total - pinned_bytes - refetched_bytes,
        refetched_bytes=refetched_bytes,
        gbps=total / seconds / 1e9 if seconds > 0 else 0.0,
    )


@dataclass(slots=True)
class _Run:
    """Bytes to copy from one pinned region into `out`: `length` bytes from
    `region[start:]` to `out[at:]`."""

    at: int
    region: memoryview
    start: int
    length: int


def _copy_from_pinned(refs: list[ChunkRef], held: Mapping[str, PinnedSpan],
                      out: memoryview, threads: int) -> None:
    """Copy like a parallel memcpy: chunks that sit back to back both in a pinned region
    and in `out` are merged into runs, and the runs are cut into one equal byte range per
    thread. Big single copies matter: glibc only uses streaming stores above a size
    threshold (~99 MiB on the measured machine), and they are ~1.7x faster."""
    runs: list[_Run] = []
    for ref in sorted(refs, key=lambda ref: ref.offset):
        span = held[ref.digest]
        if span.length != ref.length:
            # A longer ref would copy the bytes after the chunk, never verified.
            raise CorruptChunk(f"chunk {ref.digest} is {span.length} bytes in the pinned "
                               f"tier, its reference at offset {ref.offset} says "
                               f"{ref.length}")
        last = runs[-1] if runs else None
        if (last is not None and last.region is span.region
                and last.start + last.length == span.start
                and last.at + last.length == ref.offset):
            last.length += ref.length
        else:
            runs.append(_Run(ref.offset, span.region, span.start, ref.length))
    total = sum(run.length for run in runs)
    if total == 0:
        return
    share = -(-total // threads)
    share = -(-share // PAGE_SIZE) * PAGE_SIZE  # threads never share a page of `out`
    parts: list[list[_Run]] = [[]]
    room = share
    for run in runs:
        done = 0
        while done < run.length:
            if room == 0:
                parts.append([])
                room = share
            take = min(room, run.length - done)
            parts[-1].append(_Run(run.at + done, run.region, run.start + done, take))
            done += take
            room -= take

    def copy_part(pieces: list[_Run]) -> None:
        for piece in pieces:
            with (out[piece.at:piece.at + piece.length] as target,
                  piece.region[piece.start:piece.start + piece.length] as source):
                copy_bytes(target, source)

    run_bounded(copy_part, parts, threads)


def _restore_from_disk(ref: ChunkRef, out: memoryview, disk: DiskTier,
                       refetch: Refetch | None) -> int:
    """One chunk from disk into its place; returns the bytes that had to be refetched."""
    with out[ref.offset:ref.end] as target:
        try:
            disk.read_into(ref.digest, target)
            return 0
        except (CorruptChunk, ChunkNotFound):
            if refetch is None:
                raise
        fetched = refetch(ref.digest)
        with _flat_view(fetched) as data:
            if len(data) != ref.length or not matches(ref.digest, data):
                raise CorruptChunk(f"chunk {ref.digest} is corrupt on disk and the "
                                   f"refetched copy does not match it either")
            copy_bytes(target, data)
            # Heal the disk copy; a failed write-back must not fail a good restore.
            with contextlib.suppress(ThawError):
                disk.put(data, ref.digest)
        return ref.length


@contextlib.contextmanager
def _flat_view(buffer: BytesLike) -> Iterator[memoryview]:
    """A flat byte view of `buffer` that is released on exit, so the caller can close an
    mmap right after (even while an exception from inside is being handled)."""
    base = memoryview(buffer)
    flat = as_byte_view(base)
    try:
        yield flat
    finally:
        for view in (flat, base):
            # An export still alive elsewhere only delays the release until it is dropped.
            with contextlib.suppress(BufferError):
                view.release()

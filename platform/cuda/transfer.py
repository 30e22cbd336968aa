"""Filling a cuda slice from host memory: the bytes are split across several streams as
async host-to-device copies (`plan_stream_copies`), every stream is waited for before
the sources may go (`run_copies`), and chunks that sit back to back in the pinned tier
and in the arena go as one copy (`pinned_pieces`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from thaw.blobstore import ChunkRef, PinnedSpan
from thaw.core.errors import InvalidArgument, ThawError
from thaw.platform.cuda.api import CudaApi

log = structlog.get_logger()

# Host-to-device copies of a restore: several streams let the copy engines (one or two
# for H2D on datacenter GPUs) overlap the pieces. Four is an estimate, not a measurement:
# enough to keep two engines fed; tune it on a GPU node.
DEFAULT_COPY_STREAMS = 4

# Streams split the bytes at page multiples: the pinned tier's runs start page-aligned, so
# every stream's first DMA does too.
COPY_SPLIT_ALIGNMENT = 4096


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


def check_pieces(views: Sequence[tuple[int, memoryview]], size: int) -> None:
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


@dataclass(slots=True)
class _Run:
    """Chunks copied as one piece: `length` bytes of `region` from `start`, landing at
    slice offset `offset`."""

    offset: int
    region: memoryview
    start: int
    length: int


def pinned_pieces(refs: Sequence[ChunkRef], held: Mapping[str, PinnedSpan]
                  ) -> list[tuple[int, memoryview]]:
    """(slice offset, bytes) pieces for `refs` (sorted by offset, every digest in
    `held`): a chunk that follows the previous one both in its pinned region and in the
    arena extends that piece instead of starting its own."""
    runs: list[_Run] = []
    for ref in refs:
        span = held[ref.digest]
        last = runs[-1] if runs else None
        if (last is not None and last.region is span.region
                and last.start + last.length == span.start
                and last.offset + last.length == ref.offset):
            last.length += ref.length
        else:
            runs.append(_Run(ref.offset, span.region, span.start, ref.length))
    return [(run.offset, run.region[run.start:run.start + run.length]) for run in runs]


def run_copies(api: CudaApi, device: int, device_id: str, ptr: int,
               views: Sequence[tuple[int, memoryview]], plan: Sequence[Sequence[CopyOp]]
               ) -> None:
    """Queue `plan` (one list of ops per stream) as copies into the allocation at `ptr`
    on CUDA ordinal `device` (`device_id` names it in logs), then wait for every stream;
    raises the first error once no stream can still read the sources."""
    created: list[int] = []
    error: BaseException | None = None
    try:
        for ops in plan:
            stream = api.create_stream(device)
            created.append(stream)
            for op in ops:
                at, view = views[op.piece]
                api.copy_to_device_async(device, ptr + at + op.start,
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
            log.warning("could not destroy a copy stream", device=device_id,
                        error=exc.message)
    if error is not None:
        raise error

"""Long passes over a snapshot's chunks on a node (prewarm, verify) that report their
progress as they go: the work runs in a thread, a counter is read every
PROGRESS_INTERVAL_SECONDS and streamed to the caller (control.py), and on to the
CLI's progress bar through the scheduler and the gateway.

Verify checks every copy a restore can take bytes from: the disk tier, the pinned
tier, and the sealed memfds the node made for the snapshot (the ones instances are
handed and map), those by their seals as well as their bytes."""

from __future__ import annotations

import asyncio
import mmap
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from thaw.blobstore import ChunkRef, ChunkSource
from thaw.blobstore.bounded import run_bounded
from thaw.blobstore.chunks import verify
from thaw.core.errors import ChunkNotFound, CorruptChunk, ThawError
from thaw.platform.memfds import missing_seals
from thaw.platform.snapshots import HeldMemfd, NodeSnapshots, all_refs
from thaw.proto import agent_pb2, manifest_pb2

# How often a pass reports its progress: often enough for a smooth bar, rarely enough
# that a fast pass sends a handful of messages.
PROGRESS_INTERVAL_SECONDS = 0.25
# Chunks read at once by a verify (reads and SHA-256 release the GIL).
VERIFY_WORKERS = 4
# The tier a bad copy is reported in when it is one of the node's sealed memfds (the
# snapshot.json, pickle and host arena that restores map); "disk" and "pinned" are the
# blobstore's. The CLI prints it as it is.
ARENA_TIER = "arena"

T = TypeVar("T")


@dataclass
class Progress:
    """Bytes and chunks done so far; updated from worker threads."""

    total_bytes: int
    total_chunks: int
    done_bytes: int = 0
    done_chunks: int = 0
    bad: list[agent_pb2.BadChunk] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self.done_chunks += 1

    def grow(self, nbytes: int, chunks: int) -> None:
        """More work found once the pass has started (the node's memfds)."""
        with self._lock:
            self.total_bytes += nbytes
            self.total_chunks += chunks

    def mark_bad(self, digest: str, tier: str, reason: str) -> None:
        with self._lock:
            self.bad.append(agent_pb2.BadChunk(digest=digest, tier=tier, reason=reason))

    def message(self, node_id: str, seconds: float, finished: bool = False,
                error: str = "") -> agent_pb2.SnapshotProgress:
        with self._lock:
            return agent_pb2.SnapshotProgress(
                node_id=node_id, done_bytes=self.done_bytes, total_bytes=self.total_bytes,
                done_chunks=self.done_chunks, total_chunks=self.total_chunks,
                seconds=seconds, finished=finished, bad=list(self.bad), error=error)


def unique_refs(manifest: manifest_pb2.SnapshotManifest) -> list[ChunkRef]:
    """Each distinct chunk once (shared weights appear at several offsets)."""
    seen: dict[str, ChunkRef] = {}
    for ref in all_refs(manifest):
        seen.setdefault(ref.digest, ref)
    return list(seen.values())


def progress_for(manifest: manifest_pb2.SnapshotManifest) -> Progress:
    refs = unique_refs(manifest)
    return Progress(total_bytes=sum(r.length for r in refs), total_chunks=len(refs))


class CountingSource:
    """A chunk source that counts what passes through it (for prewarm's progress)."""

    def __init__(self, source: ChunkSource, progress: Progress) -> None:
        self.source = source
        self.progress = progress

    def read_into(self, digest: str, out: memoryview) -> None:
        self.source.read_into(digest, out)
        self.progress.add(len(out))


def verify_chunks(snapshots: NodeSnapshots, manifest: manifest_pb2.SnapshotManifest,
                  progress: Progress, workers: int = VERIFY_WORKERS) -> None:
    """Re-read every chunk from the disk tier (and the pinned copy, if any) and check
    it against its digest, then the node's memfds of the snapshot (`verify_memfds`);
    bad ones are recorded in `progress`, nothing is changed."""

    def check(ref: ChunkRef) -> None:
        try:
            snapshots.disk.get(ref.digest)
        except CorruptChunk as exc:
            progress.mark_bad(ref.digest, "disk", exc.message)
        except ChunkNotFound:
            progress.mark_bad(ref.digest, "disk", "missing from the disk tier")
        except ThawError as exc:
            progress.mark_bad(ref.digest, "disk", exc.message)
        if snapshots.pinned.has(ref.digest):
            try:
                verify(ref.digest, snapshots.pinned.get(ref.digest))
            except ChunkNotFound:
                pass  # evicted meanwhile: nothing to check
            except ThawError as exc:
                progress.mark_bad(ref.digest, "pinned", exc.message)
        progress.add(ref.length)

    run_bounded(check, unique_refs(manifest), workers)
    verify_memfds(snapshots, manifest, progress, workers)


def verify_memfds(snapshots: NodeSnapshots, manifest: manifest_pb2.SnapshotManifest,
                  progress: Progress, workers: int = VERIFY_WORKERS) -> None:
    """Check what restores on this node actually map: each memfd made for `manifest`
    must be sealed (no write, resize or unsealing) and hold, at every chunk's offset,
    bytes that hash to that chunk's digest (the snapshot.json: exactly its text).
    A failure is recorded in `progress` under ARENA_TIER, naming the memfd."""
    held = snapshots.held_memfds(manifest)
    try:
        progress.grow(sum(m.size for m in held), sum(len(m.chunks) or 1 for m in held))
        for memfd in held:
            _verify_memfd(memfd, progress, workers)
    finally:
        for memfd in held:
            os.close(memfd.fd)


def _verify_memfd(memfd: HeldMemfd, progress: Progress, workers: int) -> None:
    missing = missing_seals(memfd.fd)
    if missing:
        progress.mark_bad("", ARENA_TIER, f"{memfd.name} is not sealed (it lacks "
                          f"{', '.join(missing)}): whoever holds it could change what "
                          f"restores map")
    size = os.fstat(memfd.fd).st_size
    if size != memfd.size:
        progress.mark_bad("", ARENA_TIER, f"{memfd.name} is {size} bytes, the snapshot's "
                          f"manifest says {memfd.size}")
        return
    if size == 0:
        return
    with (mmap.mmap(memfd.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapping,
          memoryview(mapping) as view):
        if not memfd.chunks:
            if view != memfd.text:
                progress.mark_bad("", ARENA_TIER, f"{memfd.name} does not hold the "
                                  f"snapshot's snapshot.json")
            progress.add(size)
            return

        def check(ref: ChunkRef) -> None:
            with view[ref.offset:ref.end] as piece:
                try:
                    verify(ref.digest, piece)
                except CorruptChunk as exc:
                    progress.mark_bad(ref.digest, ARENA_TIER,
                                      f"{memfd.name} at offset {ref.offset}: {exc.message}")
            progress.add(ref.length)

        run_bounded(check, memfd.chunks, workers)


async def report(node_id: str, progress: Progress, work: Callable[[], T]
                 ) -> AsyncIterator[agent_pb2.SnapshotProgress]:
    """Run blocking `work` in a thread, yielding `progress` every interval and a last
    message (finished, with the error if the work failed)."""
    started = time.perf_counter()
    task = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL_SECONDS)
            if done:
                break
            yield progress.message(node_id, time.perf_counter() - started)
        error = ""
        try:
            task.result()
        except ThawError as exc:
            error = exc.message
        except OSError as exc:
            error = str(exc)
        yield progress.message(node_id, time.perf_counter() - started, finished=True,
                               error=error)
    finally:
        if not task.done():
            # The caller left: the thread finishes its pass (it cannot be interrupted),
            # but nobody waits for it.
            task.cancel()

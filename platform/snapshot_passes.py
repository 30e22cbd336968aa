"""Long passes over a snapshot's chunks on a node (prewarm, verify) that report their
progress as they go: the work runs in a thread, a counter is read every
PROGRESS_INTERVAL_SECONDS and streamed to the caller (control.py), and on to the
CLI's progress bar through the scheduler and the gateway."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from thaw.blobstore import ChunkRef, ChunkSource
from thaw.blobstore.bounded import run_bounded
from thaw.blobstore.chunks import verify
from thaw.core.errors import ChunkNotFound, CorruptChunk, ThawError
from thaw.platform.snapshots import NodeSnapshots, all_refs
from thaw.proto import agent_pb2, manifest_pb2

# How often a pass reports its progress: often enough for a smooth bar, rarely enough
# that a fast pass sends a handful of messages.
PROGRESS_INTERVAL_SECONDS = 0.25
# Chunks read at once by a verify (reads and SHA-256 release the GIL).
VERIFY_WORKERS = 4

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
    it against its digest; bad ones are recorded in `progress`, nothing is changed."""

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

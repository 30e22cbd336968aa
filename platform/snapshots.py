"""Snapshots on a node: a build's captured files go into the blobstore as chunks and
come out as a manifest; for a restore, a snapshot's arenas are materialized once per
node into sealed memfds ("thaw-arena-<key>") that every instance of it is handed as
descriptors and maps copy-on-write. No instance ever sees a path of the store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import mmap
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw.blobstore import (
    ChunkRef,
    ChunkSource,
    DiskTier,
    PinnedTier,
    restore_arena,
    store_arena,
)
from thaw.core.errors import SnapshotError
from thaw.platform.background import in_background
from thaw.platform.memfds import MEMFD_PREFIX, SealedMemfd
from thaw.proto import manifest_pb2
from thaw.snapshotter.manifest import (
    arena_message,
    build_manifest,
    capture_json,
    chunk_dicts,
    manifest_key,
)


@dataclass(frozen=True)
class Materialized:
    """A snapshot as memfds, ready to hand to the runtime's restore."""

    key: str
    snapshot_json: str
    """The snapshot.json text (a template reads its module list from it)."""
    meta: SealedMemfd
    """The same snapshot.json, for an instance (its "snapshot_json" descriptor)."""
    pickle: SealedMemfd
    host_arena: SealedMemfd
    device_size: int
    """Bytes of the device arena, which goes into the instance's slice, not a memfd."""
    seconds: float
    """Time spent materializing now; 0 when the memfds were already there."""

    def descriptors(self) -> dict[str, int]:
        """The spawn request's descriptors for this snapshot, by their names there."""
        return {"snapshot_json": self.meta.fd, "pickle": self.pickle.fd,
                "host_arena": self.host_arena.fd}


@dataclass(frozen=True)
class HeldMemfd:
    """One memfd this node made for a snapshot, as a check sees it: `fd` is a duplicate
    of the node's descriptor (the caller's to close), so eviction closing the node's
    own cannot pull it away mid-read."""

    name: str
    fd: int
    size: int
    """Bytes the manifest says it holds."""
    chunks: list[ChunkRef]
    """What must be at each offset (empty for the snapshot.json memfd)."""
    text: bytes = b""
    """Its exact content when it holds no chunks (the snapshot.json)."""


@dataclass(frozen=True)
class _Materialized:
    meta: SealedMemfd
    pickle: SealedMemfd
    text: str


def _store_file(disk: DiskTier, path: Path, stored: Callable[[int], None] | None = None
                ) -> tuple[int, list[ChunkRef]]:
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return 0, []
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0,
                                               access=mmap.ACCESS_READ) as mm:
        return size, store_arena(disk, mm, stored=stored)


class _StoreProgress:
    """Bytes stored of a capture's arenas, reported as (done, total) in order: chunks
    finish on several threads, so the sum and the report are taken under one lock."""

    def __init__(self, total: int, report: Callable[[int, int], object]) -> None:
        self.total = total
        self.report = report
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, length: int) -> None:
        with self._lock:
            self.done += length
            self.report(self.done, self.total)


def arena_key(arena: manifest_pb2.Arena) -> str:
    """Same chunks at the same offsets, same bytes: a name for an arena's content."""
    h = hashlib.sha256(str(arena.size).encode())
    for chunk in arena.chunks:
        h.update(f"{chunk.offset}:{chunk.digest};".encode())
    return h.hexdigest()[:32]


def all_refs(manifest: manifest_pb2.SnapshotManifest) -> list[ChunkRef]:
    return [ChunkRef.from_dict(d) for arena in (manifest.pickle, manifest.host, manifest.device)
            for d in chunk_dicts(arena)]


class NodeSnapshots:
    def __init__(self, disk: DiskTier, pinned: PinnedTier, shm_dir: Path) -> None:
        self.disk = disk
        self.pinned = pinned
        self.shm_dir = shm_dir
        shm_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._materializing: dict[str, threading.Lock] = {}
        self._snapshots: dict[str, _Materialized] = {}
        """Manifest key -> its snapshot.json and pickle memfds."""
        self._arenas: dict[str, SealedMemfd] = {}
        """Arena key (content) -> its memfd, shared by every snapshot with that arena."""
        self.prewarmed: dict[str, manifest_pb2.SnapshotManifest] = {}

    def store_capture(self, out_dir: Path, *, function: str, version: str,
                      progress: Callable[[int, int], object] | None = None
                      ) -> tuple[manifest_pb2.SnapshotManifest, int]:
        """Chunk a build's output into the disk tier; returns (manifest, stored bytes).
        `progress(done, total)` follows the bytes stored of all its arenas."""
        capture: dict[str, Any] = json.loads((out_dir / "snapshot.json").read_text())
        before = self.disk.stored_bytes()
        files = (("pickle", "state.pickle"), ("host", "host.arena"),
                 ("device", "device.arena"))
        stored = None
        if progress is not None:
            total = sum((out_dir / f).stat().st_size for _, f in files
                        if (out_dir / f).exists())
            stored = _StoreProgress(total, progress)
        arenas = {}
        for name, filename in files:
            size, chunks = _store_file(self.disk, out_dir / filename, stored)
            arenas[name] = arena_message(size, chunks)
        manifest = build_manifest(capture, function=function, version=version, **arenas)
        return manifest, max(0, self.disk.stored_bytes() - before)

    def materialize(self, manifest: manifest_pb2.SnapshotManifest) -> Materialized:
        """The snapshot's memfds, made once per node from the pinned tier or disk.
        Arenas are keyed by their content, so snapshots with the same weights (copies of
        one model under several names) share one memfd, and every instance maps it
        copy-on-write. The caller holds the node's ReadersWriter for reading until it has
        handed the descriptors over: eviction closes them."""
        key = manifest_key(manifest)
        started = time.perf_counter()
        created = False
        with self._lock_for(key):
            made = self._snapshots.get(key)
            if made is None:
                text = json.dumps(capture_json(manifest))
                made = _Materialized(
                    SealedMemfd.of_bytes(f"{MEMFD_PREFIX}meta-{key[:24]}", text.encode()),
                    self._arena_memfd(f"{MEMFD_PREFIX}pickle-{key[:24]}", manifest.pickle),
                    text)
                with self._lock:
                    self._snapshots[key] = made
                created = True
        host, host_created = self._shared_arena(manifest.host)
        return Materialized(
            key=key, snapshot_json=made.text, meta=made.meta, pickle=made.pickle,
            host_arena=host, device_size=manifest.device.size,
            seconds=time.perf_counter() - started if created or host_created else 0.0)

    def _lock_for(self, key: str) -> threading.Lock:
        with self._lock:
            return self._materializing.setdefault(key, threading.Lock())

    def _shared_arena(self, arena: manifest_pb2.Arena) -> tuple[SealedMemfd, bool]:
        """The memfd holding this arena's bytes, made if missing: (memfd, made)."""
        key = arena_key(arena)
        with self._lock_for(key):
            with self._lock:
                found = self._arenas.get(key)
            if found is not None:
                return found, False
            made = self._arena_memfd(f"{MEMFD_PREFIX}arena-{key}", arena)
            with self._lock:
                self._arenas[key] = made
            return made, True

    def _arena_memfd(self, name: str, arena: manifest_pb2.Arena) -> SealedMemfd:
        refs = [ChunkRef.from_dict(d) for d in chunk_dicts(arena)]
        return SealedMemfd(name, arena.size, lambda view: self.restore_into(refs, view))

    def restore_into(self, refs: list[ChunkRef], view: memoryview) -> None:
        """An arena's chunks into `view` at their offsets, from the pinned tier where
        they are there, else from disk (verified)."""
        try:
            restore_arena(refs, view, disk=self.disk, pinned=self.pinned)
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot chunks: {exc}") from exc

    def held_memfds(self, manifest: manifest_pb2.SnapshotManifest) -> list[HeldMemfd]:
        """The memfds of `manifest` that this node holds now, the very ones restores
        hand to instances (none before its first restore here, or after eviction)."""
        text = json.dumps(capture_json(manifest)).encode()
        held: list[HeldMemfd] = []
        try:
            with self._lock:
                made = self._snapshots.get(manifest_key(manifest))
                arena = self._arenas.get(arena_key(manifest.host))
                if made is not None and not made.meta.closed:
                    held.append(HeldMemfd(made.meta.name, os.dup(made.meta.fd), len(text),
                                          [], text))
                for memfd, message in ((made.pickle if made else None, manifest.pickle),
                                       (arena, manifest.host)):
                    if memfd is not None and not memfd.closed:
                        held.append(HeldMemfd(memfd.name, os.dup(memfd.fd), message.size,
                                              [ChunkRef.from_dict(d)
                                               for d in chunk_dicts(message)]))
        except BaseException:
            for taken in held:
                os.close(taken.fd)
            raise
        return held

    def drop(self, manifest: manifest_pb2.SnapshotManifest) -> int:
        """Close the snapshot's memfds (running instances keep their mappings); returns
        the bytes they held."""
        with self._lock:
            made = self._snapshots.pop(manifest_key(manifest), None)
            arena = self._arenas.pop(arena_key(manifest.host), None)
        closing = [made.meta, made.pickle] if made is not None else []
        released = 0
        for memfd in [*closing, arena]:
            if memfd is not None and not memfd.closed:
                released += memfd.size
                memfd.close()
        return released

    def prewarm(self, manifest: manifest_pb2.SnapshotManifest,
                source: ChunkSource | None = None) -> int:
        """Load the snapshot's chunks into the pinned tier; returns bytes loaded.
        Chunks whose arena this node already holds as a memfd are left out: restores
        hand that memfd over and never read them (a 1.4 GB host arena would otherwise
        sit in host memory twice). `source`: where chunks are read (default the disk
        tier; a counting wrapper reports progress). It runs at background priority
        (platform/background.py): instances serving calls come first."""
        refs = self.unheld_refs(manifest)
        before = self.pinned.usage().used
        in_background(self.pinned.prewarm, refs, source or self.disk)
        with self._lock:
            self.prewarmed[manifest_key(manifest)] = manifest
        return max(0, self.pinned.usage().used - before)

    def unheld_refs(self, manifest: manifest_pb2.SnapshotManifest) -> list[ChunkRef]:
        """The snapshot's chunks but those of arenas held here as memfds."""
        with self._lock:
            made = self._snapshots.get(manifest_key(manifest))
            host = self._arenas.get(arena_key(manifest.host))
        arenas = ((manifest.pickle, made.pickle if made else None), (manifest.host, host),
                  (manifest.device, None))
        return [ChunkRef.from_dict(d) for arena, memfd in arenas
                if memfd is None or memfd.closed for d in chunk_dicts(arena)]

    def evict(self, manifest: manifest_pb2.SnapshotManifest) -> int:
        """Drop the snapshot from host memory: its pinned chunks and its memfds; returns
        the bytes released (running instances keep their private mappings, and the pages
        under them, until they exit)."""
        with self._lock:
            self.prewarmed.pop(manifest_key(manifest), None)
            still_wanted = {r.digest for m in self.prewarmed.values() for r in all_refs(m)}
        freed = self.pinned.evict(r.digest for r in all_refs(manifest)
                                  if r.digest not in still_wanted)
        return freed + self.drop(manifest)

    def pinned_keys(self) -> list[str]:
        """Snapshots held in host memory: each chunk in the pinned tier or in an arena
        memfd this node holds."""
        with self._lock:
            prewarmed = list(self.prewarmed.items())
        return [key for key, m in prewarmed
                if all(self.pinned.has(r.digest) for r in self.unheld_refs(m))]

    def collect_garbage(self, keep: list[manifest_pb2.SnapshotManifest]) -> tuple[int, int]:
        """Drop other snapshots' host-memory copies, then delete disk chunks that no
        kept manifest references."""
        keys = {manifest_key(m) for m in keep}
        with self._lock:
            gone = [m for k, m in self.prewarmed.items() if k not in keys]
        for manifest in gone:
            self.evict(manifest)
        arena_keys = {arena_key(m.host) for m in keep}
        with self._lock:
            gone_snapshots = [self._snapshots.pop(k) for k in list(self._snapshots)
                              if k not in keys]
            gone_arenas = [self._arenas.pop(k) for k in list(self._arenas)
                           if k not in arena_keys]
        for made in gone_snapshots:
            made.meta.close()
            made.pickle.close()
        for memfd in gone_arenas:
            memfd.close()
        referenced = {r.digest for m in keep for r in all_refs(m)}
        result = self.disk.gc(referenced)
        return result.removed, result.freed_bytes

    def close(self) -> None:
        with self._lock:
            memfds = [m for made in self._snapshots.values() for m in (made.meta, made.pickle)]
            memfds += self._arenas.values()
            self._snapshots.clear()
            self._arenas.clear()
        for memfd in memfds:
            memfd.close()
        shutil.rmtree(self.shm_dir, ignore_errors=True)


class ReadersWriter:
    """Restores hand the snapshot memfds to instances (many at once); eviction and
    garbage collection close them (alone). asyncio has no such lock."""

    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            async with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            async with self._changed:
                self._writing = False
                self._changed.notify_all()

"""Snapshots on a node: a build's captured files go into the blobstore as chunks and
come out as a manifest; for a restore, a snapshot's arenas are materialized once into
tmpfs files that every instance of it maps copy-on-write."""

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
import uuid
from collections.abc import AsyncIterator
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
from thaw.proto import manifest_pb2
from thaw.snapshotter.manifest import (
    arena_message,
    build_manifest,
    capture_json,
    chunk_dicts,
    manifest_key,
)

# Linux 5.14+; the mmap module gained the constant only in Python 3.13.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


@dataclass(frozen=True)
class Materialized:
    """A snapshot's files, ready for the runtime's restore."""

    key: str
    snapshot_json: str
    pickle: str
    host_arena: str
    device_arena: str | None
    seconds: float
    """Time spent materializing now; 0 when the files were already there."""


def _store_file(disk: DiskTier, path: Path) -> tuple[int, list[ChunkRef]]:
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return 0, []
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0,
                                               access=mmap.ACCESS_READ) as mm:
        return size, store_arena(disk, mm)


# Subfolder of the tmpfs snapshot folder where arenas live, named by content.
ARENAS = "arenas"


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
        self.prewarmed: dict[str, manifest_pb2.SnapshotManifest] = {}

    def store_capture(self, out_dir: Path, *, function: str, version: str
                      ) -> tuple[manifest_pb2.SnapshotManifest, int]:
        """Chunk a build's output into the disk tier; returns (manifest, stored bytes)."""
        capture: dict[str, Any] = json.loads((out_dir / "snapshot.json").read_text())
        before = self.disk.stored_bytes()
        arenas = {}
        for name, filename in (("pickle", "state.pickle"), ("host", "host.arena"),
                               ("device", "device.arena")):
            size, chunks = _store_file(self.disk, out_dir / filename)
            arenas[name] = arena_message(size, chunks)
        manifest = build_manifest(capture, function=function, version=version, **arenas)
        return manifest, max(0, self.disk.stored_bytes() - before)

    def materialize(self, manifest: manifest_pb2.SnapshotManifest) -> Materialized:
        """Write the snapshot's files into tmpfs, once per node. Arenas are named by
        their content, so snapshots with the same weights (copies of one model under
        several names) share one file, and every instance maps it copy-on-write."""
        key = manifest_key(manifest)
        started = time.perf_counter()
        created = False
        with self._lock_for(key):
            final = self.shm_dir / key
            if not (final / "snapshot.json").exists():
                staging = self.shm_dir / f".{key}-{uuid.uuid4().hex[:8]}"
                staging.mkdir(parents=True)
                try:
                    self._materialize_arena(manifest.pickle, staging / "state.pickle")
                    (staging / "snapshot.json").write_text(json.dumps(capture_json(manifest)))
                    os.replace(staging, final)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                created = True
        host, host_created = self._shared_arena(manifest.host)
        device, device_created = self._shared_arena(manifest.device)
        created = created or host_created or device_created
        return Materialized(
            key=key, snapshot_json=str(final / "snapshot.json"),
            pickle=str(final / "state.pickle"), host_arena=str(host),
            device_arena=str(device) if manifest.device.size else None,
            seconds=time.perf_counter() - started if created else 0.0)

    def _lock_for(self, key: str) -> threading.Lock:
        with self._lock:
            return self._materializing.setdefault(key, threading.Lock())

    def _shared_arena(self, arena: manifest_pb2.Arena) -> tuple[Path, bool]:
        """The tmpfs file holding this arena's bytes, made if missing: (path, made)."""
        path = self.shm_dir / ARENAS / arena_key(arena)
        with self._lock_for(path.name):
            if path.exists():
                return path, False
            path.parent.mkdir(exist_ok=True)
            staging = path.with_name(f".{path.name}-{uuid.uuid4().hex[:8]}")
            try:
                self._materialize_arena(arena, staging)
                os.replace(staging, path)
            except BaseException:
                staging.unlink(missing_ok=True)
                raise
            return path, True

    def _materialize_arena(self, arena: manifest_pb2.Arena, path: Path) -> None:
        with open(path, "w+b") as handle:
            if arena.size == 0:
                return
            handle.truncate(arena.size)
            refs = [ChunkRef.from_dict(d) for d in chunk_dicts(arena)]
            with mmap.mmap(handle.fileno(), arena.size) as mm, memoryview(mm) as view:
                # Fault the tmpfs pages in up front: first-touch writes inside the copy
                # run several times slower than the copy itself.
                with contextlib.suppress(OSError, ValueError):
                    mm.madvise(MADV_POPULATE_WRITE)
                try:
                    restore_arena(refs, view, disk=self.disk, pinned=self.pinned)
                except OSError as exc:
                    raise SnapshotError(f"cannot read snapshot chunks: {exc}") from exc

    def drop(self, manifest: manifest_pb2.SnapshotManifest) -> None:
        """Forget the materialized files (running instances keep their mappings)."""
        shutil.rmtree(self.shm_dir / manifest_key(manifest), ignore_errors=True)
        for arena in (manifest.host, manifest.device):
            (self.shm_dir / ARENAS / arena_key(arena)).unlink(missing_ok=True)

    def prewarm(self, manifest: manifest_pb2.SnapshotManifest,
                source: ChunkSource | None = None) -> int:
        """Load every chunk of the snapshot into the pinned tier; returns bytes loaded.
        `source`: where chunks are read (default the disk tier; a counting wrapper
        reports progress)."""
        refs = all_refs(manifest)
        before = self.pinned.usage().used
        self.pinned.prewarm(refs, source or self.disk)
        with self._lock:
            self.prewarmed[manifest_key(manifest)] = manifest
        return max(0, self.pinned.usage().used - before)

    def evict(self, manifest: manifest_pb2.SnapshotManifest) -> int:
        """Drop the snapshot from host memory: its pinned chunks and materialized files
        (running instances keep their private mappings)."""
        with self._lock:
            self.prewarmed.pop(manifest_key(manifest), None)
            still_wanted = {r.digest for m in self.prewarmed.values() for r in all_refs(m)}
        freed = self.pinned.evict(r.digest for r in all_refs(manifest)
                                  if r.digest not in still_wanted)
        self.drop(manifest)
        return freed

    def pinned_keys(self) -> list[str]:
        """Snapshots whose chunks are all in the pinned tier."""
        with self._lock:
            prewarmed = list(self.prewarmed.items())
        return [key for key, m in prewarmed
                if all(self.pinned.has(r.digest) for r in all_refs(m))]

    def collect_garbage(self, keep: list[manifest_pb2.SnapshotManifest]) -> tuple[int, int]:
        """Drop other snapshots' host-memory copies, then delete disk chunks that no
        kept manifest references."""
        keys = {manifest_key(m) for m in keep}
        with self._lock:
            gone = [m for k, m in self.prewarmed.items() if k not in keys]
        for manifest in gone:
            self.evict(manifest)
        arena_keys = {arena_key(a) for m in keep for a in (m.host, m.device)}
        for entry in self.shm_dir.iterdir():
            if (entry.is_dir() and entry.name not in keys and entry.name != ARENAS
                    and not entry.name.startswith(".")):
                shutil.rmtree(entry, ignore_errors=True)
        arenas = self.shm_dir / ARENAS
        if arenas.exists():
            for entry in arenas.iterdir():
                if entry.name not in arena_keys and not entry.name.startswith("."):
                    entry.unlink(missing_ok=True)
        referenced = {r.digest for m in keep for r in all_refs(m)}
        result = self.disk.gc(referenced)
        return result.removed, result.freed_bytes

    def close(self) -> None:
        shutil.rmtree(self.shm_dir, ignore_errors=True)


class ReadersWriter:
    """Restores read the tmpfs snapshot files (many at once); eviction and garbage
    collection delete them (alone). asyncio has no such lock."""

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

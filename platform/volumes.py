"""Model volumes on a node: a manifest materialised once into a read-only folder,
mounted read-only into every build and fresh start that names it.

`<home>/volumes/<manifest digest>/` holds the manifest's files, assembled from chunks
fetched from the scheduler (Volumes/GetBlob), each checked against its digest (a chunk
that arrives damaged is fetched once more, then refused). The folder is made in a
staging folder and renamed into place whole, with files 0444 (0555 when uploaded
executable) and folders 0555, so every tenant uid can read it and none can change it;
every instance with the same manifest shares it. A manifest is content-addressed (the
same digest is the same files), so sharing the folder across tenants shows no tenant
anything it did not upload itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from thaw.core.errors import CorruptChunk, InstanceFailed, ThawError
from thaw.core.grpcutil import decode_error
from thaw.platform.runtime import LaunchSpec, RuntimeCapabilities
from thaw.proto import agent_pb2, volumes_pb2, volumes_pb2_grpc

log = structlog.get_logger()

# Fetches of one chunk before it is refused as damaged (the first answer and one more).
FETCH_ATTEMPTS = 2
# Chunks fetched at once while a file is assembled (at most this many times 8 MiB
# held in memory).
PARALLEL_FETCHES = 4
# A materialised manifest no instance holds is kept this long for the next start.
IDLE_SECONDS = 3600.0
EMPTY = "empty"
# The kind a node's garbage collection reports for them (GarbageFreed.kind).
VOLUMES = "volumes"
_HEX = frozenset("0123456789abcdef")

FetchBlob = Callable[[str, str], Awaitable[bytes]]
"""(tenant, sha256) -> the chunk's bytes, from the scheduler."""


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    mode: int
    chunks: tuple[str, ...]


def _digest(value: str) -> str:
    if len(value) != 64 or not set(value) <= _HEX:
        raise InstanceFailed(f"volume: {value[:80]!r} is not a sha256 digest")
    return value


def parse_manifest(data: bytes) -> list[ManifestFile]:
    """The manifest's files, each path checked to stay inside the volume (the node
    trusts no path it did not check)."""
    try:
        raw = json.loads(data)
        files = [ManifestFile(str(f["path"]), int(f["size"]), int(f["mode"]),
                              tuple(_digest(str(c)) for c in f["chunks"]))
                 for f in raw["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InstanceFailed(f"volume: unreadable manifest: {exc}") from exc
    for f in files:
        parts = f.path.split("/")
        if f.path.startswith("/") or "\0" in f.path or any(p in ("", ".", "..")
                                                          for p in parts):
            raise InstanceFailed(f"volume: unsafe path {f.path!r} in its manifest")
    return files


class NodeVolumes:
    """The node's materialised volumes under `root`."""

    def __init__(self, root: Path, fetch_blob: FetchBlob) -> None:
        self.root = root
        self.fetch_blob = fetch_blob
        self._making: dict[str, asyncio.Lock] = {}
        self.fetched = 0
        """Chunks fetched since start (refetches included)."""
        self.holders: dict[str, set[str]] = {}
        """Instance or build id -> the manifest folders it has mounted."""
        self.last_used: dict[str, float] = {}
        """Manifest folder name -> when its last holder let go (monotonic time)."""

    def folder(self, digest: str) -> Path:
        return self.root / (digest or EMPTY)

    async def ensure(self, tenant: str, digest: str) -> Path:
        """The folder of manifest `digest` of `tenant`, made once ('' = empty)."""
        if digest:
            _digest(digest)
        target = self.folder(digest)
        if target.is_dir():
            return target
        lock = self._making.setdefault(digest, asyncio.Lock())
        async with lock:
            if target.is_dir():
                return target
            staging = self.root / f".{digest or EMPTY}-{uuid.uuid4().hex[:8]}"
            try:
                await asyncio.to_thread(staging.mkdir, parents=True)
                if digest:
                    manifest = parse_manifest(await self._chunk(tenant, digest))
                    for f in manifest:
                        await self._assemble(tenant, staging, f)
                await asyncio.to_thread(_seal, staging)
                await asyncio.to_thread(os.replace, staging, target)
                # Last: renaming a folder needs it writable where the agent is not root.
                await asyncio.to_thread(os.chmod, target, 0o555)
            except BaseException:
                await asyncio.to_thread(_remove, staging)
                raise
            self.last_used[target.name] = time.monotonic()
            log.info("volume materialised", manifest=digest[:12], tenant=tenant)
        return target

    async def _chunk(self, tenant: str, digest: str) -> bytes:
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            data = await self.fetch_blob(tenant, digest)
            self.fetched += 1
            if hashlib.sha256(data).hexdigest() == digest:
                return data
            log.warning("volume chunk damaged; fetching again", digest=digest[:12],
                        attempt=attempt)
        raise CorruptChunk(f"volume chunk {digest} arrived damaged {FETCH_ATTEMPTS} times",
                           field="volumes")

    async def _assemble(self, tenant: str, staging: Path, f: ManifestFile) -> None:
        path = staging / f.path
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        handle = await asyncio.to_thread(open, path, "xb")
        try:
            written = 0
            # A few chunks in flight at once (a link's latency, not its bandwidth, is
            # what one at a time would wait on), written in order.
            for start in range(0, len(f.chunks), PARALLEL_FETCHES):
                batch = await asyncio.gather(*(
                    self._chunk(tenant, d) for d in f.chunks[start:start + PARALLEL_FETCHES]))
                for data in batch:
                    await asyncio.to_thread(handle.write, data)
                    written += len(data)
        finally:
            await asyncio.to_thread(handle.close)
        if written != f.size:
            raise InstanceFailed(f"volume: {f.path} assembled to {written} bytes, its "
                                 f"manifest says {f.size}")
        await asyncio.to_thread(os.chmod, path, 0o555 if f.mode & 0o111 else 0o444)

    async def mount(self, launch: LaunchSpec, spec: agent_pb2.FunctionSpec) -> LaunchSpec:
        """`launch` with the function's volumes materialised and mounted read-only at
        their paths."""
        if not spec.volumes:
            return launch
        mounts = []
        for volume in spec.volumes:
            try:
                folder = await self.ensure(spec.tenant, volume.manifest_digest)
            except ThawError as exc:
                raise InstanceFailed(f"volume {volume.name} at {volume.path}: "
                                     f"{exc.message}") from exc
            mounts.append((str(folder), volume.path))
        self.holders.setdefault(launch.instance_id, set()).update(
            Path(host).name for host, _inside in mounts)
        return dataclasses.replace(launch, volumes=tuple(mounts))

    def release(self, holder: str) -> None:
        """The instance or build `holder` ended: its folders may be collected later."""
        now = time.monotonic()
        for name in self.holders.pop(holder, ()):
            self.last_used[name] = now

    async def collect(self, idle_seconds: float = IDLE_SECONDS) -> tuple[int, int]:
        """Remove the materialised folders no live instance or build holds and none
        has used for `idle_seconds` (a later start fetches them again); (folders,
        bytes) freed. Staging folders left by a crash go too."""
        held = {name for names in self.holders.values() for name in names}
        now = time.monotonic()
        chosen = []
        for entry in await asyncio.to_thread(_entries, self.root):
            name = entry.name
            if name.startswith("."):
                making = name[1:].split("-", 1)[0]
                if not self._making.get(making, asyncio.Lock()).locked():
                    chosen.append(entry)
            elif name not in self.last_used:
                # First seen (made before this agent started): its idle time starts now.
                self.last_used[name] = now
            elif name not in held and now - self.last_used[name] > idle_seconds \
                    and not self._making.get(name, asyncio.Lock()).locked():
                chosen.append(entry)
        freed = 0
        for entry in chosen:
            freed += await asyncio.to_thread(_remove, entry)
            self.last_used.pop(entry.name, None)
        if chosen:
            log.info("volumes collected", folders=len(chosen), bytes=freed)
        return len(chosen), freed


def _seal(root: Path) -> None:
    """Folders below `root` 0555 (files were set as written, `root` is set once in
    place): readable by every uid, writable by none but root."""
    for folder, _dirs, _files in os.walk(root):
        if Path(folder) != root:
            os.chmod(folder, 0o555)


def _entries(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _remove(path: Path) -> int:
    """Delete a (sealed) folder; the bytes its files held."""
    if not path.exists():
        return 0
    freed = 0
    for folder, _dirs, files in os.walk(path):
        os.chmod(folder, 0o755)
        for name in files:
            with contextlib.suppress(OSError):
                freed += os.lstat(os.path.join(folder, name)).st_size
    shutil.rmtree(path, ignore_errors=True)
    return freed


async def with_volumes(volumes: NodeVolumes | None, launch: LaunchSpec,
                       spec: agent_pb2.FunctionSpec, capabilities: RuntimeCapabilities
                       ) -> LaunchSpec:
    """`launch` with the function's volumes mounted (unchanged when it names none).
    Only a runtime that gives each instance a root of its own can show a folder at an
    arbitrary path: the sandboxed process runtime and docker."""
    if not spec.volumes:
        return launch
    if volumes is None or not (capabilities.uid_per_tenant or capabilities.runs_images):
        raise InstanceFailed("volumes: this node's runtime cannot mount volumes (the "
                             "process runtime mounts them in its sandbox, docker as binds)")
    return await volumes.mount(launch, spec)


# A chunk is at most 8 MiB; this leaves a slow link minutes for one.
FETCH_TIMEOUT = 300.0


def blob_fetcher(channel: grpc.aio.Channel) -> FetchBlob:
    """Chunks from the scheduler's Volumes service, over the agent's channel to it."""
    stub = volumes_pb2_grpc.VolumesStub(channel)

    async def fetch(tenant: str, digest: str) -> bytes:
        parts = []
        try:
            async for piece in stub.GetBlob(volumes_pb2.GetBlobRequest(
                    tenant=tenant, digest=digest), timeout=FETCH_TIMEOUT):
                parts.append(piece.data)
        except grpc.RpcError as exc:
            raise decode_error(exc) from exc
        return b"".join(parts)
    return fetch

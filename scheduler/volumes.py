"""Model volumes: a name per tenant with a current manifest of files made of chunks.

A manifest lists files (relative path, size, mode, chunk digests), sorted by path, as
canonical JSON (sorted keys, no spaces); its sha256 is the volume's manifest digest and
it is itself kept as one of the tenant's chunks, so that every manifest a function was
started with stays readable by digest while the volume moves on. A commit adds or
replaces files and makes a new manifest; nodes materialise a manifest by its digest
(platform/volumes.py) and the scheduler fills each start's and build's mounts with
the current digest (`fill_mounts`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Float, Integer, String, or_, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from thaw.core.errors import AlreadyExists, InvalidArgument, NotFound
from thaw.core.spec import NAME_PATTERN, FunctionSpec
from thaw.proto import agent_pb2
from thaw.scheduler.blobs import Blobs, check_digest
from thaw.scheduler.models import Base, Function, FunctionVersion
from thaw.scheduler.states import FunctionState, VersionState
from thaw.scheduler.store import Store, spec_from_json
from thaw.scheduler.tenancy import check_tenant_id

MAX_VOLUME_FILES = 100_000
MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255
# Chunks written since this long ago are kept by a collection even when no manifest
# names them: an upload in progress (a day is room for a slow one) has sent them and
# not committed yet, and a bundle redeployed soon after dedupes against them.
UPLOAD_GRACE_SECONDS = 86_400.0


class VolumeRow(Base):
    __tablename__ = "volumes"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    manifest_digest: Mapped[str] = mapped_column(String(64), default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    files: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class VolumeFile:
    path: str
    size: int
    mode: int
    chunks: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mode": self.mode,
                "chunks": list(self.chunks)}


@dataclass(frozen=True)
class Volume:
    tenant: str
    name: str
    manifest_digest: str
    size: int
    files: int
    created_at: float
    updated_at: float


def check_volume_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgument(f"{field} must be 1-63 lowercase letters, digits or '-', "
                              f"starting with a letter or digit; got {name!r}", field=field)
    return name


def check_file_path(path: str, field: str = "files.path") -> str:
    """A relative path that stays inside the volume: '/'-separated, no empty, '.' or
    '..' component, no NUL, bounded."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument("a file needs a path", field=field)
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(f"a path is at most {MAX_PATH_BYTES} bytes: {path[:80]!r}...",
                              field=field)
    parts = path.split("/")
    if path.startswith("/") or "\0" in path or "\\" in path or any(
            p in ("", ".", "..") or len(p.encode()) > MAX_NAME_BYTES for p in parts):
        raise InvalidArgument(f"unsafe path {path!r}: a relative path inside the volume, "
                              "without '.', '..' or empty parts", field=field)
    return path


def canonical(files: Iterable[VolumeFile]) -> bytes:
    """The manifest's bytes: files sorted by path, canonical JSON."""
    ordered = sorted(files, key=lambda f: f.path)
    return json.dumps({"files": [f.to_dict() for f in ordered]}, sort_keys=True,
                      separators=(",", ":")).encode()


def parse_manifest(data: bytes) -> list[VolumeFile]:
    raw = json.loads(data)
    return [VolumeFile(f["path"], int(f["size"]), int(f["mode"]), tuple(f["chunks"]))
            for f in raw["files"]]


def check_files(files: Sequence[VolumeFile], chunk_sizes: dict[str, int]) -> None:
    """Every file is safe, once, not both a file and a folder, and exactly the size of
    its chunks (every one of which the tenant holds: `chunk_sizes`)."""
    if len(files) > MAX_VOLUME_FILES:
        raise InvalidArgument(f"a volume holds at most {MAX_VOLUME_FILES} files",
                              field="files")
    paths = set()
    for f in files:
        check_file_path(f.path)
        if f.path in paths:
            raise InvalidArgument(f"{f.path!r} appears twice", field="files.path")
        paths.add(f.path)
        if f.size < 0 or not 0 <= f.mode <= 0o7777:
            raise InvalidArgument(f"{f.path!r}: bad size or mode", field="files")
        for digest in f.chunks:
            check_digest(digest, "files.chunks")
            if digest not in chunk_sizes:
                raise InvalidArgument(f"{f.path!r}: chunk {digest} was never uploaded "
                                      "(send the missing chunks first)", field="files.chunks")
        if sum(chunk_sizes[d] for d in f.chunks) != f.size:
            raise InvalidArgument(f"{f.path!r}: its chunks hold "
                                  f"{sum(chunk_sizes[d] for d in f.chunks)} bytes, not "
                                  f"{f.size}", field="files.size")
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in paths:
                raise InvalidArgument(f"{'/'.join(parts[:depth])!r} is a file and a folder",
                                      field="files.path")


def _volume(row: VolumeRow) -> Volume:
    return Volume(row.tenant_id, row.name, row.manifest_digest, row.size, row.files,
                  row.created_at, row.updated_at)


def mounts_of(spec: FunctionSpec) -> set[str]:
    return {m.volume for m in spec.volumes}


class Volumes:
    """The volumes of every tenant (DB rows) over the tenant's chunks (blobs.py)."""

    def __init__(self, store: Store, blobs: Blobs) -> None:
        self.store = store
        self.blobs = blobs

    def create(self, tenant: str, name: str) -> Volume:
        check_tenant_id(tenant)
        check_volume_name(name)
        now = time.time()

        def tx(s: Session) -> Volume:
            if s.get(VolumeRow, (tenant, name)) is not None:
                raise AlreadyExists(f"volume {name} exists", field="name")
            row = VolumeRow(tenant_id=tenant, name=name, manifest_digest="", size=0,
                            files=0, created_at=now, updated_at=now)
            s.add(row)
            return _volume(row)
        return self.store._tx(tx)

    def get(self, tenant: str, name: str) -> Volume:
        check_volume_name(name)

        def tx(s: Session) -> Volume:
            row = s.get(VolumeRow, (tenant, name))
            if row is None:
                raise NotFound(f"no volume {name} (thaw volume create {name})", field="volume")
            return _volume(row)
        return self.store._tx(tx)

    def all(self, tenant: str) -> list[Volume]:
        def tx(s: Session) -> list[Volume]:
            rows = s.scalars(select(VolumeRow).where(VolumeRow.tenant_id == tenant)
                             .order_by(VolumeRow.name))
            return [_volume(r) for r in rows]
        return self.store._tx(tx)

    def manifest(self, tenant: str, digest: str) -> list[VolumeFile]:
        """The files of the tenant's manifest `digest` ('' = an empty volume)."""
        if not digest:
            return []
        check_digest(digest)
        return parse_manifest(self.blobs.read(tenant, digest))

    def commit(self, tenant: str, name: str, files: Sequence[VolumeFile]) -> Volume:
        """Add or replace `files` (all of whose chunks the tenant holds) and make the
        result the volume's manifest."""
        current = self.get(tenant, name)
        merged = {f.path: f for f in self.manifest(tenant, current.manifest_digest)}
        for f in files:
            check_file_path(f.path)
        merged.update({f.path: f for f in files})
        every = list(merged.values())
        sizes = self.blobs.held(tenant, {d for f in every for d in f.chunks})
        check_files(every, sizes)
        data = canonical(every)
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.blobs.held(tenant, [digest]):
            self.blobs.disk.write(tenant, digest, data)
            self.blobs.record(tenant, digest, len(data))
        now = time.time()

        def tx(s: Session) -> Volume:
            row = s.get(VolumeRow, (tenant, name))
            if row is None:
                raise NotFound(f"no volume {name}", field="volume")
            if row.manifest_digest != current.manifest_digest:
                raise AlreadyExists(f"volume {name} changed during this commit: put again",
                                    field="volume")
            row.manifest_digest, row.size, row.files = digest, sum(f.size for f in every), \
                len(every)
            row.updated_at = now
            return _volume(row)
        made = self.store._tx(tx)
        self.collect_chunks(tenant)  # the chunks of files just replaced, past the grace
        return made

    def delete(self, tenant: str, name: str) -> Volume:
        """Remove a volume no function mounts (409 naming one that does), and the
        chunks of the tenant no other volume names (past the upload grace)."""
        volume = self.get(tenant, name)
        users = mounted_by(self.store, tenant, name)
        if users:
            raise AlreadyExists(f"volume {name} is mounted by function {users[0]}"
                                + (f" and {len(users) - 1} more" if len(users) > 1 else "")
                                + ": delete or redeploy it without the volume first",
                                field="volume")

        def tx(s: Session) -> None:
            row = s.get(VolumeRow, (tenant, name))
            if row is not None:
                s.delete(row)
        self.store._tx(tx)
        self.collect_chunks(tenant)
        return volume

    def collect_chunks(self, tenant: str, grace: float = UPLOAD_GRACE_SECONDS) -> int:
        """Remove the tenant's chunks no current volume manifest names and that were
        stored more than `grace` seconds ago (an upload in progress has sent them and
        not committed yet; a chunked bundle is kept in the bundle store once deployed);
        the bytes freed. Run after each commit, removal and chunked deploy."""
        keep: set[str] = set()
        for volume in self.all(tenant):
            if volume.manifest_digest:
                keep.add(volume.manifest_digest)
                keep.update(d for f in self.manifest(tenant, volume.manifest_digest)
                            for d in f.chunks)
        return self.blobs.forget(tenant, self.blobs.unreferenced(
            tenant, keep, time.time() - grace))


def mounted_by(store: Store, tenant: str, name: str) -> list[str]:
    """The functions of the tenant (not deleted) whose serving version, or a version
    building now, mounts volume `name`."""
    def tx(s: Session) -> list[str]:
        rows = s.execute(
            select(Function.name, FunctionVersion.spec_json)
            .join(FunctionVersion, FunctionVersion.function_id == Function.id)
            .where(Function.tenant_id == tenant,
                   Function.state != FunctionState.DELETED.value,
                   or_(FunctionVersion.version == Function.version,
                       FunctionVersion.state == VersionState.BUILDING.value)))
        return sorted({fn for fn, spec_json in rows
                       if name in mounts_of(spec_from_json(spec_json))})
    return store._tx(tx)


def current_digests(store: Store, tenant: str) -> dict[str, str]:
    """Volume name -> its current manifest digest, for one tenant."""
    def tx(s: Session) -> dict[str, str]:
        rows = s.execute(select(VolumeRow.name, VolumeRow.manifest_digest).where(
            VolumeRow.tenant_id == tenant))
        return {name: digest for name, digest in rows}
    return store._tx(tx)


def check_mounts(store: Store, tenant: str, spec: FunctionSpec) -> None:
    """A deploy naming a volume the tenant does not have is refused (400)."""
    if not spec.volumes:
        return
    have = current_digests(store, tenant)
    for mount in spec.volumes:
        if mount.volume not in have:
            raise InvalidArgument(f"[volumes] {mount.path!r} names volume "
                                  f"{mount.volume!r}, which does not exist (thaw volume "
                                  f"create {mount.volume})", field="volumes")


async def fill_mounts(store: Store, message: agent_pb2.FunctionSpec
                      ) -> agent_pb2.FunctionSpec:
    """`message` with each mount's manifest digest set to its volume's current one
    ('' for a volume gone or never filled: mounted empty). Starts and builds send it."""
    if message.volumes:
        current = await store.run(current_digests, store, message.tenant)
        for mount in message.volumes:
            mount.manifest_digest = current.get(mount.name, "")
    return message

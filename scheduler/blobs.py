"""Content-addressed chunks per tenant, on the scheduler's disk beside the bundle store.

A chunk is named by the sha256 of its bytes and kept once per tenant
(`<root>/<tenant>/<digest[:2]>/<digest>`), written to a temporary file, fsync'd and
renamed into place, so a crash leaves either the whole chunk or none. Which chunks a
tenant holds and their sizes are rows of the `blobs` table: "missing" is answered per
tenant (a tenant never learns whether another one holds a chunk), and the bytes a
tenant stores are summed from them against its storage quota (`storage_quotas`,
defaults below). Volumes (volumes.py) and bundles uploaded in chunks are made of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import BigInteger, Float, String, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from thaw.core.bundle import MAX_BUNDLE_BYTES
from thaw.core.errors import BundleTooLarge, InsufficientStorage, InvalidArgument, NotFound
from thaw.core.units import format_size
from thaw.scheduler.models import Base, Tenant
from thaw.scheduler.store import Store
from thaw.scheduler.tenancy import check_tenant_id

# One chunk travels in one gRPC message and one HTTP request: it stays far below
# core/grpcutil.py's MAX_MESSAGE_BYTES and the gateway's max_body_bytes default.
# ops/uploads.py's CHUNK_BYTES must not exceed it.
MAX_CHUNK_BYTES = 8 * 1024 * 1024
# Digests one "missing" question may name (about 270 KB of JSON).
MAX_DIGESTS_PER_CALL = 4096
DEFAULT_MAX_STORAGE_BYTES = 50 * 1024**3
# Bundles up to this size go in one request; past it they are uploaded as chunks,
# up to the tenant's max_bundle_bytes (whose default is this too).
DEFAULT_MAX_BUNDLE_BYTES = MAX_BUNDLE_BYTES
_DIGEST = re.compile(r"^[0-9a-f]{64}\Z")


class BlobRow(Base):
    """One chunk a tenant has stored."""

    __tablename__ = "blobs"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class StorageQuotaRow(Base):
    """A tenant's storage limits; a null column is the default."""

    __tablename__ = "storage_quotas"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_bundle_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


@dataclass(frozen=True)
class StorageUsage:
    """What a tenant stores and may store."""

    tenant: str
    stored_bytes: int
    max_storage_bytes: int
    max_bundle_bytes: int


def check_digest(digest: str, field: str = "digest") -> str:
    """`digest` if it is a sha256 in lower-case hex, else 400 naming `field`."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidArgument(f"{field} must be a sha256 in lower-case hex (64 characters)",
                              field=field)
    return digest


class ChunkDisk:
    """The chunk files: one folder per tenant, written whole or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, tenant: str, digest: str) -> Path:
        return self.root / tenant / digest[:2] / digest

    def exists(self, tenant: str, digest: str) -> bool:
        return self.path(tenant, digest).is_file()

    def write(self, tenant: str, digest: str, data: bytes) -> None:
        path = self.path(tenant, digest)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, tenant: str, digest: str) -> bytes:
        """The chunk's bytes, checked against its name (NotFound when gone or damaged)."""
        try:
            data = self.path(tenant, digest).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no chunk {digest}", field="digest") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise NotFound(f"chunk {digest} is damaged on the scheduler's disk: upload it "
                           "again", field="digest")
        return data

    def remove(self, tenant: str, digest: str) -> None:
        self.path(tenant, digest).unlink(missing_ok=True)


class Blobs:
    """Chunks per tenant: which are missing, storing one within the tenant's quota,
    reading one back, and the tenant's storage limits."""

    def __init__(self, store: Store, disk: ChunkDisk) -> None:
        self.store = store
        self.disk = disk

    def missing(self, tenant: str, digests: Sequence[str]) -> list[str]:
        """Those of `digests` the tenant has not stored (each once, in the order asked)."""
        check_tenant_id(tenant)
        if len(digests) > MAX_DIGESTS_PER_CALL:
            raise InvalidArgument(f"at most {MAX_DIGESTS_PER_CALL} digests per call",
                                  field="digests")
        wanted = list(dict.fromkeys(check_digest(d, "digests") for d in digests))
        held = self.held(tenant, wanted)
        return [d for d in wanted if d not in held or not self.disk.exists(tenant, d)]

    def held(self, tenant: str, digests: Iterable[str]) -> dict[str, int]:
        """Digest -> size of those of `digests` the tenant holds (by its rows)."""
        wanted = list(digests)

        def tx(s: Session) -> dict[str, int]:
            found: dict[str, int] = {}
            for start in range(0, len(wanted), 500):
                rows = s.execute(select(BlobRow.digest, BlobRow.size).where(
                    BlobRow.tenant_id == tenant,
                    BlobRow.digest.in_(wanted[start:start + 500])))
                found.update({d: int(n) for d, n in rows})
            return found
        return self.store._tx(tx)

    def put(self, tenant: str, digest: str, data: bytes) -> tuple[bool, int]:
        """Store a chunk whose bytes must hash to `digest`: (whether it was new, the
        tenant's bytes stored now). Past the tenant's max_storage_bytes, 507."""
        check_tenant_id(tenant)
        check_digest(digest)
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"a chunk is at most {format_size(MAX_CHUNK_BYTES)}",
                                  field="body")
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise InvalidArgument(f"the body's sha256 is {actual}, not {digest}: the chunk "
                                  "was damaged on its way or named wrongly", field="digest")
        usage = self.usage(tenant)
        if digest in self.held(tenant, [digest]):
            if not self.disk.exists(tenant, digest):
                self.disk.write(tenant, digest, data)  # its file was lost: written again
            return False, usage.stored_bytes
        if usage.stored_bytes + len(data) > usage.max_storage_bytes:
            raise InsufficientStorage(
                f"tenant {tenant} stores {format_size(usage.stored_bytes)}; this chunk "
                f"would pass its quota (max_storage_bytes="
                f"{format_size(usage.max_storage_bytes)}): remove volumes or ask the "
                "operator for more", field="max_storage_bytes")
        self.disk.write(tenant, digest, data)
        self.record(tenant, digest, len(data))
        return True, usage.stored_bytes + len(data)

    def record(self, tenant: str, digest: str, size: int) -> None:
        """The tenant's row for a chunk already on disk (kept if it exists)."""
        def tx(s: Session) -> None:
            if s.get(BlobRow, (tenant, digest)) is None:
                s.add(BlobRow(tenant_id=tenant, digest=digest, size=size,
                              created_at=time.time()))
        # The same chunk from a concurrent upload: one row is enough.
        with contextlib.suppress(IntegrityError):
            self.store._tx(tx)

    def read(self, tenant: str, digest: str) -> bytes:
        check_tenant_id(tenant)
        check_digest(digest)
        if digest not in self.held(tenant, [digest]):
            raise NotFound(f"no chunk {digest}", field="digest")
        return self.disk.read(tenant, digest)

    def forget(self, tenant: str, digests: Iterable[str]) -> int:
        """Remove chunks of the tenant (rows and files); the bytes freed."""
        wanted = list(digests)

        def tx(s: Session) -> int:
            freed = 0
            for digest in wanted:
                row = s.get(BlobRow, (tenant, digest))
                if row is not None:
                    freed += row.size
                    s.delete(row)
            return freed
        freed = self.store._tx(tx)
        for digest in wanted:
            self.disk.remove(tenant, digest)
        return freed

    def unreferenced(self, tenant: str, keep: set[str], older_than: float) -> list[str]:
        """The tenant's chunks not in `keep` stored before `older_than` (unix time)."""
        def tx(s: Session) -> list[str]:
            rows = s.execute(select(BlobRow.digest).where(
                BlobRow.tenant_id == tenant, BlobRow.created_at < older_than))
            return [d for (d,) in rows if d not in keep]
        return self.store._tx(tx)

    def usage(self, tenant: str) -> StorageUsage:
        def tx(s: Session) -> StorageUsage:
            stored = s.scalar(select(func.coalesce(func.sum(BlobRow.size), 0)).where(
                BlobRow.tenant_id == tenant))
            quota = s.get(StorageQuotaRow, tenant)
            return StorageUsage(
                tenant, int(stored or 0),
                DEFAULT_MAX_STORAGE_BYTES if quota is None or quota.max_storage_bytes is None
                else quota.max_storage_bytes,
                DEFAULT_MAX_BUNDLE_BYTES if quota is None or quota.max_bundle_bytes is None
                else quota.max_bundle_bytes)
        return self.store._tx(tx)

    def set_quota(self, tenant: str, max_storage_bytes: int | None,
                  max_bundle_bytes: int | None) -> StorageUsage:
        """Set both limits (None: the default)."""
        check_tenant_id(tenant)
        for name, value in (("max_storage_bytes", max_storage_bytes),
                            ("max_bundle_bytes", max_bundle_bytes)):
            if value is not None and value <= 0:
                raise InvalidArgument(f"{name} must be positive", field=name)

        def tx(s: Session) -> None:
            if s.get(Tenant, tenant) is None:
                raise NotFound(f"no tenant {tenant}", field="tenant")
            row = s.get(StorageQuotaRow, tenant)
            if row is None:
                row = StorageQuotaRow(tenant_id=tenant)
                s.add(row)
            row.max_storage_bytes = max_storage_bytes
            row.max_bundle_bytes = max_bundle_bytes
        self.store._tx(tx)
        return self.usage(tenant)


def max_bundle_bytes(store: Store, tenant: str) -> int:
    """The tenant's max_bundle_bytes (the default where none is set)."""
    def tx(s: Session) -> int:
        quota = s.get(StorageQuotaRow, tenant)
        if quota is None or quota.max_bundle_bytes is None:
            return DEFAULT_MAX_BUNDLE_BYTES
        return quota.max_bundle_bytes
    return store._tx(tx)


def check_bundle_size(store: Store, tenant: str, size: int) -> None:
    """A bundle past the tenant's max_bundle_bytes is refused (413, naming it), however
    it came (one request or chunks)."""
    limit = max_bundle_bytes(store, tenant)
    if size > limit:
        raise BundleTooLarge(f"the bundle is {format_size(size)}, past the tenant's quota "
                             f"(max_bundle_bytes={format_size(limit)})", field="bundle")

"""Output files: a bounded per-tenant store with a TTL, and the signed URLs that read it
(docs/function-api.md, "Files").

A file a handler returns is kept under `files_dir` (default THAW_HOME/files) as
`<tenant>/<id[:2]>/<id>` beside `<id>.json` (its media type, name, size and expiry),
where the id is the sha256 of its name, media type and bytes: the same output twice
is stored once, its expiry pushed back. Each tenant may keep `files_max_bytes` there
(quota_exceeded past it); expired files are removed by `sweep`, run periodically.

A URL names a file by a token, `b64url("{tenant}:{id}:{expires}").b64url(hmac)`,
signed with HMAC-SHA256 under a key kept in `files_dir/url.key` (made on first use,
0600; replicas that share files_dir share it). It is read without an API key; a
token whose signature does not match, or past its expiry, is refused (403).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from thaw.core.errors import NotFound, PermissionDenied, QuotaExceeded

KEY_FILE = "url.key"
KEY_BYTES = 32
_HEX = frozenset("0123456789abcdef")


class FileUrlRefused(PermissionDenied):
    """A file URL whose token is malformed, forged or expired (403)."""


class FilesQuotaExceeded(QuotaExceeded):
    """The tenant's output files fill its files_max_bytes (429): room comes back as
    their URLs expire and the sweep removes them."""

    retry_after = 60.0


@dataclass(frozen=True)
class SignedFile:
    """What a valid token names."""

    tenant: str
    file_id: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(folder: Path) -> bytes:
    """The URL signing key in `folder`, made (random, 0600) when there is none."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < KEY_BYTES:
            raise ValueError(f"{path} holds fewer than {KEY_BYTES} bytes") from None
        return key
    key = secrets.token_bytes(KEY_BYTES)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key


class FileSigner:
    """Signs and checks file-URL tokens; `clock` gives unix seconds."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"a file URL key has at least {KEY_BYTES} bytes")
        self._key = key
        self.clock = clock

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, b"thaw-file-url\x00" + payload, hashlib.sha256).digest()

    def sign(self, tenant: str, file_id: str, expires: int) -> str:
        payload = f"{tenant}:{file_id}:{expires}".encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str) -> SignedFile:
        """What the token names; raises FileUrlRefused for a malformed, forged or
        expired one (forged before expired: an expiry is only believed when signed)."""
        encoded, _, mac = token.partition(".")
        try:
            payload = _unb64(encoded)
            given = _unb64(mac)
        except (binascii.Error, ValueError):
            raise FileUrlRefused("this file URL is malformed", field="token") from None
        if not hmac.compare_digest(given, self._mac(payload)):
            raise FileUrlRefused("this file URL's signature does not match: it was not "
                                 "issued by this platform, or was altered", field="token")
        try:
            tenant, file_id, expires_text = payload.decode().split(":")
            expires = int(expires_text)
        except ValueError:
            raise FileUrlRefused("this file URL is malformed", field="token") from None
        if self.clock() >= expires:
            moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
            raise FileUrlRefused(f"this file URL expired at {moment}; call the function "
                                 "again for a new one", field="token")
        return SignedFile(tenant, file_id, expires)


@dataclass(frozen=True)
class StoredFile:
    """One stored file's description."""

    file_id: str
    name: str
    content_type: str
    size: int
    expires: float


class FileStore:
    """Output files on disk, per tenant, each kept until its expiry. Blocking: call
    from a worker thread (asyncio.to_thread)."""

    def __init__(self, root: Path, max_bytes_per_tenant: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.max_bytes = max_bytes_per_tenant
        self.clock = clock
        self._lock = threading.Lock()

    def _path(self, tenant: str, file_id: str) -> Path:
        if not file_id or not set(file_id) <= _HEX or "/" in tenant or tenant in ("", ".", ".."):
            raise NotFound("no such file", field="token")
        return self.root / tenant / file_id[:2] / file_id

    @staticmethod
    def file_id(data: bytes, content_type: str, name: str) -> str:
        digest = hashlib.sha256(f"{content_type}\x00{name}\x00".encode())
        digest.update(data)
        return digest.hexdigest()

    def put(self, tenant: str, data: bytes, content_type: str, name: str,
            ttl: float) -> StoredFile:
        """Store (or keep longer) one file; raises QuotaExceeded past the tenant's
        files_max_bytes."""
        file_id = self.file_id(data, content_type, name)
        path = self._path(tenant, file_id)
        expires = self.clock() + ttl
        with self._lock:
            known = self._meta(path)
            if known is None:
                used = self.used_bytes(tenant)
                if used + len(data) > self.max_bytes:
                    raise FilesQuotaExceeded(
                        f"the tenant's output files would hold {used + len(data)} bytes, "
                        f"past files_max_bytes ({self.max_bytes}); they are kept until "
                        "their URLs expire", field="output")
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _write_atomic(path, data)
            stored = StoredFile(file_id, name, content_type, len(data),
                                max(expires, known.expires if known else 0.0))
            _write_atomic(path.with_suffix(".json"), json.dumps({
                "name": name, "type": content_type, "size": len(data),
                "expires": stored.expires}).encode())
        return stored

    @staticmethod
    def _meta(path: Path) -> StoredFile | None:
        try:
            meta = json.loads(path.with_suffix(".json").read_bytes())
            return StoredFile(path.name, str(meta["name"]), str(meta["type"]),
                              int(meta["size"]), float(meta["expires"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def open(self, tenant: str, file_id: str) -> tuple[StoredFile, Path]:
        """A live file's description and path; NotFound once expired or removed."""
        path = self._path(tenant, file_id)
        meta = self._meta(path)
        if meta is None or meta.expires <= self.clock() or not path.is_file():
            raise NotFound("this file is no longer stored (its URL expired, or it was "
                           "collected)", field="token")
        return meta, path

    def read(self, tenant: str, file_id: str) -> tuple[StoredFile, bytes]:
        meta, path = self.open(tenant, file_id)
        return meta, path.read_bytes()

    def used_bytes(self, tenant: str) -> int:
        """Bytes the tenant's stored files hold (expired ones until swept)."""
        total = 0
        folder = self.root / tenant
        if not folder.is_dir():
            return 0
        for shard in os.scandir(folder):
            if shard.is_dir():
                total += sum(e.stat().st_size for e in os.scandir(shard.path)
                             if e.is_file() and not e.name.endswith((".json", ".tmp")))
        return total

    def sweep(self) -> int:
        """Remove every expired file; the number removed."""
        removed = 0
        now = self.clock()
        if not self.root.is_dir():
            return 0
        for tenant in os.scandir(self.root):
            if not tenant.is_dir():
                continue
            for shard in os.scandir(tenant.path):
                if not shard.is_dir():
                    continue
                for entry in os.scandir(shard.path):
                    if not entry.name.endswith(".json"):
                        continue
                    data = Path(entry.path).with_suffix("")
                    meta = self._meta(data)
                    if meta is not None and meta.expires > now:
                        continue
                    with self._lock:
                        for stale in (data, Path(entry.path)):
                            with contextlib.suppress(FileNotFoundError):
                                stale.unlink()
                    removed += 1
        return removed


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

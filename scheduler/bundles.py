"""Uploaded bundles, content-addressed on the scheduler's disk."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from thaw.core.errors import NotFound


def bundle_digest(data: bytes) -> str:
    """A bundle's content address: the sha256 of its bytes, hex (what `put` files it
    under and versions record)."""
    return hashlib.sha256(data).hexdigest()


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        digest = bundle_digest(data)
        path = self.root / f"{digest}.tar"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        return digest

    def get(self, digest: str) -> bytes:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise NotFound(f"no bundle {digest!r}", field="digest")
        try:
            return (self.root / f"{digest}.tar").read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no bundle {digest}", field="digest") from exc

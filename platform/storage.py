"""Is this node's storage writable? The agent's data directories (its home: chunks,
bundles, builds, logs; its shm folder: slices and restored arenas) are checked before
each heartbeat: free space by statvfs, a read-only mount by its flag, and a small write
probe (which also catches a directory the agent cannot write for other reasons). What
is wrong is reported as node conditions (scheduler: GET /v1/nodes, the node_storage
alert) and refused early on the node: a build or a chunk write answers 507
InsufficientStorage naming the node and the directory, instead of failing half way."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from thaw.core.errors import InsufficientStorage
from thaw.core.units import format_size
from thaw.proto import scheduler_pb2

DISK_FULL = "disk_full"
READ_ONLY = "read_only"
# The write probe's file: small, hidden, removed at once.
PROBE_NAME = ".thaw-write-probe"
PROBE_BYTES = b"thaw"
# Errors of the write probe that mean the directory is full or read-only; any other
# OSError counts as read-only too (nothing can be written there), with its text.
_FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT))


@dataclass(frozen=True)
class StorageCondition:
    """Something wrong with one data directory."""

    type: str
    """DISK_FULL or READ_ONLY."""
    path: str
    message: str
    free_bytes: int = 0
    total_bytes: int = 0

    def message_pb(self) -> scheduler_pb2.NodeCondition:
        return scheduler_pb2.NodeCondition(type=self.type, path=self.path,
                                           message=self.message, free_bytes=self.free_bytes,
                                           total_bytes=self.total_bytes)


def _probe(folder: Path) -> None:
    """Write, flush and remove a tiny file in `folder` (OSError when it cannot)."""
    path = folder / PROBE_NAME
    try:
        with path.open("wb") as f:
            f.write(PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class StorageHealth:
    """The conditions of the node's data directories, as of the last `check()`
    (blocking: call it off the event loop). `statvfs` and `probe` are injectable
    for tests."""

    def __init__(self, node_id: str, folders: Sequence[Path], min_free_bytes: int,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 probe: Callable[[Path], None] = _probe) -> None:
        self.node_id = node_id
        self.folders = list(folders)
        self.min_free_bytes = min_free_bytes
        self._statvfs = statvfs
        self._probe = probe
        self.conditions: list[StorageCondition] = []

    def check(self) -> list[StorageCondition]:
        found: list[StorageCondition] = []
        for folder in self.folders:
            condition = self._check_one(folder)
            if condition is not None:
                found.append(condition)
        self.conditions = found
        return found

    def _check_one(self, folder: Path) -> StorageCondition | None:
        try:
            st = self._statvfs(str(folder))
        except OSError as exc:
            return StorageCondition(READ_ONLY, str(folder), f"cannot stat it: {exc}")
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        if st.f_flag & os.ST_RDONLY:
            return StorageCondition(READ_ONLY, str(folder), "mounted read-only", free, total)
        if free < self.min_free_bytes:
            return StorageCondition(
                DISK_FULL, str(folder),
                f"{format_size(free)} free of {format_size(total)} (below "
                f"storage_min_free {format_size(self.min_free_bytes)})", free, total)
        try:
            self._probe(folder)
        except OSError as exc:
            kind = DISK_FULL if exc.errno in _FULL_ERRNOS else READ_ONLY
            return StorageCondition(kind, str(folder),
                                    f"a test write failed: {exc.strerror or exc}",
                                    free, total)
        return None

    def refuse_writes(self, what: str) -> None:
        """InsufficientStorage (507) for `what` while a data directory is full or
        read-only; the error names the node and the directory."""
        if not self.conditions:
            return
        c = self.conditions[0]
        raise InsufficientStorage(
            f"insufficient storage on node {self.node_id}: {c.path} is "
            f"{c.type.replace('_', '-')} ({c.message}); {what} refused", field="node")

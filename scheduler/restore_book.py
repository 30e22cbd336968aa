"""What the scheduler remembers of failed restores, per snapshot: which node failed
and how. A snapshot is quarantined only for its own faults (docs/gpu.md, "Snapshot
compatibility"): bytes that do not match their digests, a fingerprint no node can
run, or a restore that fails the same way on two different nodes. Anything else
sends the start to another node (or makes it wait) and blames no snapshot.

A record is kept for RESTORE_FAILURE_MEMORY_SECONDS: a snapshot's own fault shows
again at once (every start tries it), while a node's passing trouble is forgotten and
that node restores the snapshot again. In memory only: after a scheduler restart a
snapshot starts with a clean record, which costs at most one more failed restore per
node before the same verdict.
"""

from __future__ import annotations

import enum
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter

from thaw.core.errors import (
    ChunkNotFound,
    CorruptChunk,
    FingerprintMismatch,
    ImageNotOnNode,
    NodeFault,
    OutOfMemory,
    RestoreFailed,
    SnapshotError,
    ThawError,
    Unavailable,
)

# Snapshots whose failures are remembered; the oldest record goes first past it. A
# record is dropped anyway once its snapshot restores or is quarantined.
RESTORE_BOOK_CAPACITY = 4096
# How long a failed restore counts against a snapshot (and keeps that node from being
# tried first for it): long enough that the next cold starts see it, short enough
# that a node's upgrade or recovery is tried again the same hour.
RESTORE_FAILURE_MEMORY_SECONDS = 600.0


class Fault(str, enum.Enum):
    """Whose fault a failed restore is, as far as the scheduler can tell."""

    SNAPSHOT = "snapshot"
    """Proven the snapshot's own: corrupt bytes, or taken of another version."""
    FINGERPRINT = "fingerprint"
    """The snapshot does not fit that node (environment, GPU family, driver)."""
    UNKNOWN = "unknown"
    """The restore failed on that node; a second node decides."""
    NODE = "node"
    """The node's trouble: no free slice, a device or driver error, unreachable."""
    CHUNKS = "chunks"
    """The snapshot's chunks are out of reach (their nodes are down)."""


def fault_of(exc: BaseException) -> Fault | None:
    """The fault a start's error stands for; None for an error that is no restore
    failure (the caller lets it through)."""
    if isinstance(exc, CorruptChunk):
        return Fault.SNAPSHOT
    if isinstance(exc, FingerprintMismatch):
        # A snapshot of another version fails so on every node.
        return Fault.SNAPSHOT if exc.field == "fingerprint.function_version" else \
            Fault.FINGERPRINT
    if isinstance(exc, (RestoreFailed, SnapshotError)):
        # A plain SnapshotError comes from an agent that does not classify: unknown.
        return Fault.UNKNOWN
    if isinstance(exc, ChunkNotFound):
        return Fault.CHUNKS
    if isinstance(exc, (NodeFault, OutOfMemory, Unavailable, ImageNotOnNode)):
        return Fault.NODE
    return None


# What differs between two nodes failing the same way: their names, paths (sockets,
# logs, mounts), addresses, process ids and other numbers (sizes, times, offsets).
_PATH = re.compile(r"(?<![\w.])/[^\s:;,'\")]+")
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")
_UUIDISH = re.compile(r"\b[0-9a-f]{8,}\b")
_NUMBER = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")


def failure_signature(exc: ThawError, node_id: str = "") -> str:
    """The error's code and message with node-specific parts removed, so that the same
    failure on two nodes reads the same."""
    text = exc.message
    if node_id:
        text = re.sub(rf"(?<![\w.-]){re.escape(node_id)}(?![\w-])", "<node>", text)
    text = _PATH.sub("<path>", text)
    text = _HEX.sub("<addr>", text)
    text = _UUIDISH.sub("<id>", text)
    text = _NUMBER.sub("#", text)
    return f"{exc.code}: {_SPACE.sub(' ', text).strip()}"


class RestoreBook:
    """Per snapshot, the nodes whose restore failed in a way that may be the
    snapshot's (a fingerprint refusal or an unknown failure) and how; plus the
    Prometheus count of every failed restore by fault."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 capacity: int = RESTORE_BOOK_CAPACITY,
                 clock: Callable[[], float] = time.monotonic,
                 memory_seconds: float = RESTORE_FAILURE_MEMORY_SECONDS) -> None:
        self._failed: OrderedDict[str, dict[str, tuple[Fault, str, float]]] = OrderedDict()
        self._capacity = capacity
        self._clock = clock
        self._memory = memory_seconds
        self.registry = registry or CollectorRegistry()
        self.failures = Counter(
            "thaw_restore_failures_total",
            "Failed snapshot restores, by whose fault (snapshot, fingerprint, unknown, "
            "node, chunks) and whether the snapshot was quarantined for it",
            ["fault", "quarantined"], registry=self.registry)

    def count(self, fault: Fault, quarantined: bool) -> None:
        self.failures.labels(fault.value, "true" if quarantined else "false").inc()

    def record(self, snapshot_id: str, node_id: str, fault: Fault, signature: str
               ) -> str | None:
        """Remember that `node_id` failed to restore the snapshot so; returns another
        node that failed the same way (same fault and signature), if any."""
        nodes = self._recent(snapshot_id)
        self._failed.pop(snapshot_id, None)
        same = next((other for other, (f, sig, _at) in nodes.items()
                     if other != node_id and (f, sig) == (fault, signature)), None)
        nodes[node_id] = (fault, signature, self._clock())
        self._failed[snapshot_id] = nodes
        while len(self._failed) > self._capacity:
            self._failed.popitem(last=False)
        return same

    def failed_nodes(self, snapshot_id: str) -> dict[str, str]:
        """Nodes that failed to restore the snapshot -> the signature of how."""
        return {node: signature for node, (_fault, signature, _at)
                in self._recent(snapshot_id).items()}

    def refused_by_all(self, snapshot_id: str, node_ids: Iterable[str]) -> bool:
        """Has every one of `node_ids` (at least one) refused the snapshot's
        fingerprint?"""
        refused = {node for node, (fault, _sig, _at) in self._recent(snapshot_id).items()
                   if fault is Fault.FINGERPRINT}
        wanted = set(node_ids)
        return bool(wanted) and wanted <= refused

    def _recent(self, snapshot_id: str) -> dict[str, tuple[Fault, str, float]]:
        """The snapshot's records younger than the memory, the older ones dropped."""
        since = self._clock() - self._memory
        nodes = {node: seen for node, seen in self._failed.get(snapshot_id, {}).items()
                 if seen[2] >= since}
        if snapshot_id in self._failed:
            self._failed[snapshot_id] = nodes
        return nodes

    def forget(self, snapshot_id: str) -> None:
        """The snapshot restored somewhere (so it restores), or is quarantined."""
        self._failed.pop(snapshot_id, None)

"""Healing a node's corrupt copy of a chunk: a restore that finds a chunk whose bytes
no longer match their digest (a disk fault, a bad write) drops this node's copy and
fetches the chunk again from a peer holding it, so the restore can go on. Only when no
peer has a good copy does the corruption reach the scheduler, which quarantines the
snapshot and rebuilds it from the function's bundle (scheduler/reconcile.py)."""

from __future__ import annotations

import asyncio
import re

import structlog

from thaw.core.errors import CorruptChunk, ThawError
from thaw.platform.peers import PeerChunks
from thaw.platform.snapshots import NodeSnapshots, all_refs
from thaw.proto import manifest_pb2

log = structlog.get_logger()
# How blobstore's CorruptChunk names the chunk (blobstore/chunks.py, disk.py, pinned.py).
# A digest is "b3:<hex>" (BLAKE3) or a bare hex SHA-256 (chunks written before BLAKE3).
_CHUNK = re.compile(r"\bchunk ((?:b3:)?[0-9a-f]{16,128})\b")


def corrupt_digest(exc: CorruptChunk, manifest: manifest_pb2.SnapshotManifest) -> str | None:
    """The digest of the snapshot's chunk the error says is corrupt, if it names one."""
    found = _CHUNK.search(exc.message)
    if found is None:
        return None
    digest = found.group(1)
    return digest if any(r.digest == digest for r in all_refs(manifest)) else None


async def refetch_corrupt(snapshots: NodeSnapshots, chunks: PeerChunks,
                          manifest: manifest_pb2.SnapshotManifest, peers: list[str],
                          exc: CorruptChunk, node_id: str) -> str | None:
    """Drop this node's corrupt copy of the chunk `exc` names and fetch it again from
    `peers` (each copy verified against its digest on arrival). Returns a line saying
    what was repaired, or None when nothing could be: no chunk named, no peer, or no
    peer with a good copy (the caller raises `exc` then)."""
    digest = corrupt_digest(exc, manifest)
    if digest is None or not peers:
        return None

    def drop() -> int:
        freed = snapshots.disk.delete(digest)
        snapshots.pinned.evict([digest])
        snapshots.drop(manifest)  # nothing materialized from the bad bytes stays
        return freed

    await asyncio.to_thread(drop)
    try:
        fetched = await chunks.ensure(manifest, peers)
    except ThawError as fetch_error:
        log.warning("corrupt chunk not fetched again", chunk=digest, node=node_id,
                    function=manifest.function, error=str(fetch_error))
        return None
    log.warning("corrupt chunk fetched again from a peer", chunk=digest, node=node_id,
                function=manifest.function, bytes=fetched)
    return (f"chunk {digest} of {manifest.function}'s snapshot was corrupt on node "
            f"{node_id}; fetched again from a peer ({fetched} bytes)")

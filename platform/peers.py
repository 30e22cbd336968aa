"""Peer fetch: a node missing a snapshot's chunks streams them from another node's
agent (Agent.FetchChunks), verifies each against its digest and keeps it on disk."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import structlog

from thaw.blobstore.chunks import matches
from thaw.core.errors import ChunkNotFound, CorruptChunk, ThawError
from thaw.core.grpcutil import decode_error, secure_channel
from thaw.core.pki import AGENT, Identity
from thaw.platform.snapshots import NodeSnapshots, all_refs
from thaw.proto import agent_pb2, agent_pb2_grpc, manifest_pb2

log = structlog.get_logger()
# A fetch of a whole snapshot from one peer; large models take a while on slow links.
FETCH_TIMEOUT_SECONDS = 600.0


class PeerChunks:
    """Fetches from other agents over one mutual-TLS channel per peer, presenting this
    agent's certificate (`tls`; None: plaintext, which a TLS agent refuses)."""

    def __init__(self, snapshots: NodeSnapshots, tls: Identity | None = None) -> None:
        self.snapshots = snapshots
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lock = asyncio.Lock()

    def _stub(self, address: str) -> agent_pb2_grpc.AgentStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = secure_channel(address, self.tls, AGENT)
            self._channels[address] = channel
        return agent_pb2_grpc.AgentStub(channel)

    def missing(self, manifest: manifest_pb2.SnapshotManifest) -> list[str]:
        disk, pinned = self.snapshots.disk, self.snapshots.pinned
        seen: set[str] = set()
        out = []
        for ref in all_refs(manifest):
            if ref.digest not in seen and not (pinned.has(ref.digest) or disk.has(ref.digest)):
                out.append(ref.digest)
            seen.add(ref.digest)
        return out

    async def ensure(self, manifest: manifest_pb2.SnapshotManifest, peers: list[str]) -> int:
        """Fetch what this node lacks from `peers` in order; returns bytes fetched."""
        async with self._lock:  # one fetch of a given chunk at a time
            wanted = await asyncio.to_thread(self.missing, manifest)
            if not wanted:
                return 0
            fetched = 0
            for peer in peers:
                try:
                    fetched += await self._fetch_from(peer, wanted)
                except ThawError as exc:
                    log.warning("peer fetch failed", peer=peer, error=str(exc))
                wanted = await asyncio.to_thread(self.missing, manifest)
                if not wanted:
                    log.info("chunks fetched from peers", bytes=fetched, snapshot=manifest.function)
                    return fetched
            raise ChunkNotFound(f"{len(wanted)} chunk(s) of {manifest.function}'s snapshot are "
                                f"on no reachable node (first: {wanted[0]})")

    async def _fetch_from(self, peer: str, digests: list[str]) -> int:
        disk = self.snapshots.disk
        total = 0
        call = self._stub(peer).FetchChunks(agent_pb2.FetchChunksRequest(digests=digests),
                                            timeout=FETCH_TIMEOUT_SECONDS)
        try:
            async for piece in call:
                # Checked by the digest's own algorithm (BLAKE3, or SHA-256 for chunks
                # of snapshots stored before it) and kept under that very name.
                if not matches(piece.digest, piece.data):
                    raise CorruptChunk(f"peer {peer} sent corrupt bytes for chunk {piece.digest}")
                await asyncio.to_thread(disk.put, piece.data, piece.digest)
                total += len(piece.data)
        except grpc.RpcError as exc:
            raise decode_error(exc) from exc
        return total

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def read_chunks(snapshots: NodeSnapshots, digests: list[str]) -> Iterator[tuple[str, bytes]]:
    """This node's side of a peer fetch: verified raw bytes, from memory or disk."""
    for digest in digests:
        if snapshots.pinned.has(digest):
            try:
                yield digest, snapshots.pinned.get(digest)
                continue
            except ChunkNotFound:
                pass  # evicted meanwhile
        yield digest, snapshots.disk.get(digest)

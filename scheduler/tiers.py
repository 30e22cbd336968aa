"""Where snapshots are held: which nodes' disk tiers hold a snapshot's chunks, moving
it into or out of nodes' pinned (host-memory) tiers, the prewarm policy after a
restore, and garbage collection of what no kept version uses."""

from __future__ import annotations

import structlog
from cachetools import LRUCache

from thaw.core.errors import FunctionUnavailable, NotFound, ThawError
from thaw.proto import manifest_pb2
from thaw.scheduler.nodes import NodeView
from thaw.scheduler.plane_state import PlaneState
from thaw.scheduler.states import NodeState, SnapshotState
from thaw.scheduler.store import FunctionRecord
from thaw.snapshotter.manifest import manifest_key

log = structlog.get_logger()

# Input schemas by snapshot id: a function's record is read far more often than a
# manifest changes (never, once ready), and a manifest is worth parsing once.
_SCHEMAS: LRUCache[str, str] = LRUCache(maxsize=4096)


class Tiers:
    def __init__(self, state: PlaneState) -> None:
        self.s = state

    async def snapshot_of(self, tenant: str, name: str
                          ) -> tuple[FunctionRecord, str, manifest_pb2.SnapshotManifest]:
        store = self.s.store
        fn = await store.run(store.get_function, tenant, name)
        if not fn.snapshot_id:
            raise FunctionUnavailable(
                f"{tenant}/{name} has no snapshot ({fn.reason or fn.state.value})")
        snap = await store.run(store.get_snapshot, fn.snapshot_id)
        if snap.state is not SnapshotState.READY or not snap.manifest:
            raise FunctionUnavailable(f"{tenant}/{name}'s snapshot is {snap.state.value}")
        self.s.holders.setdefault(snap.id, {snap.node_id})
        return fn, snap.id, manifest_pb2.SnapshotManifest.FromString(snap.manifest)

    def targets(self, snapshot_id: str, node_id: str) -> list[NodeView]:
        """`node_id`'s node, or ("") every live node holding the snapshot."""
        nodes = self.s.nodes
        if node_id:
            node = nodes.get(node_id)
            if node is None:
                raise NotFound(f"no node {node_id!r}", field="node_id")
            return [node]
        return [nodes[h] for h in sorted(self.s.holders.get(snapshot_id, ()))
                if h in nodes and nodes[h].state is not NodeState.LOST]

    def keep_pinned(self, node: NodeView, manifest: manifest_pb2.SnapshotManifest) -> None:
        """Prewarm policy: a snapshot restored on a node is kept in that node's pinned
        tier, so its next cold start there copies from host memory only. Nobody waits
        on it: the node runs it once its calls in flight (the restored instance's
        first among them) have ended, at background priority. The tier is
        LRU within its capacity, so what stays is what was used most recently; under
        memory pressure the pressure states evict (see pressure.py)."""
        key = manifest_key(manifest)
        if key in node.pinned.snapshot_keys or key in node.prewarming:
            return
        node.prewarming.add(key)

        async def prewarm() -> None:
            try:
                await node.client.prewarm(manifest, [], background=True)
                node.pin(key)
            except ThawError as exc:  # e.g. bigger than the tier: stays on disk
                log.info("snapshot not kept in pinned memory", node=node.id,
                         snapshot=manifest.function, reason=str(exc))
            finally:
                node.prewarming.discard(key)

        self.s.spawn(prewarm())

    async def prewarm(self, tenant: str, name: str, node_id: str = ""
                      ) -> tuple[list[str], int, float]:
        """Move a function's snapshot into nodes' pinned tiers (no GPU memory)."""
        _fn, snap_id, manifest = await self.snapshot_of(tenant, name)
        targets = self.targets(snap_id, node_id)
        holders = self.s.holders[snap_id]
        nodes = self.s.nodes
        total, seconds = 0, 0.0
        for node in targets:
            peers = [nodes[h].control_address for h in sorted(holders)
                     if h != node.id and h in nodes]
            resp = await node.client.prewarm(manifest, peers)
            holders.add(node.id)
            total += resp.bytes
            seconds = max(seconds, resp.seconds)
            key = manifest_key(manifest)
            node.pin(key)
        log.info("snapshot prewarmed", function=f"{tenant}/{name}",
                 nodes=[n.id for n in targets], bytes=total)
        return [n.id for n in targets], total, seconds

    async def evict(self, tenant: str, name: str, node_id: str = "") -> tuple[list[str], int]:
        _fn, snap_id, manifest = await self.snapshot_of(tenant, name)
        targets = self.targets(snap_id, node_id)
        total = 0
        key = manifest_key(manifest)
        for node in targets:
            total += (await node.client.evict(manifest)).bytes
            node.unpin(key)
        log.info("snapshot evicted", function=f"{tenant}/{name}",
                 nodes=[n.id for n in targets], bytes=total)
        return [n.id for n in targets], total

    async def snapshot_bytes(self, fn: FunctionRecord) -> int:
        return (await self.snapshot_facts(fn))[0]

    async def snapshot_facts(self, fn: FunctionRecord) -> tuple[int, str]:
        """The active snapshot's stored bytes and the input schema its build read
        (docs/function-api.md; "" for none), from one read of its record."""
        if not fn.snapshot_id:
            return 0, ""
        store = self.s.store
        snap = await store.run(store.get_snapshot, fn.snapshot_id)
        schema = _SCHEMAS.get(snap.id)
        if schema is None:
            schema = (manifest_pb2.SnapshotManifest.FromString(snap.manifest).input_schema
                      if snap.state is SnapshotState.READY and snap.manifest else "")
            if snap.state is SnapshotState.READY:
                _SCHEMAS[snap.id] = schema  # a ready snapshot's manifest never changes
        return snap.stored_bytes, schema

    async def snapshot_tiers(self, fn: FunctionRecord) -> tuple[list[str], list[str]]:
        """(nodes whose disk tier holds the active snapshot, nodes whose pinned tier
        holds it), for the dashboard."""
        if not fn.snapshot_id:
            return [], []
        snap = await self.s.store.run(self.s.store.get_snapshot, fn.snapshot_id)
        if snap.state is not SnapshotState.READY or not snap.manifest:
            return [], []
        key = manifest_key(manifest_pb2.SnapshotManifest.FromString(snap.manifest))
        live = {n.id: n for n in self.s.live_nodes()}
        disk = sorted(h for h in self.s.holders.get(snap.id, {snap.node_id}) if h in live)
        pinned = sorted(i for i, n in live.items() if key in n.pinned.snapshot_keys)
        return disk, pinned

    async def kept_manifests(self) -> list[manifest_pb2.SnapshotManifest]:
        """The snapshots nodes must keep: current functions' and, for rollbacks, those
        of the last RETAINED_VERSIONS versions (the others are marked collected)."""
        store = self.s.store
        manifests = await store.run(store.live_manifests)
        for m in await store.run(self.s.versions.retained_manifests):
            if m not in manifests:
                manifests.append(m)
        return [manifest_pb2.SnapshotManifest.FromString(m) for m in manifests]

    async def collect_garbage(self) -> int:
        """Tell every node which snapshots are still in use; the rest of their chunks,
        templates and host-memory copies go. Skipped while a build is writing chunks
        that no manifest names yet."""
        if self.s.builds:
            return 0
        keep = await self.kept_manifests()
        freed = 0
        for node in self.s.live_nodes():
            try:
                freed += (await node.client.collect_garbage(keep)).freed_bytes
            except ThawError as exc:
                log.warning("garbage collection failed", node=node.id, error=str(exc))
        log.info("garbage collected", freed_bytes=freed, kept_snapshots=len(keep))
        return freed

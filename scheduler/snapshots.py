"""Operator views and passes over snapshots and nodes: where a tenant's snapshots are
held, prewarm and verify with each node's progress, and draining a node. Built on the
ControlPlane's state (nodes, holders, pools); the gRPC edge is service.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog

from thaw.core.errors import NotFound, ThawError
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.scheduler.control import ControlPlane
from thaw.scheduler.states import InstanceState, NodeState
from thaw.scheduler.store import FunctionRecord
from thaw.snapshotter.manifest import manifest_key

log = structlog.get_logger()

PASSES = ("prewarm", "verify")


def _distinct_chunks(manifest: manifest_pb2.SnapshotManifest) -> int:
    return len({c.digest for arena in (manifest.pickle, manifest.host, manifest.device)
                for c in arena.chunks})


async def snapshot_info(control: ControlPlane, fn: FunctionRecord,
                        with_manifest: bool = False) -> scheduler_pb2.SnapshotInfo | None:
    """The function's current snapshot, or None if it has none (fresh starts)."""
    if not fn.snapshot_id:
        return None
    store = control.store
    snap = await store.run(store.get_snapshot, fn.snapshot_id)
    info = scheduler_pb2.SnapshotInfo(
        function=f"{fn.tenant}/{fn.name}", version=str(snap.version), snapshot_id=snap.id,
        state=snap.state.value, stored_bytes=snap.stored_bytes)
    if not snap.manifest:
        return info
    manifest = manifest_pb2.SnapshotManifest.FromString(snap.manifest)
    key = manifest_key(manifest)
    info.raw_bytes = manifest.pickle.size + manifest.host.size + manifest.device.size
    info.chunks = _distinct_chunks(manifest)
    holders = control.holders.get(snap.id) or {snap.node_id}
    info.disk_nodes.extend(sorted(h for h in holders if h))
    info.pinned_nodes.extend(sorted(n.id for n in control.nodes.values()
                                    if key in n.pinned.snapshot_keys))
    if with_manifest:
        info.manifest.CopyFrom(manifest)
    return info


async def list_snapshots(control: ControlPlane, tenant: str
                         ) -> list[scheduler_pb2.SnapshotInfo]:
    found = []
    for fn in await control.list_functions(tenant):
        info = await snapshot_info(control, fn)
        if info is not None:
            found.append(info)
    return found


async def get_snapshot(control: ControlPlane, tenant: str, name: str
                       ) -> scheduler_pb2.SnapshotInfo:
    fn = await control.get_function(tenant, name)
    info = await snapshot_info(control, fn, with_manifest=True)
    if info is None:
        raise NotFound(f"{tenant}/{name} has no snapshot ({fn.reason or fn.state.value})",
                       field="name")
    return info


async def snapshot_pass(control: ControlPlane, kind: str, tenant: str, name: str,
                        node_id: str = "") -> AsyncIterator[agent_pb2.SnapshotProgress]:
    """Prewarm or verify on each node holding the snapshot (or `node_id`), one after
    another, passing on their progress. A node that fails ends with `error` set; the
    others still run."""
    _fn, snap_id, manifest = await control.tiers.snapshot_of(tenant, name)
    targets = control.tiers.targets(snap_id, node_id)
    holders = control.holders[snap_id]
    key = manifest_key(manifest)
    for node in targets:
        peers = [control.nodes[h].control_address for h in sorted(holders)
                 if h != node.id and h in control.nodes]
        last: agent_pb2.SnapshotProgress | None = None
        try:
            async for message in node.client.snapshot_pass(kind, manifest, peers):
                message.node_id = node.id
                last = message
                yield message
        except ThawError as exc:
            yield agent_pb2.SnapshotProgress(node_id=node.id, finished=True,
                                             error=exc.message)
            continue
        if kind == "prewarm" and last is not None and last.finished and not last.error:
            holders.add(node.id)
            node.pin(key)
        if last is not None:
            log.info(f"snapshot {kind} done", function=f"{tenant}/{name}", node=node.id,
                     bytes=last.done_bytes, bad=len(last.bad), error=last.error)


async def drain(control: ControlPlane, node_id: str) -> scheduler_pb2.DrainResponse:
    """Cordon the node, stop its idle instances now and retire the busy ones when
    their calls end (release stops a STOPPING instance). Repeating it is harmless."""
    node = control.nodes.get(node_id)
    if node is None:
        raise NotFound(f"no node {node_id!r}", field="node_id")
    if node.state is NodeState.READY:
        await control.cordon(node_id, True)
    stopped = finishing = 0
    for pool in list(control.pools.values()):
        for inst in list(pool.instances.values()):
            if inst.node_id != node_id or inst.gone:
                continue
            if inst.idle:
                await control.instances.stop(pool, inst, f"node {node_id} drained")
                stopped += 1
            else:
                # Serving: retired by release once its calls end. A start in flight
                # is left to finish; the next drain call (the CLI repeats it while
                # it waits) stops it once idle.
                if inst.ready:
                    inst.move(InstanceState.STOPPING, f"node {node_id} draining")
                finishing += 1
    log.info("node draining", node=node_id, stopped=stopped, finishing=finishing)
    return scheduler_pb2.DrainResponse(stopped=stopped, finishing=finishing)

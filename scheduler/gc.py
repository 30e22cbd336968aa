"""Garbage collection across the nodes: what each node must keep, asked of every
live node on a schedule (`gc_interval`) and on demand (`thaw node gc`), with the
bytes each node freed in the event log.

The scheduler knows what is live, so it says what to keep: the snapshots of the
versions it keeps (tiers.py `kept_manifests`) and the bundles of those versions, of
versions building and of instances still running (a deleted function's instance
finishing its calls). The node collects everything else of those kinds and also its
own leftovers (unpack folders, build outputs, old logs: platform/gc.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, cast

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from thaw.core.errors import NotFound, ThawError
from thaw.proto import agent_pb2, scheduler_pb2
from thaw.scheduler import models
from thaw.scheduler.events import EventKind
from thaw.scheduler.nodes import NodeView
from thaw.scheduler.plane_state import PlaneState
from thaw.scheduler.states import FunctionState, NodeState, VersionState
from thaw.scheduler.store import Store
from thaw.scheduler.tiers import Tiers
from thaw.scheduler.versions import RETAINED_VERSIONS

log = structlog.get_logger()

# The event kind of a node's collection (scheduler/events.py EventKind).
GARBAGE_COLLECTED = "garbage_collected"
# One node's collection walks its bundles, builds and logs and deletes what goes.
NODE_GC_TIMEOUT_SECONDS = 600.0


class GarbageClient(Protocol):
    """The agent call a collection makes (scheduler/nodes.py AgentClient.collect)."""

    async def collect(self, request: agent_pb2.CollectGarbageRequest,
                      timeout: float) -> agent_pb2.CollectGarbageResponse: ...


@dataclass(frozen=True)
class VersionRow:
    """One version of a function, as the keep rule needs it."""

    function_id: str
    deleted: bool
    """The function is deleted."""
    active_version: int
    version: int
    state: str
    digest: str


def bundles_to_keep(rows: Iterable[VersionRow], running: Iterable[tuple[str, int]],
                    retained: int = RETAINED_VERSIONS) -> set[str]:
    """Digests of the bundles nodes keep: per function not deleted, the active
    version's, those of versions building and of the `retained` most recent other
    ready versions (the ones whose snapshots stay, for rollbacks); and, deleted or
    not, every version in `running` ((function id, version) of a live instance or a
    build in flight)."""
    live = set(running)
    keep: set[str] = set()
    by_function: dict[str, list[VersionRow]] = {}
    for row in rows:
        by_function.setdefault(row.function_id, []).append(row)
    for versions in by_function.values():
        others = 0
        for row in sorted(versions, key=lambda r: -r.version):
            if (row.function_id, row.version) in live:
                keep.add(row.digest)
            elif row.deleted:
                continue
            elif row.version == row.active_version or row.state == VersionState.BUILDING.value:
                keep.add(row.digest)
            elif row.state == VersionState.READY.value:
                others += 1
                if others <= retained:
                    keep.add(row.digest)
    return keep


def version_rows(store: Store) -> list[VersionRow]:
    """Every version of every function, with its function's state."""
    def tx(s: Session) -> list[VersionRow]:
        rows = s.execute(
            select(models.FunctionVersion.function_id, models.Function.state,
                   models.Function.version, models.FunctionVersion.version,
                   models.FunctionVersion.state, models.FunctionVersion.bundle_digest)
            .join(models.Function, models.Function.id == models.FunctionVersion.function_id))
        return [VersionRow(fn_id, fn_state == FunctionState.DELETED.value, active,
                           version, state, digest)
                for fn_id, fn_state, active, version, state, digest in rows]
    return store._tx(tx)


def running_versions(state: PlaneState) -> set[tuple[str, int]]:
    """(function id, version) of every instance not gone and every build in flight."""
    running = {(inst.function_id, inst.version) for pool in state.pools.values()
               for inst in pool.instances.values() if not inst.gone}
    for key in state.builds:
        function_id, _, version = key.rpartition("@")
        with contextlib.suppress(ValueError):
            running.add((function_id, int(version)))
    return running


class GarbageCollector:
    def __init__(self, state: PlaneState, tiers: Tiers, *, log_max_age: float) -> None:
        self.s = state
        self.tiers = tiers
        self.log_max_age = log_max_age
        """Seconds an ended instance's log stays on its node (gc_log_age)."""
        self._lock = asyncio.Lock()

    async def request(self) -> agent_pb2.CollectGarbageRequest:
        """What every node is asked to keep now. Chunks are left alone while a build
        writes chunks that no manifest names yet; everything else is collected."""
        store = self.s.store
        building = bool(self.s.builds)
        # While building, retention is left as it is too (kept_manifests marks the
        # versions past it collected): the next round does both.
        keep = [] if building else await self.tiers.kept_manifests()
        rows = await store.run(version_rows, store)
        digests = bundles_to_keep(rows, running_versions(self.s))
        return agent_pb2.CollectGarbageRequest(
            keep=keep, files=True, keep_bundles=sorted(digests),
            log_max_age_seconds=self.log_max_age, skip_chunks=building)

    def targets(self, node_id: str = "") -> list[NodeView]:
        if not node_id:
            return self.s.live_nodes()
        node = self.s.nodes.get(node_id)
        if node is None:
            raise NotFound(f"no node {node_id!r}", field="node_id")
        return [node]

    async def collect(self, node_id: str = "") -> list[scheduler_pb2.NodeGarbage]:
        """Collect on `node_id`'s node, or ("") every live node, one pass at a time;
        each node that collected gets a garbage_collected event with what it freed."""
        targets = self.targets(node_id)
        async with self._lock:
            request = await self.request()
            return list(await asyncio.gather(*(self._collect_on(node, request)
                                               for node in targets)))

    async def _collect_on(self, node: NodeView, request: agent_pb2.CollectGarbageRequest
                          ) -> scheduler_pb2.NodeGarbage:
        if node.state is NodeState.LOST:
            return scheduler_pb2.NodeGarbage(node_id=node.id, error="node is lost")
        try:
            reply = await cast(GarbageClient, node.client).collect(
                request, NODE_GC_TIMEOUT_SECONDS)
        except ThawError as exc:
            log.warning("garbage collection failed", node=node.id, error=str(exc))
            return scheduler_pb2.NodeGarbage(node_id=node.id, error=exc.message)
        freed = {f.kind: f.bytes for f in reply.freed}
        parts = ", ".join(f"{f.kind} {f.bytes} bytes ({f.items})" for f in reply.freed
                          if f.items or f.bytes) or "nothing"
        self.s.events.emit(EventKind(GARBAGE_COLLECTED),
                           f"node {node.id} freed {reply.freed_bytes} bytes: {parts}",
                           node_id=node.id, freed_bytes=reply.freed_bytes,
                           chunks_bytes=freed.get("chunks", 0),
                           bundles_bytes=freed.get("bundles", 0),
                           staging_bytes=freed.get("staging", 0),
                           builds_bytes=freed.get("builds", 0),
                           logs_bytes=freed.get("logs", 0))
        log.info("node garbage collected", node=node.id, freed_bytes=reply.freed_bytes)
        return scheduler_pb2.NodeGarbage(node_id=node.id, freed_bytes=reply.freed_bytes,
                                         freed=reply.freed)

    async def run_forever(self, interval: float) -> None:
        """Collect on every live node every `interval` seconds (0: never)."""
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.collect()
            except ThawError as exc:  # e.g. the DB unavailable: the next round retries
                log.warning("scheduled garbage collection failed", error=str(exc))

"""The reconcile loop: silent nodes are marked lost, instances no node reclaimed after
a restart are ended, idle instances scale down (sooner under memory pressure),
min_instances are kept warm, and pinned snapshots of idle functions leave nodes in
CRITICAL memory pressure. Also the recovery after a scheduler restart."""

from __future__ import annotations

import asyncio
import re

import structlog

from thaw.core.errors import ThawError
from thaw.proto import manifest_pb2
from thaw.scheduler.autoscale import IdleInstanceView, scale_down
from thaw.scheduler.builds import Builds
from thaw.scheduler.events import EventKind
from thaw.scheduler.fleet import Fleet
from thaw.scheduler.instances import Instances
from thaw.scheduler.plane_state import PlaneState
from thaw.scheduler.pools import FunctionPool, InstanceView
from thaw.scheduler.pressure import PressureLevel, device_resource
from thaw.scheduler.starts import NoRoom, Starts
from thaw.scheduler.states import FunctionState, NodeState
from thaw.scheduler.store import FunctionRecord
from thaw.snapshotter.manifest import manifest_key

log = structlog.get_logger()

# After a restart, how many heartbeat intervals (beyond node_timeout) the scheduler
# waits for nodes to report the instances the DB knows as live before ending them.
ADOPT_GRACE_HEARTBEATS = 2
# A function's reason after its snapshot was quarantined for a chunk whose bytes no
# longer match their digest (scheduler/starts.py _quarantine, blobstore's CorruptChunk).
CORRUPT_QUARANTINE = re.compile(
    r"^snapshot quarantined .*\bchunk (?:b3:)?[0-9a-f]+ is (corrupt|truncated|\d+ bytes)\b")
# After a start to keep min_instances warm fails (no room, node refused), the
# reconcile loop waits this long before trying that function again.
WARM_RETRY_SECONDS = 10.0


class Reconciler:
    def __init__(self, state: PlaneState, fleet: Fleet, instances: Instances,
                 starts: Starts, builds: Builds | None = None) -> None:
        self.s = state
        self.fleet = fleet
        self.instances = instances
        self.starts = starts
        self.builds = builds
        """Rebuilds snapshots quarantined for corrupt data (None: they stay fresh)."""
        self._rebuilt: set[tuple[str, int]] = set()
        """Versions rebuilt once already: a snapshot corrupt again stays quarantined
        (no rebuild loop)."""

    async def reconcile_once(self) -> None:
        """Mark silent nodes lost; end instances no node reclaimed after a restart;
        scale idle instances down (sooner under memory pressure); keep min_instances
        warm; drop pinned snapshots of idle functions from nodes in CRITICAL."""
        s = self.s
        now = s.clock()
        for node in list(s.nodes.values()):
            if (node.state is not NodeState.LOST
                    and now - node.last_heartbeat > s.timeouts.node_timeout):
                await self.fleet.mark_lost(
                    node, f"no heartbeat for {now - node.last_heartbeat:.1f}s")
        if s.unclaimed and now >= s.unclaimed_until:
            for record in list(s.unclaimed.values()):
                await s.store.run(s.store.end_instance, record.id,
                                  "scheduler restarted and its node did not report it")
            log.info("unclaimed instances ended", count=len(s.unclaimed))
            s.unclaimed.clear()
        functions = {fn.id: fn for fn in await s.store.run(s.store.active_functions)}
        for function_id, pool in list(s.pools.items()):
            fn = functions.get(function_id)
            if fn is not None:
                await self._scale_down(pool, fn, now)
        for fn in functions.values():
            if fn.state is FunctionState.READY and fn.spec.scaling.min_instances > 0:
                self._keep_warm(fn)
            if fn.state is FunctionState.READY and fn.start_mode == "fresh":
                await self._rebuild_corrupt(fn)
        if any(s.pressure.node_level(n.id) >= PressureLevel.CRITICAL
               for n in s.live_nodes()):
            await self._evict_idle_snapshots(now)

    async def _rebuild_corrupt(self, fn: FunctionRecord) -> None:
        """A serving version whose snapshot was quarantined for corrupt chunks (no node
        held a good copy to fetch again) gets its snapshot rebuilt, once."""
        if (self.builds is None or not fn.spec.snapshot
                or not CORRUPT_QUARANTINE.search(fn.reason)
                or (fn.id, fn.version) in self._rebuilt
                or any(key.startswith(f"{fn.id}@") for key in self.s.builds)):
            return
        self._rebuilt.add((fn.id, fn.version))
        try:
            await self.builds.rebuild_snapshot(fn, fn.reason)
        except ThawError as exc:
            log.warning("corrupt snapshot not rebuilt", function=f"{fn.tenant}/{fn.name}",
                        error=str(exc))

    def _idle_window(self, inst: InstanceView, window: float) -> float:
        """scaledown_window, halved under PRESSURE on the instance's device and zero
        under CRITICAL or worse (every idle instance above min_instances goes)."""
        node = self.s.nodes.get(inst.node_id)
        if node is None or inst.id not in node.slices or not node.devices:
            return window
        index = node.slices[inst.id][0]
        level = self.s.pressure.level(node.id, device_resource(node.devices[index].id))
        if level >= PressureLevel.CRITICAL:
            return 0.0
        if level is PressureLevel.PRESSURE:
            return window / 2
        return window

    async def _scale_down(self, pool: FunctionPool, fn: FunctionRecord, now: float) -> None:
        pool.min_instances = fn.spec.scaling.min_instances
        window = fn.spec.scaling.scaledown_window
        ready = [i for i in pool.instances.values() if i.ready]
        idle = {i.id: i for i in ready if i.idle}
        if not idle:
            return
        views = [IdleInstanceView(i.id, i.last_used, self._idle_window(i, window))
                 for i in idle.values()]
        shortened = {v.instance_id for v in views if v.window < window}
        for instance_id in scale_down(views, len(ready), pool.min_instances, now):
            inst = idle[instance_id]
            if not inst.idle:
                continue  # picked up while an earlier stop was awaited
            if instance_id in shortened and now - inst.last_used < window:
                await self.instances.stop(pool, inst, "evicted under memory pressure",
                                          kind=EventKind.INSTANCE_EVICTED)
            else:
                await self.instances.stop(pool, inst, "idle past scaledown_window")

    def _keep_warm(self, fn: FunctionRecord) -> None:
        """Start instances (in the background) up to min_instances, counting those
        starting and those a restarted scheduler still expects its nodes to report."""
        s = self.s
        pool = s.pool(fn)
        live = len(pool.live(fn.version))
        expected = sum(1 for r in s.unclaimed.values()
                       if r.function_id == fn.id and r.version == fn.version)
        if not s.runnable_nodes(fn) or s.clock() < pool.warm_retry_at:
            return
        for _ in range(fn.spec.scaling.min_instances - live - pool.starting - expected):
            pool.starting += 1
            s.spawn(self._warm_one(fn, pool))

    async def _warm_one(self, fn: FunctionRecord, pool: FunctionPool) -> None:
        s = self.s
        try:
            inst, _timings = await self.starts.start_instance(fn)
        except (NoRoom, ThawError) as exc:
            pool.warm_retry_at = s.clock() + WARM_RETRY_SECONDS
            log.warning("could not keep min_instances warm", function=pool.name,
                        error=str(exc), retry_in=WARM_RETRY_SECONDS)
            s.events.emit(EventKind.PLACEMENT_REFUSED,
                          f"{pool.name}: min_instances not kept: {exc}", function=pool.name)
            return
        finally:
            pool.starting -= 1
            pool.changed.fire()
        self.instances.add(pool, inst)

    async def _evict_idle_snapshots(self, now: float) -> None:
        """On nodes in CRITICAL memory pressure or worse, drop the pinned copies of
        snapshots whose function has not been used for pressure_pinned_idle. (On the
        host backend slices and the pinned tier are both host memory; on CUDA the
        pinned tier is page-locked host memory that restores also stage through.)"""
        s = self.s
        by_key: dict[str, tuple[str, str, manifest_pb2.SnapshotManifest]] = {}
        for snap in await s.store.run(s.store.live_snapshots):
            manifest = manifest_pb2.SnapshotManifest.FromString(snap.manifest)
            by_key[manifest_key(manifest)] = (snap.function_id, snap.function, manifest)
        for node in list(s.nodes.values()):
            if (node.state is NodeState.LOST
                    or s.pressure.node_level(node.id) < PressureLevel.CRITICAL):
                continue
            for key in list(node.pinned.snapshot_keys):
                if key not in by_key:
                    continue
                function_id, name, manifest = by_key[key]
                pool = s.pools.get(function_id)
                last = max(s.started_at, pool.last_acquired if pool else 0.0)
                busy = pool is not None and (pool.waiters or any(
                    i.inflight for i in pool.instances.values()))
                if busy or now - last < s.policy.pressure_pinned_idle:
                    continue
                try:
                    freed = (await node.client.evict(manifest)).bytes
                except ThawError as exc:
                    log.warning("pinned eviction failed", node=node.id, function=name,
                                error=str(exc))
                    continue
                node.unpin(key)
                s.events.emit(EventKind.SNAPSHOT_EVICTED,
                              f"pinned snapshot of {name} evicted from node {node.id} "
                              f"under memory pressure ({freed} bytes)",
                              node_id=node.id, function=name, bytes=freed)
                log.info("pinned snapshot evicted under pressure", node=node.id,
                         function=name, bytes=freed)

    async def reconcile_forever(self, interval: float) -> None:
        while True:
            try:
                await self.reconcile_once()
            except ThawError as exc:
                log.warning("reconcile failed", error=str(exc))
            await asyncio.sleep(interval)

    async def recover(self) -> None:
        """After a restart: the instances the DB knows as live are adopted when their
        node re-registers and reports them (register); those no node reports within
        node_timeout and a couple of heartbeats are ended then (reconcile_once)."""
        s = self.s
        interrupted = await s.store.run(s.versions.fail_interrupted_builds)
        if interrupted:
            log.warning("builds interrupted by the restart marked failed", count=interrupted)
        records = await s.store.run(s.store.live_instances)
        s.unclaimed = {r.id: r for r in records}
        s.unclaimed_until = (s.clock() + s.timeouts.node_timeout
                             + ADOPT_GRACE_HEARTBEATS * s.timeouts.heartbeat_interval)
        if records:
            log.info("waiting for nodes to report live instances", count=len(records))

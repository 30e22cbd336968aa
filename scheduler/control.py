"""The control plane: functions, snapshot builds, instance leases, nodes.

State that must survive a restart is in the DB (Store); what is here in memory is
rebuilt from agents' registrations and heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from thaw.core.errors import (
    ChunkNotFound,
    DeadlineExceeded,
    FunctionUnavailable,
    NoCapacity,
    NotFound,
    SnapshotError,
    ThawError,
)
from thaw.core.spec import FunctionSpec, read_bundle
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.scheduler.bundles import BundleStore
from thaw.scheduler.nodes import AgentClient, NodeView
from thaw.scheduler.placement import Candidate, choose_node
from thaw.scheduler.states import (
    FunctionState,
    InstanceState,
    NodeState,
    SnapshotState,
    check_transition,
)
from thaw.scheduler.store import FunctionRecord, Store, new_id
from thaw.snapshotter.manifest import manifest_key

log = structlog.get_logger()

# A restore or fresh start beyond this is treated as failed (the agent's own
# start_timeout should fire first; keep this larger than THAW_START_TIMEOUT).
START_RPC_TIMEOUT = 900.0
# How long a deploy waits for a first node when none has registered yet.
NODE_WAIT_SECONDS = 60.0


@dataclass
class InstanceView:
    id: str
    function_id: str
    version: int
    node_id: str
    start: str  # "restore" | "fresh"
    gpu_memory: int
    state: InstanceState = InstanceState.READY
    inflight: int = 0
    last_used: float = 0.0


@dataclass
class FunctionPool:
    """The live instances of one function and the requests waiting for them."""

    function_id: str
    instances: dict[str, InstanceView] = field(default_factory=dict)
    starting: int = 0
    waiters: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def pick(self, version: int, max_concurrency: int) -> InstanceView | None:
        """A warm instance of this version with a free slot: the least busy one."""
        best = None
        for inst in self.instances.values():
            if (inst.state is InstanceState.READY and inst.version == version
                    and inst.inflight < max_concurrency
                    and (best is None or inst.inflight < best.inflight)):
                best = inst
        return best

    def needs_instance(self, spec: FunctionSpec, version: int) -> bool:
        """Start another one if the demand exceeds target_concurrency per instance."""
        live = [i for i in self.instances.values()
                if i.state is InstanceState.READY and i.version == version]
        inflight = sum(i.inflight for i in live)
        demand = inflight + self.waiters
        wanted = min(spec.scaling.max_instances,
                     math.ceil(demand / spec.scaling.target_concurrency))
        return len(live) + self.starting < wanted


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: str
    instance: InstanceView
    data_url: str
    start: str  # "warm" | "restore" | "fresh"
    timings: tuple[tuple[str, float], ...]
    timeout: float


def spec_message(fn: FunctionRecord) -> agent_pb2.FunctionSpec:
    s = fn.spec
    return agent_pb2.FunctionSpec(
        tenant=fn.tenant, name=fn.name, version=str(fn.version), handler=s.handler,
        bundle_digest=fn.bundle_digest, gpu_memory_bytes=s.resources.gpu_memory,
        gpu_compute=s.resources.gpu_compute, max_concurrency=s.scaling.max_concurrency,
        timeout_seconds=s.scaling.timeout, snapshot_enabled=s.snapshot,
        memory_limit_bytes=s.resources.memory, max_batch_size=s.batching.max_batch_size,
        max_batch_wait_ms=s.batching.max_batch_wait_ms)


class ControlPlane:
    def __init__(self, store: Store, bundles: BundleStore, *, heartbeat_interval: float,
                 node_timeout: float, build_timeout: float, acquire_wait: float,
                 clock: Callable[[], float] = time.monotonic,
                 agent_client: Callable[[str], AgentClient] = AgentClient) -> None:
        self.store = store
        self.bundles = bundles
        self.heartbeat_interval = heartbeat_interval
        self.node_timeout = node_timeout
        self.build_timeout = build_timeout
        self.acquire_wait = acquire_wait
        self._clock = clock
        self._agent_client = agent_client
        self.nodes: dict[str, NodeView] = {}
        self._nodes_changed = asyncio.Event()
        self.pools: dict[str, FunctionPool] = {}
        self.leases: dict[str, tuple[FunctionPool, InstanceView]] = {}
        self._builds: dict[str, asyncio.Task[FunctionRecord]] = {}
        self.holders: dict[str, set[str]] = {}
        """Snapshot id -> nodes whose disk tier holds its chunks."""
        self._background: set[asyncio.Task[object]] = set()

    # ---- nodes ----------------------------------------------------------------

    async def register(self, req: scheduler_pb2.RegisterRequest) -> None:
        old = self.nodes.get(req.node_id)
        if old is not None and old.control_address != req.control_address:
            await old.client.close()
            old = None
        node = old or NodeView(id=req.node_id, control_address=req.control_address,
                               data_url=req.data_url,
                               client=self._agent_client(req.control_address))
        node.data_url, node.devices = req.data_url, list(req.devices)
        node.state = NodeState.CORDONED if node.cordoned else NodeState.READY
        node.last_heartbeat = self._clock()
        self.nodes[req.node_id] = node
        await self.store.run(self.store.upsert_node, req.node_id, req.control_address,
                             req.data_url, json.dumps([d.id for d in req.devices]))
        # Instances this scheduler does not know (it restarted, or lost the node for a
        # while) are stopped rather than leaked.
        known = {i.id for p in self.pools.values() for i in p.instances.values()}
        for instance_id in req.instance_ids:
            if instance_id not in known:
                self._spawn(node.client.stop_instance(instance_id, "unknown to the scheduler"))
                await self.store.run(self.store.end_instance, instance_id, "orphaned")
        self._nodes_changed.set()
        log.info("node registered", node=req.node_id, data_url=req.data_url,
                 devices=len(req.devices))

    async def heartbeat(self, req: scheduler_pb2.HeartbeatRequest) -> bool:
        """Returns False when the node must register again."""
        node = self.nodes.get(req.node_id)
        if node is None:
            return False
        node.last_heartbeat = self._clock()
        node.devices = list(req.devices)
        node.pinned = req.pinned
        node.disk_bytes = req.disk_bytes
        if node.state is NodeState.LOST:
            node.state = NodeState.CORDONED if node.cordoned else NodeState.READY
            await self.store.run(self.store.set_node_state, node.id, node.state.value)
        for exited in req.exited:
            await self._forget_instance(exited.instance_id, f"exited: {exited.reason}")
        return True

    def _ready_nodes(self) -> list[NodeView]:
        return [n for n in self.nodes.values() if n.state is NodeState.READY]

    async def _wait_for_node(self) -> None:
        deadline = self._clock() + NODE_WAIT_SECONDS
        while not self._ready_nodes():
            self._nodes_changed.clear()
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise NoCapacity("no node agent is registered with the scheduler")
            try:
                await asyncio.wait_for(self._nodes_changed.wait(), remaining)
            except TimeoutError:
                continue

    async def cordon(self, node_id: str, cordoned: bool) -> NodeView:
        node = self.nodes.get(node_id)
        if node is None:
            raise NotFound(f"no node {node_id!r}", field="node_id")
        node.cordoned = cordoned
        if node.state is not NodeState.LOST:
            target = NodeState.CORDONED if cordoned else NodeState.READY
            check_transition(node.state, target)
            node.state = target
            await self.store.run(self.store.set_node_state, node.id, target.value)
        log.info("node cordoned" if cordoned else "node uncordoned", node=node_id)
        return node

    def node_instances(self, node_id: str) -> int:
        return sum(1 for p in self.pools.values() for i in p.instances.values()
                   if i.node_id == node_id)

    async def _snapshot_of(self, tenant: str, name: str
                           ) -> tuple[FunctionRecord, str, manifest_pb2.SnapshotManifest]:
        fn = await self.store.run(self.store.get_function, tenant, name)
        if not fn.snapshot_id:
            raise FunctionUnavailable(
                f"{tenant}/{name} has no snapshot ({fn.reason or fn.state.value})")
        snap = await self.store.run(self.store.get_snapshot, fn.snapshot_id)
        if snap.state is not SnapshotState.READY or not snap.manifest:
            raise FunctionUnavailable(f"{tenant}/{name}'s snapshot is {snap.state.value}")
        self.holders.setdefault(snap.id, {snap.node_id})
        return fn, snap.id, manifest_pb2.SnapshotManifest.FromString(snap.manifest)

    def _tier_targets(self, snapshot_id: str, node_id: str) -> list[NodeView]:
        if node_id:
            node = self.nodes.get(node_id)
            if node is None:
                raise NotFound(f"no node {node_id!r}", field="node_id")
            return [node]
        return [self.nodes[h] for h in sorted(self.holders.get(snapshot_id, ()))
                if h in self.nodes and self.nodes[h].state is not NodeState.LOST]

    async def prewarm(self, tenant: str, name: str, node_id: str = ""
                      ) -> tuple[list[str], int, float]:
        """Move a function's snapshot into nodes' pinned tiers (no GPU memory)."""
        _fn, snap_id, manifest = await self._snapshot_of(tenant, name)
        targets = self._tier_targets(snap_id, node_id)
        holders = self.holders[snap_id]
        total, seconds = 0, 0.0
        for node in targets:
            peers = [self.nodes[h].control_address for h in sorted(holders)
                     if h != node.id and h in self.nodes]
            resp = await node.client.prewarm(manifest, peers)
            holders.add(node.id)
            total += resp.bytes
            seconds = max(seconds, resp.seconds)
            key = manifest_key(manifest)
            if key not in node.pinned.snapshot_keys:
                node.pinned.snapshot_keys.append(key)
        log.info("snapshot prewarmed", function=f"{tenant}/{name}",
                 nodes=[n.id for n in targets], bytes=total)
        return [n.id for n in targets], total, seconds

    async def evict(self, tenant: str, name: str, node_id: str = "") -> tuple[list[str], int]:
        _fn, snap_id, manifest = await self._snapshot_of(tenant, name)
        targets = self._tier_targets(snap_id, node_id)
        total = 0
        key = manifest_key(manifest)
        for node in targets:
            total += (await node.client.evict(manifest)).bytes
            if key in node.pinned.snapshot_keys:
                node.pinned.snapshot_keys.remove(key)
        log.info("snapshot evicted", function=f"{tenant}/{name}",
                 nodes=[n.id for n in targets], bytes=total)
        return [n.id for n in targets], total

    # ---- functions -------------------------------------------------------------

    async def create_function(self, tenant: str, bundle: bytes, wait: bool) -> FunctionRecord:
        spec = read_bundle(bundle)
        digest = await asyncio.to_thread(self.bundles.put, bundle)
        if spec.snapshot:
            fn = await self.store.run(self.store.upsert_function, tenant, spec, digest,
                                      "restore", FunctionState.BUILDING)
        else:
            fn = await self.store.run(self.store.upsert_function, tenant, spec, digest,
                                      "fresh", FunctionState.READY,
                                      "snapshots disabled in thaw.toml: runs with fresh starts")
        self._retire_old_versions(fn)
        log.info("function deployed", function=f"{tenant}/{spec.name}", version=fn.version,
                 state=fn.state.value)
        if fn.state is FunctionState.BUILDING:
            task = asyncio.create_task(self._build(fn, bundle))
            self._builds[fn.id] = task
            if wait:
                return await asyncio.shield(task)
        return fn

    async def get_function(self, tenant: str, name: str) -> FunctionRecord:
        return await self.store.run(self.store.get_function, tenant, name)

    async def list_functions(self, tenant: str) -> list[FunctionRecord]:
        return await self.store.run(self.store.list_functions, tenant)

    def warm_count(self, function_id: str) -> int:
        pool = self.pools.get(function_id)
        return 0 if pool is None else sum(
            1 for i in pool.instances.values() if i.state is InstanceState.READY)

    async def snapshot_bytes(self, fn: FunctionRecord) -> int:
        if not fn.snapshot_id:
            return 0
        return (await self.store.run(self.store.get_snapshot, fn.snapshot_id)).stored_bytes

    async def delete_function(self, tenant: str, name: str) -> None:
        fn = await self.store.run(self.store.get_function, tenant, name)
        await self.store.run(self.store.set_function_state, fn.id, fn.version,
                             FunctionState.DELETED, "deleted")
        build = self._builds.pop(fn.id, None)
        if build is not None:
            build.cancel()
        pool = self.pools.get(fn.id)
        if pool is not None:
            for inst in list(pool.instances.values()):
                if inst.inflight == 0:
                    await self._stop(pool, inst, "function deleted")
                else:
                    inst.state = InstanceState.STOPPING
        log.info("function deleted", function=f"{tenant}/{name}")
        self._spawn(self.collect_garbage())

    async def collect_garbage(self) -> int:
        """Tell every node which snapshots are still in use; the rest of their chunks,
        templates and host-memory copies go. Skipped while a build is writing chunks
        that no manifest names yet."""
        if self._builds:
            return 0
        keep = [manifest_pb2.SnapshotManifest.FromString(m)
                for m in await self.store.run(self.store.live_manifests)]
        freed = 0
        for node in [n for n in self.nodes.values() if n.state is not NodeState.LOST]:
            try:
                freed += (await node.client.collect_garbage(keep)).freed_bytes
            except ThawError as exc:
                log.warning("garbage collection failed", node=node.id, error=str(exc))
        log.info("garbage collected", freed_bytes=freed, kept_snapshots=len(keep))
        return freed

    def _retire_old_versions(self, fn: FunctionRecord) -> None:
        pool = self.pools.get(fn.id)
        if pool is None:
            return
        for inst in list(pool.instances.values()):
            if inst.version < fn.version:
                if inst.inflight == 0:
                    self._spawn(self._stop(pool, inst, "replaced by a new version"))
                else:
                    inst.state = InstanceState.STOPPING

    async def _build(self, fn: FunctionRecord, bundle: bytes) -> FunctionRecord:
        """Build the snapshot on a node; the function's state says how it went."""
        name = f"{fn.tenant}/{fn.name}"
        snapshot_id = ""
        try:
            await self._wait_for_node()
            node = min(self._ready_nodes(), key=lambda n: (n.starts_in_flight, n.id))
            snapshot_id = await self.store.run(self.store.create_snapshot, fn.id, fn.version,
                                               node.id)
            node.starts_in_flight += 1
            try:
                resp = await node.client.build_snapshot(
                    agent_pb2.BuildSnapshotRequest(function=spec_message(fn), bundle=bundle),
                    timeout=self.build_timeout)
            finally:
                node.starts_in_flight -= 1
        except (ThawError, asyncio.TimeoutError) as exc:
            reason = f"snapshot build failed: {exc}"
            if snapshot_id:
                await self.store.run(self.store.finish_snapshot, snapshot_id,
                                     SnapshotState.FAILED, reason=reason)
            updated = await self.store.run(self.store.set_function_state, fn.id, fn.version,
                                           FunctionState.FAILED, reason)
            log.warning("build failed", function=name, reason=reason)
            return updated or fn
        finally:
            self._builds.pop(fn.id, None)

        if resp.ok:
            await self.store.run(self.store.finish_snapshot, snapshot_id, SnapshotState.READY,
                                 manifest=resp.manifest.SerializeToString(),
                                 stored_bytes=resp.stored_bytes)
            self.holders.setdefault(snapshot_id, set()).add(node.id)
            updated = await self.store.run(
                self.store.set_function_state, fn.id, fn.version, FunctionState.READY, "",
                "restore", snapshot_id)
            log.info("snapshot ready", function=name, snapshot=snapshot_id,
                     bytes=resp.stored_bytes, setup_s=round(resp.manifest.setup_seconds, 3))
            # Keep a template with the function's modules imported, so that the first
            # restore does not pay for imports; a deploy that waits, waits for it too.
            await self._prepare_template(node, fn, resp.manifest)
            if fn.version > 1:
                self._spawn(self.collect_garbage())  # the old version's snapshot
        elif resp.stage == "capture":
            where = f" at {resp.attribute_path}" if resp.attribute_path else ""
            reason = (f"state cannot be snapshotted{where}: {resp.reason}; "
                      "runs with fresh starts")
            await self.store.run(self.store.finish_snapshot, snapshot_id, SnapshotState.FAILED,
                                 reason=reason)
            updated = await self.store.run(self.store.set_function_state, fn.id, fn.version,
                                           FunctionState.READY, reason, "fresh")
            log.warning("snapshot not possible", function=name, reason=reason)
        else:
            reason = f"{resp.stage} failed: {resp.reason}"
            await self.store.run(self.store.finish_snapshot, snapshot_id, SnapshotState.FAILED,
                                 reason=reason)
            updated = await self.store.run(self.store.set_function_state, fn.id, fn.version,
                                           FunctionState.FAILED, reason)
            log.warning("build failed", function=name, reason=reason)
        return updated or fn

    async def _prepare_template(self, node: NodeView, fn: FunctionRecord,
                                manifest: manifest_pb2.SnapshotManifest) -> None:
        try:
            await node.client.prepare_template(
                agent_pb2.PrepareTemplateRequest(function=spec_message(fn), manifest=manifest),
                timeout=START_RPC_TIMEOUT)
        except ThawError as exc:
            log.warning("template not prepared", node=node.id, function=fn.name, error=str(exc))

    async def wait_built(self, fn: FunctionRecord, deadline: float) -> FunctionRecord:
        task = self._builds.get(fn.id)
        if task is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(task),
                                              max(0.0, deadline - self._clock()))
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"{fn.tenant}/{fn.name} is still building its snapshot") from exc
        return await self.store.run(self.store.get_function_by_id, fn.id)

    # ---- invocations -----------------------------------------------------------

    async def acquire(self, tenant: str, name: str, wait: float) -> LeaseGrant:
        started = self._clock()
        deadline = started + (min(wait, self.acquire_wait) if wait > 0 else self.acquire_wait)
        fn = await self.store.run(self.store.get_function, tenant, name)
        if fn.state is FunctionState.BUILDING:
            fn = await self.wait_built(fn, deadline)
        if fn.state is FunctionState.FAILED:
            raise FunctionUnavailable(f"{tenant}/{name} cannot run: {fn.reason}")
        if fn.state is not FunctionState.READY:
            raise FunctionUnavailable(f"{tenant}/{name} is {fn.state.value}")
        pool = self.pools.setdefault(fn.id, FunctionPool(fn.id))
        spec = fn.spec
        pool.waiters += 1
        try:
            while True:
                async with pool.changed:
                    inst = pool.pick(fn.version, spec.scaling.max_concurrency)
                    if inst is not None:
                        inst.inflight += 1
                        wait_s = self._clock() - started
                        return self._grant(pool, inst, "warm", (("queue", wait_s),),
                                           spec.scaling.timeout)
                    start = pool.needs_instance(spec, fn.version)
                    if start:
                        pool.starting += 1
                    else:
                        remaining = deadline - self._clock()
                        if remaining <= 0:
                            raise DeadlineExceeded(
                                f"no instance of {tenant}/{name} became free in time")
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(pool.changed.wait(), remaining)
                        continue
                queued = self._clock() - started
                try:
                    inst, timings = await self._start_instance(fn)
                except BaseException:
                    async with pool.changed:
                        pool.starting -= 1
                        pool.changed.notify_all()
                    raise
                async with pool.changed:
                    pool.starting -= 1
                    pool.instances[inst.id] = inst
                    inst.inflight += 1
                    pool.changed.notify_all()
                return self._grant(pool, inst, inst.start, (("queue", queued), *timings),
                                   spec.scaling.timeout)
        finally:
            pool.waiters -= 1

    def _grant(self, pool: FunctionPool, inst: InstanceView, start: str,
               timings: tuple[tuple[str, float], ...], timeout: float) -> LeaseGrant:
        lease_id = uuid.uuid4().hex
        self.leases[lease_id] = (pool, inst)
        node = self.nodes[inst.node_id]
        return LeaseGrant(lease_id, inst, node.data_url, start, timings, timeout)

    async def release(self, lease_id: str, failed: bool, reason: str) -> None:
        entry = self.leases.pop(lease_id, None)
        if entry is None:
            return
        pool, inst = entry
        async with pool.changed:
            inst.inflight -= 1
            inst.last_used = self._clock()
            pool.changed.notify_all()
        if failed:
            await self._forget_instance(inst.id, reason or "failed while serving")
            node = self.nodes.get(inst.node_id)
            if node is not None:
                self._spawn(node.client.stop_instance(inst.id, reason or "failed"))
        elif inst.state is InstanceState.STOPPING and inst.inflight == 0:
            await self._stop(pool, inst, "retired")

    async def _start_instance(self, fn: FunctionRecord
                              ) -> tuple[InstanceView, tuple[tuple[str, float], ...]]:
        await self._wait_for_node()
        manifest = None
        holders: set[str] = set()
        key = ""
        if fn.start_mode == "restore" and fn.snapshot_id:
            snap = await self.store.run(self.store.get_snapshot, fn.snapshot_id)
            if snap.state is SnapshotState.READY and snap.manifest:
                manifest = manifest_pb2.SnapshotManifest.FromString(snap.manifest)
                key = manifest_key(manifest)
                holders = self.holders.setdefault(snap.id, {snap.node_id})
        need = fn.spec.resources.gpu_memory
        candidates = [
            Candidate(node_id=n.id, device_free=n.device_free(),
                      snapshot_pinned=bool(key) and key in n.pinned.snapshot_keys,
                      snapshot_on_disk=n.id in holders, starts_in_flight=n.starts_in_flight)
            for n in self._ready_nodes()]
        chosen = choose_node(candidates, need)
        if chosen is None:
            raise NoCapacity(f"no node has {need} bytes of slice memory free for "
                             f"{fn.tenant}/{fn.name}")
        node = self.nodes[chosen.node_id]
        kind = agent_pb2.START_RESTORE if manifest is not None else agent_pb2.START_FRESH
        peers = [self.nodes[h].control_address for h in sorted(holders)
                 if h != node.id and h in self.nodes
                 and self.nodes[h].state is not NodeState.LOST]
        instance_id = new_id("inst")
        node.starts_in_flight += 1
        node.reserved_bytes += need
        try:
            try:
                resp = await node.client.start_instance(agent_pb2.StartInstanceRequest(
                    instance_id=instance_id, function=spec_message(fn), kind=kind,
                    manifest=manifest, peers=peers), timeout=START_RPC_TIMEOUT)
            except (SnapshotError, ChunkNotFound) as exc:
                if fn.snapshot_id is None:
                    raise
                if isinstance(exc, ChunkNotFound):
                    # The data is out of reach (its nodes are down), not broken: start
                    # fresh this time and keep the snapshot.
                    log.warning("snapshot chunks unreachable; starting fresh",
                                function=f"{fn.tenant}/{fn.name}", error=str(exc))
                else:
                    await self._quarantine(fn, str(exc))
                resp = await node.client.start_instance(agent_pb2.StartInstanceRequest(
                    instance_id=instance_id, function=spec_message(fn),
                    kind=agent_pb2.START_FRESH), timeout=START_RPC_TIMEOUT)
        except BaseException:
            node.reserved_bytes -= need
            raise
        finally:
            node.starts_in_flight -= 1
        start = "restore" if resp.kind == agent_pb2.START_RESTORE else "fresh"
        if start == "restore" and fn.snapshot_id:
            holders.add(node.id)  # it fetched the chunks it lacked
        await self.store.run(self.store.add_instance, instance_id, fn.id, fn.version, node.id,
                             start)
        inst = InstanceView(id=instance_id, function_id=fn.id, version=fn.version,
                            node_id=node.id, start=start, gpu_memory=need,
                            last_used=self._clock())
        log.info("instance started", function=f"{fn.tenant}/{fn.name}", instance=instance_id,
                 node=node.id, start=start,
                 timings={t.stage: round(t.seconds, 4) for t in resp.timings})
        return inst, tuple((t.stage, t.seconds) for t in resp.timings)

    async def _quarantine(self, fn: FunctionRecord, reason: str) -> None:
        """A restore failed: never use this snapshot again; run fresh (no rebuild loop)."""
        assert fn.snapshot_id is not None
        await self.store.run(self.store.finish_snapshot, fn.snapshot_id,
                             SnapshotState.QUARANTINED, reason=reason)
        await self.store.run(self.store.set_function_state, fn.id, fn.version,
                             FunctionState.READY,
                             f"snapshot quarantined after a failed restore: {reason}; "
                             "runs with fresh starts", "fresh")
        log.error("snapshot quarantined", function=f"{fn.tenant}/{fn.name}",
                  snapshot=fn.snapshot_id, reason=reason)

    async def _stop(self, pool: FunctionPool, inst: InstanceView, reason: str) -> None:
        inst.state = InstanceState.STOPPING
        node = self.nodes.get(inst.node_id)
        if node is not None:
            try:
                await node.client.stop_instance(inst.id, reason)
            except ThawError as exc:
                log.warning("stop failed", instance=inst.id, error=str(exc))
        await self._forget_instance(inst.id, reason)

    async def _forget_instance(self, instance_id: str, reason: str) -> None:
        for pool in self.pools.values():
            inst = pool.instances.pop(instance_id, None)
            if inst is not None:
                inst.state = InstanceState.GONE
                node = self.nodes.get(inst.node_id)
                if node is not None:
                    node.reserved_bytes -= inst.gpu_memory
                async with pool.changed:
                    pool.changed.notify_all()
                await self.store.run(self.store.end_instance, instance_id, reason)
                log.info("instance gone", instance=instance_id, reason=reason)
                return

    # ---- background ------------------------------------------------------------

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reconcile_once(self) -> None:
        """Scale idle instances to zero; mark silent nodes lost."""
        now = self._clock()
        for node in list(self.nodes.values()):
            if (node.state is not NodeState.LOST
                    and now - node.last_heartbeat > self.node_timeout):
                node.state = NodeState.LOST
                await self.store.run(self.store.set_node_state, node.id, NodeState.LOST.value)
                log.error("node lost", node=node.id)
                for pool in self.pools.values():
                    for inst in list(pool.instances.values()):
                        if inst.node_id == node.id:
                            await self._forget_instance(inst.id, "node lost")
        for function_id, pool in list(self.pools.items()):
            idle = [i for i in pool.instances.values()
                    if i.state is InstanceState.READY and i.inflight == 0]
            if not idle:
                continue
            try:
                fn = await self.store.run(self.store.get_function_by_id, function_id)
            except ThawError:
                continue
            keep = fn.spec.scaling.min_instances
            live = sum(1 for i in pool.instances.values() if i.state is InstanceState.READY)
            for inst in sorted(idle, key=lambda i: i.last_used):
                if live <= keep:
                    break
                if now - inst.last_used >= fn.spec.scaling.scaledown_window:
                    live -= 1
                    await self._stop(pool, inst, "idle past scaledown_window")

    async def reconcile_forever(self, interval: float) -> None:
        while True:
            try:
                await self.reconcile_once()
            except ThawError as exc:
                log.warning("reconcile failed", error=str(exc))
            await asyncio.sleep(interval)

    async def recover(self) -> None:
        """After a restart: instances the DB thinks are alive are unknown now."""
        for instance_id, _fn, _node in await self.store.run(self.store.live_instances):
            await self.store.run(self.store.end_instance, instance_id, "scheduler restarted")

    async def close(self) -> None:
        for task in list(self._builds.values()) + list(self._background):
            task.cancel()
        await asyncio.gather(*self._builds.values(), *self._background, return_exceptions=True)
        for node in self.nodes.values():
            await node.client.close()

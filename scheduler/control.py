"""The control plane: functions, snapshot builds, instance leases, nodes, autoscaling,
eviction and memory pressure (DESIGN.md §2, §8).

State that must survive a restart is in the DB (Store); what is here in memory is
rebuilt from it and from agents' registrations and heartbeats: instances the DB
still knows as live are adopted when their node reports them again (recover,
register). The decisions themselves are pure and live elsewhere: placement.py
(where a start lands, what to evict), autoscale.py (how many instances),
pressure.py (memory-pressure levels).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from thaw.core.errors import (
    ChunkNotFound,
    DeadlineExceeded,
    FunctionUnavailable,
    ImageNotOnNode,
    InvalidArgument,
    NoCapacity,
    NotFound,
    OutOfMemory,
    SnapshotError,
    ThawError,
    Unavailable,
)
from thaw.core.priority import PRIORITY_DEFAULT, PriorityWaitQueue, Waiter
from thaw.core.spec import read_bundle
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.scheduler.autoscale import IdleInstanceView, scale_down
from thaw.scheduler.bundles import BundleStore
from thaw.scheduler.events import EventKind, EventLog
from thaw.scheduler.nodes import DOCKER_RUNTIME, PROCESS_RUNTIME, AgentClient, NodeView
from thaw.scheduler.placement import Candidate, IdleInstance, choose_node, plan_eviction
from thaw.scheduler.policy import PolicyConfig
from thaw.scheduler.pools import (
    Broadcast,
    FunctionPool,
    InstanceView,
    QueuedAcquire,
    RoomTurn,
)
from thaw.scheduler.pressure import (
    PINNED,
    PressureLevel,
    PressureTracker,
    Reading,
    Thresholds,
    device_resource,
)
from thaw.scheduler.states import (
    FunctionState,
    InstanceState,
    NodeState,
    SnapshotState,
    check_transition,
)
from thaw.scheduler.store import FunctionRecord, InstanceRecord, Store, new_id
from thaw.scheduler.tenancy import QuotaLedger
from thaw.scheduler.versions import VersionRecord, VersionState, VersionStore, as_function
from thaw.snapshotter.manifest import manifest_key

log = structlog.get_logger()

# A restore or fresh start beyond this is treated as failed (the agent's own
# start_timeout should fire first; keep this larger than THAW_START_TIMEOUT).
START_RPC_TIMEOUT = 900.0
# How long a deploy waits for a first node when none has registered yet.
NODE_WAIT_SECONDS = 60.0
# After a restart, how many heartbeat intervals (beyond node_timeout) the scheduler
# waits for nodes to report the instances the DB knows as live before ending them.
ADOPT_GRACE_HEARTBEATS = 2
# After a start to keep min_instances warm fails (no room, node refused), the
# reconcile loop waits this long before trying that function again.
WARM_RETRY_SECONDS = 10.0
# Why an image function ([runtime] image) cannot build or start: only nodes with the
# docker runtime run images (README "Deploying a container image").
NO_DOCKER_NODE = ("no node runs the docker runtime; image functions need "
                  "THAW_RUNTIME=docker on at least one node")

__all__ = ["ControlPlane", "InstanceView", "FunctionPool", "LeaseGrant", "spec_message"]


class _NoRoom(Exception):
    """Internal: no node can take the slice and nothing idle can be evicted for it."""


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
        max_batch_wait_ms=s.batching.max_batch_wait_ms, image=s.runtime.image)


def _fn_name(fn: FunctionRecord) -> str:
    return f"{fn.tenant}/{fn.name}"


def _build_key(function_id: str, version: int) -> str:
    return f"{function_id}@{version}"


class ControlPlane:
    def __init__(self, store: Store, bundles: BundleStore, *, heartbeat_interval: float,
                 node_timeout: float, build_timeout: float, acquire_wait: float,
                 policy: PolicyConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 agent_client: Callable[[str], AgentClient] = AgentClient,
                 events: EventLog | None = None) -> None:
        self.store = store
        self.bundles = bundles
        self.heartbeat_interval = heartbeat_interval
        self.node_timeout = node_timeout
        self.build_timeout = build_timeout
        self.acquire_wait = acquire_wait
        self.policy = policy or PolicyConfig.load()
        self._clock = clock
        self._agent_client = agent_client
        self.events = events or EventLog()
        self.pressure = PressureTracker(Thresholds(
            self.policy.pressure_at, self.policy.pressure_critical_at,
            self.policy.pressure_emergency_at, self.policy.pressure_hysteresis))
        self.nodes: dict[str, NodeView] = {}
        self._nodes_changed = asyncio.Event()
        self.pools: dict[str, FunctionPool] = {}
        self.leases: dict[str, tuple[FunctionPool, InstanceView]] = {}
        self._builds: dict[str, asyncio.Task[FunctionRecord]] = {}
        """function id@version -> its snapshot build."""
        self.versions = VersionStore(store)
        self._active: dict[str, tuple[int, float]] = {}
        """Function id -> (its serving version, since when in unix time), as last
        switched here or read from the DB (see acquire, generation)."""
        self.holders: dict[str, set[str]] = {}
        """Snapshot id -> nodes whose disk tier holds its chunks."""
        self._background: set[asyncio.Task[object]] = set()
        self._room = Broadcast()
        """Fired whenever slice memory may have been freed (or a node appeared)."""
        self._room_queue: PriorityWaitQueue[RoomTurn] = PriorityWaitQueue(
            self.policy.priority_aging_rate, clock)
        """Requests waiting for room, in the order they may retry placement."""
        self._room_turns = Broadcast()
        """Fired when a room waiter tried and failed, or left the room queue."""
        self.room_waiters = 0
        """Requests waiting for room on some node (bounded by placement_queue_max)."""
        self._unclaimed: dict[str, InstanceRecord] = {}
        """After a restart: instances the DB knows as live that no node has reported yet."""
        self._unclaimed_until = 0.0
        self._probing: set[str] = set()
        self._placing: dict[str, tuple[str, str]] = {}
        """Starts in flight: instance id -> (function id, node id)."""
        self._started_at = clock()
        self.quotas = QuotaLedger(store)
        """Tenant quotas (instances, slice memory), checked before every start."""

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
        node.runtime = req.runtime or PROCESS_RUNTIME
        node.state = NodeState.CORDONED if node.cordoned else NodeState.READY
        node.last_heartbeat = self._clock()
        self.nodes[req.node_id] = node
        await self.store.run(self.store.upsert_node, req.node_id, req.control_address,
                             req.data_url, json.dumps([d.id for d in req.devices]))
        await self._reconcile_reported(node, set(req.instance_ids))
        node.take_report(list(req.devices))
        self._observe_pressure(node)
        self._nodes_changed.set()
        self._room.fire()
        self.events.emit(EventKind.NODE_REGISTERED, f"node {node.id} registered",
                         node_id=node.id, devices=len(req.devices),
                         instances=len(req.instance_ids), runtime=node.runtime)
        log.info("node registered", node=req.node_id, data_url=req.data_url,
                 devices=len(req.devices), instances=len(req.instance_ids),
                 runtime=node.runtime)

    async def _reconcile_reported(self, node: NodeView, reported: set[str]) -> None:
        """Match the instances a (re-)registering node runs with what the scheduler
        knows: adopt those the DB still has as live for the function's current
        version (the scheduler restarted), stop the others rather than leak them,
        and forget the ones the node no longer runs (the agent restarted)."""
        known = {i.id for p in self.pools.values() for i in p.instances.values()
                 if i.node_id == node.id}
        for instance_id in sorted(known - reported):
            await self._forget_instance(instance_id, "its node no longer runs it")
        adopted: dict[str, int] = {}
        functions: dict[str, FunctionRecord | None] = {}
        for instance_id in sorted(reported - known - node.starting_ids):
            record = self._unclaimed.pop(instance_id, None)
            fn = None
            if record is not None and record.node_id == node.id:
                if record.function_id not in functions:
                    try:
                        functions[record.function_id] = await self.store.run(
                            self.store.get_function_by_id, record.function_id)
                    except NotFound:
                        functions[record.function_id] = None
                fn = functions[record.function_id]
            if (record is not None and fn is not None and fn.state is FunctionState.READY
                    and fn.version == record.version and record.node_id == node.id):
                self._adopt(node, fn, record)
                adopted[instance_id] = fn.spec.resources.gpu_memory
                continue
            if record is None or record.node_id != node.id:
                why = "unknown to the scheduler"
            elif fn is None:
                why = "its function no longer exists"
            elif fn.state is not FunctionState.READY:
                why = f"its function is {fn.state.value}"
            else:
                why = "its function changed version"
            self._spawn(self._stop_quietly(node, instance_id, why))
            await self.store.run(self.store.end_instance, instance_id, f"orphaned: {why}")
            log.info("stopping unknown instance", node=node.id, instance=instance_id,
                     reason=why)
        node.adopt_slices(adopted)

    def _adopt(self, node: NodeView, fn: FunctionRecord, record: InstanceRecord) -> None:
        pool = self._pool(fn)
        inst = InstanceView(id=record.id, function_id=fn.id, version=record.version,
                            node_id=node.id, start=record.start_kind,
                            gpu_memory=fn.spec.resources.gpu_memory,
                            last_used=self._clock())
        pool.instances[inst.id] = inst
        pool.changed.fire()
        self.events.emit(EventKind.INSTANCE_ADOPTED,
                         f"instance {inst.id} of {pool.name} adopted after a restart",
                         node_id=node.id, function=pool.name, instance=inst.id)
        log.info("instance adopted", instance=inst.id, function=pool.name, node=node.id)

    async def heartbeat(self, req: scheduler_pb2.HeartbeatRequest) -> bool:
        """Returns False when the node must register again."""
        node = self.nodes.get(req.node_id)
        if node is None:
            return False
        node.last_heartbeat = self._clock()
        node.take_report(list(req.devices))
        node.pinned = req.pinned
        node.disk_bytes = req.disk_bytes
        node.telemetry = req.telemetry
        if node.state is NodeState.LOST:
            target = NodeState.CORDONED if node.cordoned else NodeState.READY
            check_transition(node.state, target)
            node.state = target
            await self.store.run(self.store.set_node_state, node.id, node.state.value)
            # Its instances were written off when it was lost: stop what still runs.
            known = {i.id for p in self.pools.values() for i in p.instances.values()}
            for instance_id in set(req.instance_ids) - known - node.starting_ids:
                self._spawn(self._stop_quietly(node, instance_id, "its node was lost"))
            self._nodes_changed.set()
            self.events.emit(EventKind.NODE_RECOVERED, f"node {node.id} is back",
                             node_id=node.id)
            log.warning("node recovered", node=node.id)
        for exited in req.exited:
            await self._forget_instance(exited.instance_id, f"exited: {exited.reason}")
        self._observe_pressure(node)
        self._room.fire()
        return True

    def _observe_pressure(self, node: NodeView) -> None:
        readings = [Reading(device_resource(d.id), used, d.capacity_bytes)
                    for d, used in zip(node.devices, node.device_used(), strict=True)]
        readings.append(Reading(PINNED, node.pinned.used_bytes, node.pinned.capacity_bytes))
        for change in self.pressure.observe(node.id, readings):
            worse = change.level > change.previous
            message = (f"{change.resource} of node {node.id} is {change.level.label} "
                       f"({change.used_fraction:.0%} used, was {change.previous.label})")
            self.events.emit(EventKind.PRESSURE, message, node_id=node.id,
                             resource=change.resource, level=change.level.label,
                             previous=change.previous.label,
                             used_fraction=f"{change.used_fraction:.4f}")
            (log.warning if worse else log.info)("memory pressure", node=node.id,
                                                 resource=change.resource,
                                                 level=change.level.label,
                                                 used=round(change.used_fraction, 4))

    def _ready_nodes(self) -> list[NodeView]:
        return [n for n in self.nodes.values() if n.state is NodeState.READY]

    def _runnable_nodes(self, fn: FunctionRecord) -> list[NodeView]:
        """Ready nodes whose runtime can run the function: any for a plain function,
        docker nodes only for an image function."""
        return [n for n in self._ready_nodes() if n.runs(fn.spec.runtime.image)]

    def _check_runtime(self, fn: FunctionRecord) -> None:
        """FunctionUnavailable (503) now, rather than a wait for room that cannot
        come, when an image function has no ready docker node to run on."""
        if not fn.spec.runtime.image or self._runnable_nodes(fn):
            return
        docker = sorted((n for n in self.nodes.values() if n.runtime == DOCKER_RUNTIME),
                        key=lambda n: n.id)
        if not docker:
            raise FunctionUnavailable(NO_DOCKER_NODE)
        states = ", ".join(f"{n.id} {n.state.value}" for n in docker)
        raise FunctionUnavailable(f"no docker node is ready ({states}); image functions "
                                  "run only on nodes with THAW_RUNTIME=docker")

    @staticmethod
    def _image_missing(fn: FunctionRecord, lacking: dict[str, str]) -> FunctionUnavailable:
        """Every ready docker node refused for lack of the image (node id -> its error)."""
        if len(lacking) == 1:
            return FunctionUnavailable(next(iter(lacking.values())))
        return FunctionUnavailable(
            f"image {fn.spec.runtime.image} is on no docker node's engine (tried "
            f"{', '.join(lacking)}; nothing is pulled: `docker load` it on one)")

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

    async def _mark_lost(self, node: NodeView, reason: str) -> None:
        """Write the node off: its instances are gone, new work goes elsewhere."""
        if node.state is NodeState.LOST:
            return
        check_transition(node.state, NodeState.LOST)
        node.state = NodeState.LOST
        self.pressure.forget(node.id)
        log.error("node lost", node=node.id, reason=reason)
        self.events.emit(EventKind.NODE_LOST, f"node {node.id} lost: {reason}",
                         node_id=node.id)
        for inst in [i for p in self.pools.values() for i in p.instances.values()
                     if i.node_id == node.id]:
            await self._forget_instance(inst.id, f"node {node.id} lost")
        node.slices.clear()
        await self.store.run(self.store.set_node_state, node.id, NodeState.LOST.value)

    async def _probe(self, node: NodeView, why: str) -> None:
        """A call to the node failed: if its agent no longer answers, it is lost now
        rather than after node_timeout."""
        if node.id in self._probing or node.state is NodeState.LOST:
            return
        self._probing.add(node.id)
        try:
            if not await node.client.alive():
                await self._mark_lost(node, f"its agent stopped answering ({why})")
        finally:
            self._probing.discard(node.id)

    def heartbeat_age(self, node: NodeView) -> float:
        return max(0.0, self._clock() - node.last_heartbeat)

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
        if not cordoned:
            self._room.fire()
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

    def _keep_pinned(self, node: NodeView, manifest: manifest_pb2.SnapshotManifest) -> None:
        """Prewarm policy: a snapshot restored on a node is kept in that node's pinned
        tier, so its next cold start there copies from host memory only. The tier is
        LRU within its capacity, so what stays is what was used most recently; under
        memory pressure the pressure states evict (see pressure.py)."""
        key = manifest_key(manifest)
        if key in node.pinned.snapshot_keys or key in node.prewarming:
            return
        node.prewarming.add(key)

        async def prewarm() -> None:
            try:
                await node.client.prewarm(manifest, [])
                if key not in node.pinned.snapshot_keys:
                    node.pinned.snapshot_keys.append(key)
            except ThawError as exc:  # e.g. bigger than the tier: stays on disk
                log.info("snapshot not kept in pinned memory", node=node.id,
                         snapshot=manifest.function, reason=str(exc))
            finally:
                node.prewarming.discard(key)

        self._spawn(prewarm())

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
        """Deploy a new immutable version. A function already serving keeps serving its
        active version while the new one builds; the switch is atomic (versions.py)."""
        spec = read_bundle(bundle)
        digest = await asyncio.to_thread(self.bundles.put, bundle)
        if spec.snapshot:
            fn, version = await self.store.run(self.versions.deploy, tenant, spec, digest,
                                               "restore", True)
        else:
            fn, version = await self.store.run(
                self.versions.deploy, tenant, spec, digest, "fresh", False,
                "snapshots disabled in thaw.toml: runs with fresh starts")
            self._switched(fn)
        log.info("function deployed", function=f"{tenant}/{spec.name}",
                 version=version.version, state=version.state.value,
                 serving=fn.version if fn.state is FunctionState.READY else None)
        if version.state is VersionState.BUILDING:
            task = self._start_build(as_function(fn, version), bundle)
            if wait:
                return await asyncio.shield(task)
        return fn

    def _start_build(self, target: FunctionRecord, bundle: bytes
                     ) -> asyncio.Task[FunctionRecord]:
        key = _build_key(target.id, target.version)
        task = asyncio.create_task(self._build(target, bundle))
        self._builds[key] = task
        task.add_done_callback(lambda _t: self._builds.pop(key, None))
        return task

    def _switched(self, fn: FunctionRecord) -> None:
        """`fn` (its active version) was just made the serving version in the DB: new
        acquires place it; instances of any other version are retired, the idle ones
        now, the busy ones when their in-flight calls are done."""
        self._active[fn.id] = (fn.version, time.time())
        self._pool(fn)
        self._retire_old_versions(fn)
        self.events.emit(EventKind.VERSION_ACTIVATED,
                         f"{_fn_name(fn)} now serves version {fn.version}",
                         function=_fn_name(fn), version=str(fn.version))
        log.info("version activated", function=_fn_name(fn), version=fn.version)

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

    async def snapshot_tiers(self, fn: FunctionRecord) -> tuple[list[str], list[str]]:
        """(nodes whose disk tier holds the active snapshot, nodes whose pinned tier
        holds it), for the dashboard."""
        if not fn.snapshot_id:
            return [], []
        snap = await self.store.run(self.store.get_snapshot, fn.snapshot_id)
        if snap.state is not SnapshotState.READY or not snap.manifest:
            return [], []
        key = manifest_key(manifest_pb2.SnapshotManifest.FromString(snap.manifest))
        live = {n.id: n for n in self.nodes.values() if n.state is not NodeState.LOST}
        disk = sorted(h for h in self.holders.get(snap.id, {snap.node_id}) if h in live)
        pinned = sorted(i for i, n in live.items() if key in n.pinned.snapshot_keys)
        return disk, pinned

    async def delete_function(self, tenant: str, name: str) -> None:
        fn = await self.store.run(self.store.get_function, tenant, name)
        await self.store.run(self.store.set_function_state, fn.id, fn.version,
                             FunctionState.DELETED, "deleted")
        for key in [k for k in self._builds if k.startswith(f"{fn.id}@")]:
            self._builds.pop(key).cancel()
        self._active.pop(fn.id, None)
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
        manifests = await self.store.run(self.store.live_manifests)
        # The snapshots of the last RETAINED_VERSIONS versions stay, for rollbacks.
        for m in await self.store.run(self.versions.retained_manifests):
            if m not in manifests:
                manifests.append(m)
        keep = [manifest_pb2.SnapshotManifest.FromString(m) for m in manifests]
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
            if inst.version != fn.version and inst.state is InstanceState.READY:
                if inst.inflight == 0:
                    inst.state = InstanceState.STOPPING  # no request may pick it now
                    self._spawn(self._stop(pool, inst,
                                           f"replaced by version {fn.version}"))
                else:
                    inst.state = InstanceState.STOPPING

    async def _build(self, fn: FunctionRecord, bundle: bytes) -> FunctionRecord:
        """Build the snapshot of version fn.version on a node, then switch to it (the
        active version serves meanwhile). A failure is recorded on the version; the
        function fails with it only if nothing else serves. Returns the function as
        it is afterwards."""
        name = f"{fn.tenant}/{fn.name}"
        snapshot_id = ""
        lacking: dict[str, str] = {}  # docker nodes whose engine lacks the image -> why
        try:
            await self._wait_for_node()
            while True:
                # An image function builds on a docker node that has its image.
                self._check_runtime(fn)
                nodes = [n for n in self._runnable_nodes(fn) if n.id not in lacking]
                if not nodes:
                    raise self._image_missing(fn, lacking)
                node = min(nodes, key=lambda n: (n.starts_in_flight, n.id))
                snapshot_id = await self.store.run(self.store.create_snapshot, fn.id,
                                                   fn.version, node.id)
                node.starts_in_flight += 1
                try:
                    resp = await node.client.build_snapshot(
                        agent_pb2.BuildSnapshotRequest(function=spec_message(fn),
                                                       bundle=bundle),
                        timeout=self.build_timeout)
                    break
                except ImageNotOnNode as exc:
                    await self.store.run(self.store.finish_snapshot, snapshot_id,
                                         SnapshotState.FAILED, reason=str(exc))
                    snapshot_id = ""
                    lacking[node.id] = str(exc)
                    log.warning("image not on node; building on another", node=node.id,
                                function=name, error=str(exc))
                finally:
                    node.starts_in_flight -= 1
        except (ThawError, asyncio.TimeoutError) as exc:
            reason = f"snapshot build failed: {exc}"
            if snapshot_id:
                await self.store.run(self.store.finish_snapshot, snapshot_id,
                                     SnapshotState.FAILED, reason=reason)
            return await self._build_failed(fn, reason)

        if resp.ok:
            await self.store.run(self.store.finish_snapshot, snapshot_id, SnapshotState.READY,
                                 manifest=resp.manifest.SerializeToString(),
                                 stored_bytes=resp.stored_bytes)
            self.holders.setdefault(snapshot_id, set()).add(node.id)
            log.info("snapshot ready", function=name, version=fn.version,
                     snapshot=snapshot_id, bytes=resp.stored_bytes,
                     setup_s=round(resp.manifest.setup_seconds, 3))
            # Keep a template with the function's modules imported, so that the first
            # restore does not pay for imports; the switch (and a deploy that waits)
            # waits for it too.
            await self._prepare_template(node, fn, resp.manifest)
            updated = await self.store.run(self.versions.activate, fn.id, fn.version,
                                           start_mode="restore", snapshot_id=snapshot_id)
            # Its manifest is now one the collection keeps: the build is over for it.
            self._builds.pop(_build_key(fn.id, fn.version), None)
            self._spawn(self.collect_garbage())  # snapshots past the retained versions
        elif resp.stage == "capture":
            where = f" at {resp.attribute_path}" if resp.attribute_path else ""
            reason = (f"state cannot be snapshotted{where}: {resp.reason}; "
                      "runs with fresh starts")
            await self.store.run(self.store.finish_snapshot, snapshot_id, SnapshotState.FAILED,
                                 reason=reason)
            updated = await self.store.run(self.versions.activate, fn.id, fn.version,
                                           start_mode="fresh", reason=reason)
            log.warning("snapshot not possible", function=name, reason=reason)
        else:
            reason = f"{resp.stage} failed: {resp.reason}"
            await self.store.run(self.store.finish_snapshot, snapshot_id, SnapshotState.FAILED,
                                 reason=reason)
            return await self._build_failed(fn, reason)
        if updated is None:
            log.info("built version superseded; not activated", function=name,
                     version=fn.version)
            return await self.store.run(self.store.get_function_by_id, fn.id)
        self._switched(updated)
        return updated

    async def _build_failed(self, fn: FunctionRecord, reason: str) -> FunctionRecord:
        updated = await self.store.run(self.versions.fail, fn.id, fn.version, reason)
        serving = updated is not None and updated.state is FunctionState.READY
        log.warning("build failed", function=f"{fn.tenant}/{fn.name}", version=fn.version,
                    reason=reason, serving=updated.version if serving and updated else None)
        self.events.emit(EventKind.BUILD_FAILED,
                         f"{_fn_name(fn)} version {fn.version} failed to build: {reason}",
                         function=_fn_name(fn), version=str(fn.version))
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
        task = self._builds.get(_build_key(fn.id, fn.version))
        if task is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(task),
                                              max(0.0, deadline - self._clock()))
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"{fn.tenant}/{fn.name} is still building its snapshot") from exc
        return await self.store.run(self.store.get_function_by_id, fn.id)

    # ---- versions --------------------------------------------------------------

    def generation(self, function_id: str, version: int) -> float:
        """Since when `version` serves (unix time); 0.0 for a version that no longer
        does. Leases carry it: a gateway keeps using only the newest generation's."""
        active = self._active.get(function_id)
        return active[1] if active is not None and active[0] == version else 0.0

    async def list_versions(self, tenant: str, name: str
                            ) -> tuple[FunctionRecord, list[VersionRecord]]:
        """The function (its active version) and every version, newest first."""
        fn = await self.store.run(self.store.get_function, tenant, name)
        return fn, await self.store.run(self.versions.all, fn.id)

    async def rollback(self, tenant: str, name: str, version: int = 0
                       ) -> tuple[FunctionRecord, bool]:
        """Make `version` (0: the newest ready one before the active one) serve again:
        at once when its snapshot still exists (or it runs fresh), else after
        rebuilding its snapshot from its stored bundle while the active version keeps
        serving. Returns the function afterwards and whether it was rebuilt."""
        fn, versions = await self.list_versions(tenant, name)
        if version == 0:
            earlier = [v for v in versions
                       if v.state is VersionState.READY and v.version < fn.version]
            if not earlier:
                raise InvalidArgument(f"{tenant}/{name} has no ready version before "
                                      f"version {fn.version} to roll back to",
                                      field="version")
            target = earlier[0]
        else:
            found = [v for v in versions if v.version == version]
            if not found:
                raise NotFound(f"{tenant}/{name} has no version {version}", field="version")
            target = found[0]
        if target.state is not VersionState.READY:
            why = f": {target.reason}" if target.reason else ""
            raise InvalidArgument(f"version {target.version} of {tenant}/{name} is "
                                  f"{target.state.value}{why}; only a ready version can "
                                  "serve", field="version")
        if target.version == fn.version and fn.state is FunctionState.READY:
            return fn, False
        if target.restorable:
            updated = await self.store.run(
                self.versions.activate, fn.id, target.version, start_mode=target.start_mode,
                reason=target.reason, after_build=False)
            if updated is None:
                raise NotFound(f"function {tenant}/{name} not found", field="name")
            self._switched(updated)
            log.info("rolled back", function=f"{tenant}/{name}", version=target.version)
            return updated, False
        bundle = await asyncio.to_thread(self.bundles.get, target.bundle_digest)
        rebuilding = await self.store.run(self.versions.begin_rebuild, fn.id, target.version)
        log.info("rolling back: rebuilding a collected snapshot", function=f"{tenant}/{name}",
                 version=target.version)
        after = await asyncio.shield(self._start_build(as_function(fn, rebuilding), bundle))
        if after.version != target.version or after.state is not FunctionState.READY:
            failed = await self.store.run(self.versions.get, fn.id, target.version)
            raise FunctionUnavailable(
                f"rebuilding the snapshot of version {target.version} of {tenant}/{name} "
                f"failed ({failed.reason}); version {after.version} still serves")
        return after, True

    # ---- invocations -----------------------------------------------------------

    def _pool(self, fn: FunctionRecord) -> FunctionPool:
        pool = self.pools.get(fn.id)
        if pool is None:
            pool = self.pools[fn.id] = FunctionPool(
                fn.id, name=_fn_name(fn),
                queue=PriorityWaitQueue(self.policy.priority_aging_rate, self._clock))
        pool.min_instances = fn.spec.scaling.min_instances
        return pool

    async def acquire(self, tenant: str, name: str, wait: float,
                      priority: int = PRIORITY_DEFAULT, invocation_id: str = "") -> LeaseGrant:
        """A lease on an instance of the function: a warm one with a free slot, else a
        new one if the autoscaler wants one for the demand, else wait for either.

        Waiting requests are served in priority order, FIFO among equals, with aging
        (core/priority.py): only the head of the function's queue takes a free slot,
        and a new instance goes to the head, whoever started it. Requests waiting for
        room on the nodes retry placement in that order too (RoomTurn).

        Bounded: past function_queue_max waiting requests -> NoCapacity; when nothing
        fits and nothing can be evicted, at most placement_queue_max requests wait
        for room, each at most placement_queue_timeout; past the deadline ->
        DeadlineExceeded."""
        started = self._clock()
        deadline = started + (min(wait, self.acquire_wait) if wait > 0 else self.acquire_wait)
        fn = await self.store.run(self.store.get_function, tenant, name)
        while (fn.state is FunctionState.BUILDING
               and _build_key(fn.id, fn.version) in self._builds):
            fn = await self.wait_built(fn, deadline)  # (a superseded build: the next)
        if fn.state is FunctionState.FAILED:
            raise FunctionUnavailable(f"{tenant}/{name} cannot run: {fn.reason}")
        if fn.state is not FunctionState.READY:
            raise FunctionUnavailable(f"{tenant}/{name} is {fn.state.value}")
        pool = self._pool(fn)
        pool.last_acquired = self._clock()
        scaling = fn.spec.scaling
        if pool.waiters >= self.policy.function_queue_max:
            self.events.emit(EventKind.PLACEMENT_REFUSED,
                             f"{pool.name}: {pool.waiters} requests already waiting",
                             function=pool.name)
            raise NoCapacity(f"{tenant}/{name} already has {pool.waiters} requests waiting "
                             "for an instance; try again later")
        pool.waiters += 1
        me = pool.queue.push(QueuedAcquire(), priority, invocation_id)
        room_since: float | None = None
        room: Waiter[RoomTurn] | None = None
        try:
            while True:
                seen = pool.changed.token()
                if self._active.setdefault(fn.id, (fn.version, fn.updated_at))[0] != fn.version:
                    # A deploy or rollback switched versions since fn was read: place
                    # the serving one (the old one's instances are being retired).
                    fn = await self.store.run(self.store.get_function, tenant, name)
                    scaling = fn.spec.scaling
                    continue
                first_in_line = pool.first_in_line() is me
                inst = pool.pick(fn.version, scaling.max_concurrency) if first_in_line else None
                if inst is not None:
                    return self._grant(pool, inst, "warm", (("queue", self._clock() - started),),
                                       scaling.timeout)
                if pool.needs_instance(scaling, fn.version):
                    pool.starting += 1
                    # Server-Timing stages are disjoint: the queue ends where the start
                    # (restore or import+setup) begins.
                    queued = self._clock() - started
                    epoch = self._room.fired
                    me.item.starting = True
                    try:
                        inst, timings = await self._start_instance(fn)
                    except _NoRoom as exc:
                        me.item.starting = False
                        pool.starting -= 1
                        pool.changed.fire()
                        first = room_since is None
                        room_since = self._clock() if room_since is None else room_since
                        if room is None:
                            room = self._room_queue.push(RoomTurn(), me.priority, invocation_id)
                        room.item.tried = epoch
                        self._room_turns.fire()
                        await self._wait_for_room(pool, str(exc), room_since, deadline, first,
                                                  room)
                        continue
                    except BaseException:
                        pool.starting -= 1
                        pool.changed.fire()
                        raise
                    pool.starting -= 1
                    me.item.starting = False
                    self._leave_room_queue(room)
                    room = None
                    if pool.first_in_line() is me:
                        self._add_instance(pool, inst)
                        return self._grant(pool, inst, inst.start,
                                           (("queue", queued), *timings), scaling.timeout)
                    # Started by a request further back: the head takes it (and reports
                    # the cold start); this one waits on in its place.
                    inst.unclaimed_start = (inst.start, timings)
                    self._add_instance(pool, inst)
                    continue
                self._leave_room_queue(room)
                room = None
                remaining = deadline - self._clock()
                if remaining <= 0:
                    live = len(pool.live(fn.version))
                    raise DeadlineExceeded(
                        f"no instance of {tenant}/{name} became free within "
                        f"{self._clock() - started:.0f}s ({live} busy at max_concurrency="
                        f"{scaling.max_concurrency}, max_instances={scaling.max_instances})")
                await Broadcast.wait(seen, remaining)
        finally:
            pool.waiters -= 1
            pool.queue.remove(me)
            self._leave_room_queue(room)
            pool.changed.fire()  # the next in line may take what this one leaves

    def _leave_room_queue(self, room: Waiter[RoomTurn] | None) -> None:
        if room is not None and self._room_queue.remove(room):
            self._room_turns.fire()

    def _room_turn(self, room: Waiter[RoomTurn]) -> bool:
        """May this room waiter retry placement now (see RoomTurn)?"""
        epoch = self._room.fired
        if room.item.tried >= epoch:
            return False  # no room changed since its last try
        for waiter in self._room_queue:
            if waiter is room:
                return True
            if waiter.item.tried < epoch:
                return False  # one ahead has yet to try since the change
        return True  # not queued (any more): nothing to wait for

    def set_priority(self, invocation_id: str, priority: int, tenant: str = ""
                     ) -> tuple[str, int, float, int]:
        """Give a queued invocation a new priority (an operator moving it ahead):
        (tenant/name, priority, effective priority, requests ahead of it now).
        NotFound when no acquire of that invocation (of `tenant`, unless "") is
        waiting here."""
        for pool in self.pools.values():
            waiter = pool.queue.find(invocation_id)
            if waiter is None or (tenant and not pool.name.startswith(f"{tenant}/")):
                continue
            pool.queue.set_priority(waiter, priority)
            room = self._room_queue.find(invocation_id)
            if room is not None:
                self._room_queue.set_priority(room, priority)
                self._room_turns.fire()
            pool.changed.fire()
            self.events.emit(EventKind.PRIORITY_CHANGED,
                             f"invocation {invocation_id} of {pool.name} set to priority "
                             f"{priority}", function=pool.name, invocation=invocation_id,
                             priority=str(priority))
            return (pool.name, priority, pool.queue.effective(waiter),
                    pool.queue.rank(waiter))
        raise NotFound(f"invocation {invocation_id} is not waiting for an instance "
                       "(it was served, finished or never queued here)",
                       field="invocation_id")

    async def _wait_for_room(self, pool: FunctionPool, why: str, since: float,
                             deadline: float, first: bool,
                             room: Waiter[RoomTurn] | None = None) -> None:
        """Nothing fits and nothing can be evicted: wait (bounded) until room may have
        appeared and it is this request's turn to retry (RoomTurn), then the caller
        tries again from the top (a warm instance may have freed meanwhile)."""
        seen = self._room.token()  # no suspension since the failed placement
        until = min(deadline, since + self.policy.placement_queue_timeout)
        remaining = until - self._clock()
        if remaining <= 0:
            self.events.emit(EventKind.PLACEMENT_REFUSED,
                             f"{pool.name}: no room within {self._clock() - since:.0f}s: {why}",
                             function=pool.name)
            raise DeadlineExceeded(f"no room for {pool.name} within "
                                   f"{self._clock() - since:.0f}s: {why}")
        if self.room_waiters >= self.policy.placement_queue_max:
            self.events.emit(EventKind.PLACEMENT_REFUSED,
                             f"{pool.name}: placement queue full ({self.room_waiters})",
                             function=pool.name)
            raise NoCapacity(f"{why}; {self.room_waiters} requests are already queued for "
                             "room, try again later")
        if first:
            self.events.emit(EventKind.PLACEMENT_QUEUED, f"{pool.name} waits for room: {why}",
                             function=pool.name)
        self.room_waiters += 1
        try:
            if room is None:
                await Broadcast.wait(seen, remaining)
                return
            while not self._room_turn(room):
                remaining = until - self._clock()
                if remaining <= 0:
                    return  # the caller's next try fails and reports the deadline
                await Broadcast.wait_any((self._room.token(), self._room_turns.token()),
                                         remaining)
        finally:
            self.room_waiters -= 1

    def _add_instance(self, pool: FunctionPool, inst: InstanceView) -> None:
        pool.instances[inst.id] = inst
        if inst.version != self._active.get(inst.function_id, (inst.version, 0.0))[0]:
            # Started for a version switched out meanwhile: it serves the call it was
            # started for (granted right after this, if any), then retires.
            inst.state = InstanceState.STOPPING
            self._spawn(self._retire_if_idle(pool, inst))
        pool.changed.fire()

    async def _retire_if_idle(self, pool: FunctionPool, inst: InstanceView) -> None:
        await asyncio.sleep(0)  # after the grant that may follow _add_instance
        if inst.state is InstanceState.STOPPING and inst.inflight == 0:
            await self._stop(pool, inst, "its version was replaced while it started")

    def _grant(self, pool: FunctionPool, inst: InstanceView, start: str,
               timings: tuple[tuple[str, float], ...], timeout: float) -> LeaseGrant:
        if inst.unclaimed_start is not None:
            # Its first lease: the start it waited for was this instance's cold start.
            start, cold = inst.unclaimed_start
            timings = (*timings, *cold)
            inst.unclaimed_start = None
        inst.inflight += 1
        lease_id = uuid.uuid4().hex
        self.leases[lease_id] = (pool, inst)
        node = self.nodes[inst.node_id]
        return LeaseGrant(lease_id, inst, node.data_url, start, timings, timeout)

    async def release(self, lease_id: str, failed: bool, reason: str) -> None:
        entry = self.leases.pop(lease_id, None)
        if entry is None:
            return  # granted by a scheduler before a restart, or released twice
        pool, inst = entry
        inst.inflight -= 1
        inst.last_used = self._clock()
        pool.changed.fire()
        self._room.fire()
        if failed:
            await self._forget_instance(inst.id, reason or "failed while serving")
            node = self.nodes.get(inst.node_id)
            if node is not None:
                self._spawn(self._stop_quietly(node, inst.id, reason or "failed"))
                self._spawn(self._probe(node, reason or "an invocation failed"))
        elif inst.state is InstanceState.STOPPING and inst.inflight == 0:
            await self._stop(pool, inst, "retired")

    def _candidates(self, fn: FunctionRecord, key: str, holders: set[str],
                    excluded: set[str], evicting: bool = False) -> list[Candidate]:
        """Nodes that may take a cold start: ready and not excluded. A node in memory
        EMERGENCY takes no new cold starts into its free memory; when `evicting`, it
        is offered with no free memory, so that only what its own idle instances
        give back can hold the new slice (its usage does not grow)."""
        out = []
        pool = self.pools.get(fn.id)
        per_node: dict[str, int] = {}
        for inst in pool.instances.values() if pool is not None else ():
            per_node[inst.node_id] = per_node.get(inst.node_id, 0) + 1
        for function_id, node_id in self._placing.values():
            if function_id == fn.id:
                per_node[node_id] = per_node.get(node_id, 0) + 1
        for n in self._runnable_nodes(fn):
            if n.id in excluded:
                continue
            free = n.device_free()
            if self.pressure.node_level(n.id) >= PressureLevel.EMERGENCY:
                if not evicting:
                    continue
                free = [0] * len(free)
            out.append(Candidate(node_id=n.id, device_free=free,
                                 snapshot_pinned=bool(key) and key in n.pinned.snapshot_keys,
                                 snapshot_on_disk=n.id in holders,
                                 starts_in_flight=n.starts_in_flight,
                                 same_function=per_node.get(n.id, 0)))
        return out

    def _idle_instances(self) -> list[IdleInstance]:
        idle = []
        for pool in self.pools.values():
            for inst in pool.instances.values():
                node = self.nodes.get(inst.node_id)
                if (inst.state is not InstanceState.READY or inst.inflight or node is None
                        or inst.id not in node.slices):
                    continue
                index, nbytes = node.slices[inst.id]
                idle.append(IdleInstance(inst.id, pool.function_id, inst.node_id, index,
                                         nbytes, inst.last_used))
        return idle

    def _spare(self) -> dict[str, int]:
        """Per function, live instances above its min_instances: what eviction may take."""
        return {fid: max(0, sum(1 for i in p.instances.values()
                                if i.state is InstanceState.READY) - p.min_instances)
                for fid, p in self.pools.items()}

    async def _place(self, fn: FunctionRecord, instance_id: str, need: int, key: str,
                     holders: set[str], excluded: set[str]) -> NodeView:
        """Choose a node and charge the slice to its ledger; evict idle instances (LRU,
        never below min_instances) if nothing fits; _NoRoom if that cannot help."""
        chosen = choose_node(self._candidates(fn, key, holders, excluded), need)
        if chosen is not None:
            node = self.nodes[chosen.node_id]
        else:
            plan = plan_eviction(self._candidates(fn, key, holders, excluded, evicting=True),
                                 self._idle_instances(), need, self._spare())
            if plan is None:
                raise _NoRoom(f"no node has {need} bytes of slice memory free for "
                              f"{_fn_name(fn)} and no idle instance can be evicted for it")
            victims = []
            for victim in plan.victims:
                pool = self.pools[victim.function_id]
                inst = pool.instances.get(victim.instance_id)
                if inst is not None and inst.state is InstanceState.READY and not inst.inflight:
                    inst.state = InstanceState.STOPPING  # no request may pick it now
                    victims.append((pool, inst))
            await asyncio.gather(*(self._stop(
                pool, inst, f"evicted to make room for {_fn_name(fn)}",
                kind=EventKind.INSTANCE_EVICTED) for pool, inst in victims))
            node = self.nodes[plan.node_id]
            if node.state is not NodeState.READY:
                raise _NoRoom(f"node {node.id} went away while making room for "
                              f"{_fn_name(fn)}")
        if node.reserve(instance_id, need) is None:
            # Another start took the room while the victims stopped: the caller
            # waits for room and tries again.
            raise _NoRoom(f"no node has {need} bytes of slice memory free for "
                          f"{_fn_name(fn)} (the room made was taken)")
        return node

    async def _start_instance(self, fn: FunctionRecord
                              ) -> tuple[InstanceView, tuple[tuple[str, float], ...]]:
        await self._wait_for_node()
        self._check_runtime(fn)
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
        instance_id = new_id("inst")
        # Past the tenant's quota -> QuotaExceeded (429); its warm instances still serve.
        await self.quotas.claim(fn.tenant, instance_id, need, self.pools.values())
        try:
            return await self._start_placed(fn, instance_id, need, manifest, key, holders)
        finally:
            self._placing.pop(instance_id, None)
            self.quotas.release(instance_id)

    async def _start_placed(self, fn: FunctionRecord, instance_id: str, need: int,
                            manifest: manifest_pb2.SnapshotManifest | None, key: str,
                            holders: set[str]
                            ) -> tuple[InstanceView, tuple[tuple[str, float], ...]]:
        excluded: set[str] = set()
        lacking: dict[str, str] = {}  # docker nodes whose engine lacks the image -> why
        while True:
            if lacking and all(n.id in lacking for n in self._runnable_nodes(fn)):
                raise self._image_missing(fn, lacking)
            node = await self._place(fn, instance_id, need, key, holders, excluded)
            self._placing[instance_id] = (fn.id, node.id)
            node.starts_in_flight += 1
            node.starting_ids.add(instance_id)
            try:
                resp = await self._start_on(node, fn, instance_id, manifest, holders)
                break
            except (Unavailable, OutOfMemory) as exc:
                node.unreserve(instance_id)
                # The node is gone (its agent does not answer) or its memory is not
                # what the ledger says: try the other nodes before giving up.
                if isinstance(exc, Unavailable):
                    if await node.client.alive():
                        raise
                    await self._mark_lost(node, f"unreachable while starting: {exc}")
                log.warning("start failed on node; trying another", node=node.id,
                            function=_fn_name(fn), error=str(exc))
                excluded.add(node.id)
            except ImageNotOnNode as exc:
                node.unreserve(instance_id)
                log.warning("image not on node; trying another", node=node.id,
                            function=_fn_name(fn), error=str(exc))
                excluded.add(node.id)
                lacking[node.id] = str(exc)
            except BaseException:
                node.unreserve(instance_id)
                raise
            finally:
                node.starts_in_flight -= 1
                node.starting_ids.discard(instance_id)
        start = "restore" if resp.kind == agent_pb2.START_RESTORE else "fresh"
        if start == "restore" and fn.snapshot_id and manifest is not None:
            holders.add(node.id)  # it fetched the chunks it lacked
            self._keep_pinned(node, manifest)
        await self.store.run(self.store.add_instance, instance_id, fn.id, fn.version, node.id,
                             start)
        inst = InstanceView(id=instance_id, function_id=fn.id, version=fn.version,
                            node_id=node.id, start=start, gpu_memory=need,
                            last_used=self._clock())
        self.events.emit(EventKind.INSTANCE_STARTED,
                         f"instance {instance_id} of {_fn_name(fn)} started ({start})",
                         node_id=node.id, function=_fn_name(fn), instance=instance_id,
                         start=start)
        log.info("instance started", function=_fn_name(fn), instance=instance_id,
                 node=node.id, start=start,
                 timings={t.stage: round(t.seconds, 4) for t in resp.timings})
        return inst, tuple((t.stage, t.seconds) for t in resp.timings)

    async def _start_on(self, node: NodeView, fn: FunctionRecord, instance_id: str,
                        manifest: manifest_pb2.SnapshotManifest | None, holders: set[str]
                        ) -> agent_pb2.StartInstanceResponse:
        """Restore (or start fresh) on the node; a snapshot that fails to restore is
        quarantined and the instance starts fresh."""
        kind = agent_pb2.START_RESTORE if manifest is not None else agent_pb2.START_FRESH
        peers = [self.nodes[h].control_address for h in sorted(holders)
                 if h != node.id and h in self.nodes
                 and self.nodes[h].state is not NodeState.LOST]
        try:
            return await node.client.start_instance(agent_pb2.StartInstanceRequest(
                instance_id=instance_id, function=spec_message(fn), kind=kind,
                manifest=manifest, peers=peers), timeout=START_RPC_TIMEOUT)
        except (SnapshotError, ChunkNotFound) as exc:
            if fn.snapshot_id is None:
                raise
            if isinstance(exc, ChunkNotFound):
                # The data is out of reach (its nodes are down), not broken: start
                # fresh this time and keep the snapshot.
                log.warning("snapshot chunks unreachable; starting fresh",
                            function=_fn_name(fn), error=str(exc))
            else:
                await self._quarantine(fn, str(exc))
            self.events.emit(EventKind.RESTORE_FAILED,
                             f"restore of {_fn_name(fn)} on {node.id} failed: {exc}",
                             node_id=node.id, function=_fn_name(fn),
                             snapshot=fn.snapshot_id, quarantined=not isinstance(
                                 exc, ChunkNotFound))
            return await node.client.start_instance(agent_pb2.StartInstanceRequest(
                instance_id=instance_id, function=spec_message(fn),
                kind=agent_pb2.START_FRESH), timeout=START_RPC_TIMEOUT)

    async def _quarantine(self, fn: FunctionRecord, reason: str) -> None:
        """A restore failed: never use this snapshot again; run fresh (no rebuild loop)."""
        assert fn.snapshot_id is not None
        await self.store.run(self.store.finish_snapshot, fn.snapshot_id,
                             SnapshotState.QUARANTINED, reason=reason)
        await self.store.run(self.store.set_function_state, fn.id, fn.version,
                             FunctionState.READY,
                             f"snapshot quarantined after a failed restore: {reason}; "
                             "runs with fresh starts", "fresh")
        await self.store.run(self.versions.run_fresh, fn.id, fn.version,
                             f"snapshot quarantined after a failed restore: {reason}")
        log.error("snapshot quarantined", function=_fn_name(fn),
                  snapshot=fn.snapshot_id, reason=reason)
        self.events.emit(EventKind.SNAPSHOT_QUARANTINED,
                         f"snapshot {fn.snapshot_id} of {_fn_name(fn)} quarantined: {reason}",
                         function=_fn_name(fn), snapshot=fn.snapshot_id)

    async def _stop(self, pool: FunctionPool, inst: InstanceView, reason: str,
                    kind: EventKind = EventKind.INSTANCE_STOPPED) -> None:
        inst.state = InstanceState.STOPPING
        node = self.nodes.get(inst.node_id)
        if node is not None and node.state is not NodeState.LOST:
            try:
                await node.client.stop_instance(inst.id, reason)
            except ThawError as exc:
                log.warning("stop failed", instance=inst.id, error=str(exc))
        await self._forget_instance(inst.id, reason, kind)

    async def _stop_quietly(self, node: NodeView, instance_id: str, reason: str) -> None:
        try:
            await node.client.stop_instance(instance_id, reason)
        except ThawError as exc:
            log.info("stop not delivered", node=node.id, instance=instance_id, error=str(exc))

    async def _forget_instance(self, instance_id: str, reason: str,
                               kind: EventKind = EventKind.INSTANCE_LOST) -> None:
        for pool in self.pools.values():
            inst = pool.instances.pop(instance_id, None)
            if inst is not None:
                inst.state = InstanceState.GONE
                node = self.nodes.get(inst.node_id)
                if node is not None:
                    node.unreserve(inst.id)
                pool.changed.fire()
                self._room.fire()
                self.events.emit(kind, f"instance {instance_id} of {pool.name}: {reason}",
                                 node_id=inst.node_id, function=pool.name,
                                 instance=instance_id)
                await self.store.run(self.store.end_instance, instance_id, reason)
                log.info("instance gone", instance=instance_id, reason=reason)
                return

    # ---- background ------------------------------------------------------------

    def _spawn(self, coro: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reconcile_once(self) -> None:
        """Mark silent nodes lost; end instances no node reclaimed after a restart;
        scale idle instances down (sooner under memory pressure); keep min_instances
        warm; drop pinned snapshots of idle functions from nodes in CRITICAL."""
        now = self._clock()
        for node in list(self.nodes.values()):
            if (node.state is not NodeState.LOST
                    and now - node.last_heartbeat > self.node_timeout):
                await self._mark_lost(node, f"no heartbeat for {now - node.last_heartbeat:.1f}s")
        if self._unclaimed and now >= self._unclaimed_until:
            for record in list(self._unclaimed.values()):
                await self.store.run(self.store.end_instance, record.id,
                                     "scheduler restarted and its node did not report it")
            log.info("unclaimed instances ended", count=len(self._unclaimed))
            self._unclaimed.clear()
        functions = {fn.id: fn for fn in await self.store.run(self.store.active_functions)}
        for function_id, pool in list(self.pools.items()):
            fn = functions.get(function_id)
            if fn is not None:
                await self._scale_down(pool, fn, now)
        for fn in functions.values():
            if fn.state is FunctionState.READY and fn.spec.scaling.min_instances > 0:
                self._keep_warm(fn)
        if any(self.pressure.node_level(n.id) >= PressureLevel.CRITICAL
               for n in self.nodes.values() if n.state is not NodeState.LOST):
            await self._evict_idle_snapshots(now)

    def _idle_window(self, inst: InstanceView, window: float) -> float:
        """scaledown_window, halved under PRESSURE on the instance's device and zero
        under CRITICAL or worse (every idle instance above min_instances goes)."""
        node = self.nodes.get(inst.node_id)
        if node is None or inst.id not in node.slices or not node.devices:
            return window
        index = node.slices[inst.id][0]
        level = self.pressure.level(node.id, device_resource(node.devices[index].id))
        if level >= PressureLevel.CRITICAL:
            return 0.0
        if level is PressureLevel.PRESSURE:
            return window / 2
        return window

    async def _scale_down(self, pool: FunctionPool, fn: FunctionRecord, now: float) -> None:
        pool.min_instances = fn.spec.scaling.min_instances
        window = fn.spec.scaling.scaledown_window
        ready = [i for i in pool.instances.values() if i.state is InstanceState.READY]
        idle = {i.id: i for i in ready if i.inflight == 0}
        if not idle:
            return
        views = [IdleInstanceView(i.id, i.last_used, self._idle_window(i, window))
                 for i in idle.values()]
        shortened = {v.instance_id for v in views if v.window < window}
        for instance_id in scale_down(views, len(ready), pool.min_instances, now):
            inst = idle[instance_id]
            if inst.state is not InstanceState.READY or inst.inflight:
                continue  # picked up while an earlier stop was awaited
            if instance_id in shortened and now - inst.last_used < window:
                await self._stop(pool, inst, "evicted under memory pressure",
                                 kind=EventKind.INSTANCE_EVICTED)
            else:
                await self._stop(pool, inst, "idle past scaledown_window")

    def _keep_warm(self, fn: FunctionRecord) -> None:
        """Start instances (in the background) up to min_instances, counting those
        starting and those a restarted scheduler still expects its nodes to report."""
        pool = self._pool(fn)
        live = len(pool.live(fn.version))
        expected = sum(1 for r in self._unclaimed.values()
                       if r.function_id == fn.id and r.version == fn.version)
        if not self._runnable_nodes(fn) or self._clock() < pool.warm_retry_at:
            return
        for _ in range(fn.spec.scaling.min_instances - live - pool.starting - expected):
            pool.starting += 1
            self._spawn(self._warm_one(fn, pool))

    async def _warm_one(self, fn: FunctionRecord, pool: FunctionPool) -> None:
        try:
            inst, _timings = await self._start_instance(fn)
        except (_NoRoom, ThawError) as exc:
            pool.warm_retry_at = self._clock() + WARM_RETRY_SECONDS
            log.warning("could not keep min_instances warm", function=pool.name,
                        error=str(exc), retry_in=WARM_RETRY_SECONDS)
            self.events.emit(EventKind.PLACEMENT_REFUSED,
                             f"{pool.name}: min_instances not kept: {exc}", function=pool.name)
            return
        finally:
            pool.starting -= 1
            pool.changed.fire()
        self._add_instance(pool, inst)

    async def _evict_idle_snapshots(self, now: float) -> None:
        """On nodes in CRITICAL memory pressure or worse, drop the pinned copies of
        snapshots whose function has not been used for pressure_pinned_idle. (On the
        host backend slices and the pinned tier are both host memory; on CUDA the
        pinned tier is page-locked host memory that restores also stage through.)"""
        by_key: dict[str, tuple[str, str, manifest_pb2.SnapshotManifest]] = {}
        for snap in await self.store.run(self.store.live_snapshots):
            manifest = manifest_pb2.SnapshotManifest.FromString(snap.manifest)
            by_key[manifest_key(manifest)] = (snap.function_id, snap.function, manifest)
        for node in list(self.nodes.values()):
            if (node.state is NodeState.LOST
                    or self.pressure.node_level(node.id) < PressureLevel.CRITICAL):
                continue
            for key in list(node.pinned.snapshot_keys):
                if key not in by_key:
                    continue
                function_id, name, manifest = by_key[key]
                pool = self.pools.get(function_id)
                last = max(self._started_at, pool.last_acquired if pool else 0.0)
                busy = pool is not None and (pool.waiters or any(
                    i.inflight for i in pool.instances.values()))
                if busy or now - last < self.policy.pressure_pinned_idle:
                    continue
                try:
                    freed = (await node.client.evict(manifest)).bytes
                except ThawError as exc:
                    log.warning("pinned eviction failed", node=node.id, function=name,
                                error=str(exc))
                    continue
                if key in node.pinned.snapshot_keys:
                    node.pinned.snapshot_keys.remove(key)
                self.events.emit(EventKind.SNAPSHOT_EVICTED,
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
        interrupted = await self.store.run(self.versions.fail_interrupted_builds)
        if interrupted:
            log.warning("builds interrupted by the restart marked failed", count=interrupted)
        records = await self.store.run(self.store.live_instances)
        self._unclaimed = {r.id: r for r in records}
        self._unclaimed_until = (self._clock() + self.node_timeout
                                 + ADOPT_GRACE_HEARTBEATS * self.heartbeat_interval)
        if records:
            log.info("waiting for nodes to report live instances", count=len(records))

    async def close(self) -> None:
        for task in list(self._builds.values()) + list(self._background):
            task.cancel()
        await asyncio.gather(*self._builds.values(), *self._background, return_exceptions=True)
        for node in self.nodes.values():
            await node.client.close()

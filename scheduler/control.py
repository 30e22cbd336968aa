"""The control plane (DESIGN.md §2, §8): functions, snapshot builds, instance leases,
nodes, autoscaling, eviction and memory pressure, composed from one part each:

    fleet.py      node agents: register, heartbeat, lost nodes, cordon, pressure
    instances.py  stopping, forgetting and retiring instances
    tiers.py      where snapshots are held: prewarm, evict, keep pinned, GC
    starts.py     placement and cold starts, quarantine of a failed snapshot
    builds.py     deploys, snapshot builds and templates, versions and rollback
    leasing.py    acquire and release, priorities, the queue for room
    reconcile.py  scale down, keep warm, evict idle snapshots, recovery

They share one PlaneState (plane_state.py) and call each other only downwards in that
order; nothing imports this facade back. State that must survive a restart is in the
DB (Store); what is in memory is rebuilt from it and from agents' registrations and
heartbeats. The decisions themselves are pure and live elsewhere: placement.py,
autoscale.py, pressure.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from thaw.core.priority import PRIORITY_DEFAULT
from thaw.proto import scheduler_pb2
from thaw.scheduler.builds import Builds, Deployed
from thaw.scheduler.bundles import BundleStore
from thaw.scheduler.events import EventKind, EventLog
from thaw.scheduler.fleet import NO_DOCKER_NODE, NODE_WAIT_SECONDS, Fleet
from thaw.scheduler.gc import GarbageCollector
from thaw.scheduler.instances import Instances
from thaw.scheduler.leasing import LeaseGrant, Leasing
from thaw.scheduler.nodes import AgentClient, NodeView
from thaw.scheduler.plane_state import PlaneState, Timeouts, spec_message
from thaw.scheduler.policy import PolicyConfig
from thaw.scheduler.pools import Broadcast, FunctionPool, InstanceView
from thaw.scheduler.pressure import PressureTracker
from thaw.scheduler.reconcile import ADOPT_GRACE_HEARTBEATS, WARM_RETRY_SECONDS, Reconciler
from thaw.scheduler.secrets import SecretStore
from thaw.scheduler.starts import START_RPC_TIMEOUT, Starts
from thaw.scheduler.store import FunctionRecord, InstanceRecord, Store
from thaw.scheduler.tenancy import QuotaLedger
from thaw.scheduler.tiers import Tiers
from thaw.scheduler.versions import VersionRecord, VersionStore

__all__ = ["ADOPT_GRACE_HEARTBEATS", "NODE_WAIT_SECONDS", "NO_DOCKER_NODE",
           "START_RPC_TIMEOUT", "WARM_RETRY_SECONDS", "ControlPlane", "FunctionPool",
           "InstanceView", "LeaseGrant", "spec_message"]


class ControlPlane:
    def __init__(self, store: Store, bundles: BundleStore, *, heartbeat_interval: float,
                 node_timeout: float, build_timeout: float, acquire_wait: float,
                 policy: PolicyConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 agent_client: Callable[[str], AgentClient] = AgentClient,
                 events: EventLog | None = None, gc_log_age: float = 86_400.0,
                 secrets: SecretStore | None = None) -> None:
        self.state = s = PlaneState(
            store=store, bundles=bundles,
            timeouts=Timeouts(heartbeat_interval, node_timeout, build_timeout, acquire_wait),
            policy=policy or PolicyConfig.load(), clock=clock, agent_client=agent_client,
            events=events or EventLog(), secrets=secrets)
        self.instances = Instances(s)
        self.fleet = Fleet(s, self.instances)
        self.tiers = Tiers(s)
        self.starts = Starts(s, self.fleet, self.instances, self.tiers)
        self.builds = Builds(s, self.fleet, self.instances, self.tiers)
        self.leasing = Leasing(s, self.fleet, self.instances, self.starts, self.builds)
        self.reconciler = Reconciler(s, self.fleet, self.instances, self.starts)
        self.gc = GarbageCollector(s, self.tiers, log_max_age=gc_log_age)
        # The shared state, under the names the service, the operator passes and the
        # tests read (the same objects, never rebound).
        self.store: Store = s.store
        self.bundles: BundleStore = s.bundles
        self.policy: PolicyConfig = s.policy
        self.events: EventLog = s.events
        self.pressure: PressureTracker = s.pressure
        self.versions: VersionStore = s.versions
        self.quotas: QuotaLedger = s.quotas
        self.nodes: dict[str, NodeView] = s.nodes
        self.pools: dict[str, FunctionPool] = s.pools
        self.leases: dict[str, tuple[FunctionPool, InstanceView]] = s.leases
        self.holders: dict[str, set[str]] = s.holders
        self._room: Broadcast = s.room
        self._background: set[asyncio.Task[object]] = s.background
        # Snapshots quarantined for corrupt chunks are rebuilt by the reconcile loop.
        self.reconciler.builds = self.builds

    @property
    def heartbeat_interval(self) -> float:
        return self.state.timeouts.heartbeat_interval

    @property
    def node_timeout(self) -> float:
        return self.state.timeouts.node_timeout

    @property
    def build_timeout(self) -> float:
        return self.state.timeouts.build_timeout

    @property
    def acquire_wait(self) -> float:
        return self.state.timeouts.acquire_wait

    @property
    def room_waiters(self) -> int:
        """Requests waiting for room on some node (bounded by placement_queue_max)."""
        return self.state.room_waiters

    @property
    def unclaimed(self) -> dict[str, InstanceRecord]:
        """After a restart: instances the DB knows as live no node has reported yet."""
        return self.state.unclaimed

    # ---- nodes ----------------------------------------------------------------

    async def register(self, req: scheduler_pb2.RegisterRequest) -> None:
        await self.fleet.register(req)

    async def heartbeat(self, req: scheduler_pb2.HeartbeatRequest) -> bool:
        """Returns False when the node must register again."""
        known = await self.fleet.heartbeat(req)
        if known:
            self.builds.steps.take(req.node_id, req.building)
        return known

    def heartbeat_age(self, node: NodeView) -> float:
        return self.fleet.heartbeat_age(node)

    async def cordon(self, node_id: str, cordoned: bool) -> NodeView:
        return await self.fleet.cordon(node_id, cordoned)

    def node_instances(self, node_id: str) -> int:
        return self.fleet.node_instances(node_id)

    # ---- snapshot tiers --------------------------------------------------------

    async def prewarm(self, tenant: str, name: str, node_id: str = ""
                      ) -> tuple[list[str], int, float]:
        return await self.tiers.prewarm(tenant, name, node_id)

    async def evict(self, tenant: str, name: str, node_id: str = "") -> tuple[list[str], int]:
        return await self.tiers.evict(tenant, name, node_id)

    async def snapshot_bytes(self, fn: FunctionRecord) -> int:
        return await self.tiers.snapshot_bytes(fn)

    async def snapshot_facts(self, fn: FunctionRecord) -> tuple[int, str]:
        return await self.tiers.snapshot_facts(fn)

    async def input_schema(self, tenant: str, name: str) -> str:
        """The input schema the function's calls are checked against ("" = none): its
        active snapshot's, or for one running fresh the version's."""
        fn = await self.store.run(self.store.get_function, tenant, name)
        _, schema = await self.snapshot_facts(fn)
        if not schema and fn.start_mode == "fresh":
            schema = await self.store.run(self.versions.input_schema, fn.id, fn.version)
        return schema

    async def snapshot_tiers(self, fn: FunctionRecord) -> tuple[list[str], list[str]]:
        return await self.tiers.snapshot_tiers(fn)

    async def collect_garbage(self) -> int:
        return await self.tiers.collect_garbage()

    # ---- functions and versions --------------------------------------------------

    async def create_function(self, tenant: str, bundle: bytes, wait: bool) -> FunctionRecord:
        return await self.builds.create_function(tenant, bundle, wait)

    async def deploy(self, tenant: str, bundle: bytes, wait: bool, force: bool = False
                     ) -> Deployed:
        return await self.builds.deploy(tenant, bundle, wait, force)

    async def get_function(self, tenant: str, name: str) -> FunctionRecord:
        return await self.builds.get_function(tenant, name)

    async def list_functions(self, tenant: str) -> list[FunctionRecord]:
        return await self.builds.list_functions(tenant)

    async def delete_function(self, tenant: str, name: str) -> None:
        await self.builds.delete_function(tenant, name)

    async def wait_built(self, fn: FunctionRecord, deadline: float) -> FunctionRecord:
        return await self.builds.wait_built(fn, deadline)

    def generation(self, function_id: str, version: int) -> float:
        return self.builds.generation(function_id, version)

    async def list_versions(self, tenant: str, name: str
                            ) -> tuple[FunctionRecord, list[VersionRecord]]:
        return await self.builds.list_versions(tenant, name)

    async def rollback(self, tenant: str, name: str, version: int = 0
                       ) -> tuple[FunctionRecord, bool]:
        return await self.builds.rollback(tenant, name, version)

    # ---- leases ------------------------------------------------------------------

    def warm_count(self, function_id: str) -> int:
        return self.leasing.warm_count(function_id)

    async def acquire(self, tenant: str, name: str, wait: float,
                      priority: int = PRIORITY_DEFAULT, invocation_id: str = "") -> LeaseGrant:
        return await self.leasing.acquire(tenant, name, wait, priority, invocation_id)

    def set_priority(self, invocation_id: str, priority: int, tenant: str = "",
                     bookkeeping: bool = False) -> tuple[str, int, float, int]:
        return self.leasing.set_priority(invocation_id, priority, tenant, bookkeeping)

    async def release(self, lease_id: str, failed: bool, reason: str) -> None:
        await self.leasing.release(lease_id, failed, reason)

    async def _forget_instance(self, instance_id: str, reason: str,
                               kind: EventKind = EventKind.INSTANCE_LOST) -> None:
        """An instance is gone (as the agent's heartbeat reports an exit)."""
        await self.instances.forget(instance_id, reason, kind)

    # ---- background --------------------------------------------------------------

    async def reconcile_once(self) -> None:
        await self.reconciler.reconcile_once()

    async def reconcile_forever(self, interval: float) -> None:
        await self.reconciler.reconcile_forever(interval)

    async def recover(self) -> None:
        await self.reconciler.recover()

    async def close(self) -> None:
        s = self.state
        for task in list(s.builds.values()) + list(s.background):
            task.cancel()
        await asyncio.gather(*s.builds.values(), *s.background, return_exceptions=True)
        for node in s.nodes.values():
            await node.client.close()

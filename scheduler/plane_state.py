"""What the control plane's parts share: the in-memory state rebuilt from the DB and
the agents' reports (nodes, pools, leases, builds, snapshot holders, the room queue),
the settings, and small helpers every part uses. Nothing here calls into a part; the
parts (fleet, instances, tiers, starts, builds, leasing, reconcile) take this object
and each other, and control.ControlPlane composes them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from thaw.core.priority import PriorityWaitQueue
from thaw.proto import agent_pb2
from thaw.scheduler.bundles import BundleStore
from thaw.scheduler.events import EventLog
from thaw.scheduler.nodes import AgentClient, NodeView
from thaw.scheduler.placement_index import PlacementIndex
from thaw.scheduler.policy import PolicyConfig
from thaw.scheduler.pools import Broadcast, FunctionPool, InstanceView, RoomTurn
from thaw.scheduler.pressure import PressureLevel, PressureTracker, Thresholds
from thaw.scheduler.secrets import SecretStore
from thaw.scheduler.states import NodeState
from thaw.scheduler.store import FunctionRecord, InstanceRecord, Store
from thaw.scheduler.tenancy import QuotaLedger
from thaw.scheduler.versions import VersionStore


@dataclass(frozen=True)
class Timeouts:
    heartbeat_interval: float
    node_timeout: float
    build_timeout: float
    acquire_wait: float


def spec_message(fn: FunctionRecord) -> agent_pb2.FunctionSpec:
    """The typed spec of the function's version, as the agent's RPCs carry it."""
    s = fn.spec
    return agent_pb2.FunctionSpec(
        tenant=fn.tenant, name=fn.name, version=str(fn.version), handler=s.handler,
        bundle_digest=fn.bundle_digest, gpu_memory_bytes=s.resources.gpu_memory,
        gpu_compute=s.resources.gpu_compute, max_concurrency=s.scaling.max_concurrency,
        timeout_seconds=s.scaling.timeout, snapshot_enabled=s.snapshot,
        memory_limit_bytes=s.resources.memory, max_batch_size=s.batching.max_batch_size,
        max_batch_wait_ms=s.batching.max_batch_wait_ms, image=s.runtime.image,
        network=s.runtime.network, env=dict(s.env),
        volumes=[agent_pb2.VolumeMount(path=m.path, name=m.volume) for m in s.volumes])


def fn_name(fn: FunctionRecord) -> str:
    return f"{fn.tenant}/{fn.name}"


def build_key(function_id: str, version: int) -> str:
    return f"{function_id}@{version}"


class NodeMap(dict[str, NodeView]):
    """The fleet by node id; a node put in it reports its changes to the placement
    index (NodeView.on_change)."""

    def __init__(self, level: Callable[[str], PressureLevel]) -> None:
        super().__init__()
        self.index = PlacementIndex(self, level)
        """Read by Starts.choose; kept fresh by the nodes' and the pressure's changes."""

    def __setitem__(self, node_id: str, node: NodeView) -> None:
        super().__setitem__(node_id, node)
        node.on_change = self.index.touch
        self.index.touch(node_id)


@dataclass
class PlaneState:
    store: Store
    bundles: BundleStore
    timeouts: Timeouts
    policy: PolicyConfig
    clock: Callable[[], float]
    agent_client: Callable[[str], AgentClient]
    events: EventLog
    secrets: SecretStore | None = None
    """The tenants' secrets (scheduler/secrets.py); None: a function naming any fails."""
    pressure: PressureTracker = field(init=False)
    versions: VersionStore = field(init=False)
    quotas: QuotaLedger = field(init=False)
    """Tenant quotas (instances, slice memory), checked before every start."""
    nodes: dict[str, NodeView] = field(default_factory=dict)
    nodes_changed: asyncio.Event = field(default_factory=asyncio.Event)
    pools: dict[str, FunctionPool] = field(default_factory=dict)
    leases: dict[str, tuple[FunctionPool, InstanceView]] = field(default_factory=dict)
    builds: dict[str, asyncio.Task[FunctionRecord]] = field(default_factory=dict)
    """function id@version -> its snapshot build."""
    active: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Function id -> (its serving version, since when in unix time), as last
    switched here or read from the DB (see acquire, generation)."""
    holders: dict[str, set[str]] = field(default_factory=dict)
    """Snapshot id -> nodes whose disk tier holds its chunks."""
    background: set[asyncio.Task[object]] = field(default_factory=set)
    room: Broadcast = field(default_factory=Broadcast)
    """Fired whenever slice memory may have been freed (or a node appeared)."""
    room_queue: PriorityWaitQueue[RoomTurn] = field(init=False)
    """Requests waiting for room, in the order they may retry placement."""
    room_turns: Broadcast = field(default_factory=Broadcast)
    """Fired when a room waiter tried and failed, or left the room queue."""
    room_waiters: int = 0
    """Requests waiting for room on some node (bounded by placement_queue_max)."""
    unclaimed: dict[str, InstanceRecord] = field(default_factory=dict)
    """After a restart: instances the DB knows as live that no node has reported yet."""
    unclaimed_until: float = 0.0
    probing: set[str] = field(default_factory=set)
    placing: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Starts in flight: instance id -> (function id, node id)."""
    started_at: float = field(init=False)
    placement: PlacementIndex = field(init=False)
    """The fleet indexed for placement (the index of `nodes`)."""

    def __post_init__(self) -> None:
        p = self.policy
        self.pressure = PressureTracker(Thresholds(
            p.pressure_at, p.pressure_critical_at, p.pressure_emergency_at,
            p.pressure_hysteresis))
        self.versions = VersionStore(self.store)
        self.quotas = QuotaLedger(self.store)
        self.room_queue = PriorityWaitQueue(p.priority_aging_rate, self.clock)
        known = self.nodes
        self.nodes = nodes = NodeMap(self.pressure.node_level)
        self.placement = nodes.index
        self.pressure.on_change = nodes.index.touch
        for node_id, node in known.items():
            nodes[node_id] = node
        self.started_at = self.clock()

    def spawn(self, coro: Awaitable[object]) -> None:
        """Run in the background; close() cancels what is still running."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def pool(self, fn: FunctionRecord) -> FunctionPool:
        """The function's pool (made on first use), with min_instances from its spec."""
        pool = self.pools.get(fn.id)
        if pool is None:
            pool = self.pools[fn.id] = FunctionPool(
                fn.id, name=fn_name(fn),
                queue=PriorityWaitQueue(self.policy.priority_aging_rate, self.clock))
        pool.min_instances = fn.spec.scaling.min_instances
        return pool

    def find_instance(self, instance_id: str) -> tuple[FunctionPool, InstanceView] | None:
        for pool in self.pools.values():
            inst = pool.instances.get(instance_id)
            if inst is not None:
                return pool, inst
        return None

    def instances_on(self, node_id: str) -> list[InstanceView]:
        return [i for p in self.pools.values() for i in p.instances.values()
                if i.node_id == node_id]

    def ready_nodes(self) -> list[NodeView]:
        return [n for n in self.nodes.values() if n.state is NodeState.READY]

    def live_nodes(self) -> list[NodeView]:
        """Every node not written off (ready or cordoned)."""
        return [n for n in self.nodes.values() if n.state is not NodeState.LOST]

    def runnable_nodes(self, fn: FunctionRecord) -> list[NodeView]:
        """Ready nodes whose runtime can run the function: any for a plain function,
        docker nodes only for an image function."""
        return [n for n in self.ready_nodes() if n.runs(fn.spec.runtime.image)]

"""The scheduler's view of node agents: a client per node and its last report."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from thaw.core.grpcutil import call, secure_channel, stream
from thaw.core.pki import AGENT, Identity
from thaw.proto import agent_pb2, agent_pb2_grpc, scheduler_pb2
from thaw.proto.manifest_pb2 import SnapshotManifest
from thaw.scheduler.placement import best_fit_device
from thaw.scheduler.states import NodeState

# How long a liveness probe of an agent that just failed a call may take.
PROBE_TIMEOUT_SECONDS = 2.0
# The runtimes an agent reports (AgentConfig.runtime); an agent that reports none
# predates the field and runs processes.
PROCESS_RUNTIME = "process"
DOCKER_RUNTIME = "docker"


class AgentClient:
    """One node agent's control service, over one mutual-TLS channel presenting the
    scheduler's certificate (`tls`; None: plaintext, which a TLS agent refuses). Failed
    calls raise ThawError (grpcutil.call)."""

    def __init__(self, address: str, tls: Identity | None = None) -> None:
        self.address = address
        self._channel = secure_channel(address, tls, AGENT)
        # The generated stub is untyped; its methods are called as the agent's RPCs.
        make_stub: Callable[[grpc.aio.Channel], Any] = agent_pb2_grpc.AgentStub
        self._stub = make_stub(self._channel)

    async def build_snapshot(self, request: agent_pb2.BuildSnapshotRequest,
                             timeout: float) -> agent_pb2.BuildSnapshotResponse:
        return await call(self._stub.BuildSnapshot(request, timeout=timeout))

    async def start_instance(self, request: agent_pb2.StartInstanceRequest,
                             timeout: float) -> agent_pb2.StartInstanceResponse:
        return await call(self._stub.StartInstance(request, timeout=timeout))

    async def stop_instance(self, instance_id: str, reason: str, timeout: float = 30.0) -> None:
        await call(self._stub.StopInstance(
            agent_pb2.StopInstanceRequest(instance_id=instance_id, reason=reason),
            timeout=timeout))

    async def prepare_template(self, request: agent_pb2.PrepareTemplateRequest,
                               timeout: float) -> agent_pb2.PrepareTemplateResponse:
        return await call(self._stub.PrepareTemplate(request, timeout=timeout))

    async def prewarm(self, manifest: SnapshotManifest, peers: list[str],
                      timeout: float = 600.0, *, background: bool = False
                      ) -> agent_pb2.PrewarmResponse:
        return await call(self._stub.Prewarm(
            agent_pb2.SnapshotRequest(manifest=manifest, peers=peers, background=background),
            timeout=timeout))

    async def evict(self, manifest: SnapshotManifest,
                    timeout: float = 60.0) -> agent_pb2.EvictResponse:
        return await call(self._stub.Evict(agent_pb2.SnapshotRequest(manifest=manifest),
                                           timeout=timeout))

    async def collect_garbage(self, keep: Sequence[SnapshotManifest],
                              timeout: float = 300.0
                              ) -> agent_pb2.CollectGarbageResponse:
        return await call(self._stub.CollectGarbage(
            agent_pb2.CollectGarbageRequest(keep=keep), timeout=timeout))

    async def collect(self, request: agent_pb2.CollectGarbageRequest,
                      timeout: float) -> agent_pb2.CollectGarbageResponse:
        """Garbage collection with every option of the request (scheduler/gc.py)."""
        return await call(self._stub.CollectGarbage(request, timeout=timeout))

    async def environments(self, request: agent_pb2.EnvironmentsRequest,
                           timeout: float) -> agent_pb2.EnvironmentsResponse:
        """The node's Python environments, collected first with `request.collect`."""
        return await call(self._stub.Environments(request, timeout=timeout))

    async def snapshot_pass(self, kind: str, manifest: SnapshotManifest, peers: list[str],
                            timeout: float = 1800.0
                            ) -> AsyncIterator[agent_pb2.SnapshotProgress]:
        """A prewarm ("prewarm") or verify ("verify") with the node's progress."""
        method = {"prewarm": self._stub.PrewarmProgress,
                  "verify": self._stub.VerifySnapshot}[kind]
        async for message in stream(method(
                agent_pb2.SnapshotRequest(manifest=manifest, peers=peers), timeout=timeout)):
            yield message

    async def alive(self, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
        """Does the agent answer its health service? (After a call to it failed: a
        dead agent is marked lost at once instead of after node_timeout.)"""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""),
                                     timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close()


# The NodeView fields placement reads: setting one tells the node's on_change.
_WATCHED = frozenset({"state", "starts_in_flight", "devices", "foreign", "slices",
                      "pinned", "runtime"})


class Ledger(dict[str, tuple[int, int]]):
    """A node's slice ledger (instance id -> (device index, bytes)) that counts its
    changes, so that what is derived from it (free memory per device, read by every
    placement decision) is recomputed only after one."""

    changes: int = 0
    owner: NodeView | None = None
    """The node whose ledger it is: told of each change (NodeView.changed)."""

    def _changed(self) -> None:
        self.changes += 1
        if self.owner is not None:
            self.owner.changed()

    def __setitem__(self, key: str, value: tuple[int, int]) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, key: str, *default: Any) -> Any:
        self._changed()
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, tuple[int, int]]:
        self._changed()
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def setdefault(self, key: str, default: tuple[int, int] = (0, 0)
                   ) -> tuple[int, int]:
        self._changed()
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def __ior__(self, other: Any) -> Ledger:  # type: ignore[override,misc]
        self.update(other)
        return self


@dataclass
class NodeView:
    id: str
    control_address: str
    data_url: str
    client: AgentClient
    devices: list[scheduler_pb2.DeviceInfo] = field(default_factory=list)
    runtime: str = PROCESS_RUNTIME
    """Where the node runs instances: "process" or "docker" (RegisterRequest.runtime).
    Only docker nodes can run image functions."""
    state: NodeState = NodeState.READY
    last_heartbeat: float = field(default_factory=time.monotonic)
    slices: dict[str, tuple[int, int]] = field(default_factory=Ledger)
    """The scheduler's ledger of slice memory: instance id -> (device index, bytes)
    for every instance it placed (or adopted) here, from the moment it is placed
    until it is stopped. It leads the node's reports, which lag by a heartbeat."""
    foreign: list[int] = field(default_factory=list)
    """Per device, memory the node reported in use beyond the ledger at its last
    heartbeat (slices the scheduler did not place, or other users of a GPU)."""
    starting_ids: set[str] = field(default_factory=set)
    """Instances whose start RPC is in flight (the node already lists them)."""
    starts_in_flight: int = 0
    cordoned: bool = False
    prewarming: set[str] = field(default_factory=set)
    """Snapshot keys being loaded into this node's pinned tier now."""
    telemetry: agent_pb2.NodeTelemetry = field(default_factory=agent_pb2.NodeTelemetry)
    """CPU, RAM and per-instance memory from the node's last heartbeat."""
    disk_bytes: int = 0
    pinned: scheduler_pb2.PinnedTierInfo = field(default_factory=scheduler_pb2.PinnedTierInfo)
    """The node's pinned-tier accounting, from its last heartbeat."""
    boot_id: str = ""
    """The registered agent process's incarnation (RegisterRequest.boot_id): another
    one registering under this node id means the agent restarted."""
    conditions: list[scheduler_pb2.NodeCondition] = field(default_factory=list)
    """What the node's last heartbeat said is wrong with it (disk full, read-only)."""
    on_change: Callable[[str], None] | None = field(default=None, repr=False,
                                                    compare=False)
    """Told the node's id whenever something placement reads about it changes (the
    control plane's PlacementIndex.touch)."""
    _free_cache: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)
    _pinned_cache: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "slices":  # a ledger assigned whole still reports its changes
            value = value if isinstance(value, Ledger) else Ledger(value)
            value.owner = self
        object.__setattr__(self, name, value)
        if name in _WATCHED:
            self.changed()

    def changed(self) -> None:
        """Something placement reads about the node changed (its state, starts in
        flight, devices, ledger, pinned tier, runtime)."""
        watch = self.__dict__.get("on_change")
        if watch is not None:
            watch(self.id)

    def pinned_keys(self) -> frozenset[str]:
        """The snapshot keys the node's pinned tier holds, as a set: placement asks
        every node whether it holds a snapshot. Kept until `pinned` is replaced (a
        heartbeat) or its key list changes length (pin / unpin)."""
        pinned = self.pinned
        count = len(pinned.snapshot_keys)
        cached = self._pinned_cache
        if cached is not None and cached[0] is pinned and cached[1] == count:
            return cached[2]  # type: ignore[no-any-return]
        keys = frozenset(pinned.snapshot_keys)
        self._pinned_cache = (pinned, count, keys)
        return keys

    def pin(self, key: str) -> None:
        """The pinned tier now holds the snapshot `key` (until the next heartbeat)."""
        if key not in self.pinned.snapshot_keys:
            self.pinned.snapshot_keys.append(key)
            self._pinned_cache = None
            self.changed()

    def unpin(self, key: str) -> None:
        """The pinned tier no longer holds the snapshot `key`."""
        if key in self.pinned.snapshot_keys:
            self.pinned.snapshot_keys.remove(key)
            self._pinned_cache = None
            self.changed()

    def storage_fault(self) -> scheduler_pb2.NodeCondition | None:
        """The first condition that keeps the node from storing builds and chunks."""
        return self.conditions[0] if self.conditions else None

    def runs(self, image: str) -> bool:
        """Can the node run a function with this `[runtime] image` ("" = none)?"""
        return not image or self.runtime == DOCKER_RUNTIME

    @property
    def mps_active(self) -> bool:
        """Whether the node's last heartbeat said an MPS daemon applies functions'
        gpu_compute shares on its GPUs (False before its first heartbeat)."""
        return self.telemetry.mps_active

    @property
    def capacity_bytes(self) -> int:
        return sum(d.capacity_bytes for d in self.devices)

    def ledger_used(self) -> list[int]:
        used = [0] * len(self.devices)
        for index, nbytes in self.slices.values():
            if index < len(used):
                used[index] += nbytes
        return used

    def device_free(self) -> list[int]:
        """Free slice memory per device by the ledger: what placement may use."""
        return list(self._free()[0])

    def free_sorted(self) -> tuple[int, ...]:
        """device_free() in ascending order: placement's best fit is a bisection."""
        return self._free()[1]

    def _free(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(free per device, the same sorted), kept until the devices, the foreign
        usage or the ledger change. The cache holds the objects it was computed from
        and compares them by identity, so a replaced list is always noticed."""
        slices = self.slices
        changes = slices.changes if isinstance(slices, Ledger) else -1
        cached = self._free_cache
        if (cached is not None and changes >= 0 and cached[0] is self.devices
                and cached[1] is self.foreign and cached[2] is slices
                and cached[3] == changes):
            result: tuple[tuple[int, ...], tuple[int, ...]] = cached[4]
            return result
        foreign = self.foreign if len(self.foreign) == len(self.devices) else [0] * len(
            self.devices)
        free = tuple(max(0, d.capacity_bytes - used - other)
                     for d, used, other in zip(self.devices, self.ledger_used(), foreign,
                                               strict=True))
        result = (free, tuple(sorted(free)))
        self._free_cache = (self.devices, self.foreign, slices, changes, result)
        return result

    def take_report(self, devices: list[scheduler_pb2.DeviceInfo]) -> None:
        """A heartbeat's device usage: note what the ledger does not explain."""
        self.devices = list(devices)
        self.foreign = [max(0, d.used_bytes - used)
                        for d, used in zip(self.devices, self.ledger_used(), strict=True)]

    def device_used(self) -> list[int]:
        """Used memory per device for pressure: the larger of the node's report and
        the ledger (the report also sees memory the scheduler did not place)."""
        return [max(d.used_bytes, used)
                for d, used in zip(self.devices, self.ledger_used(), strict=True)]

    def reserve(self, instance_id: str, nbytes: int) -> int | None:
        """Charge a slice to the device the agent will pick; None if none fits."""
        if nbytes <= 0:
            return 0
        index = best_fit_device(self.device_free(), nbytes)
        if index is not None:
            self.slices[instance_id] = (index, nbytes)
        return index

    def unreserve(self, instance_id: str) -> None:
        self.slices.pop(instance_id, None)

    def adopt_slices(self, sizes: dict[str, int]) -> None:
        """Charge instances found running (after a scheduler restart) to devices: the
        node does not say which device holds which slice, so fill each device up to
        what it reports as used, largest slices first."""
        room = [d.used_bytes - used for d, used in zip(self.devices, self.ledger_used(),
                                                        strict=True)]
        for instance_id, nbytes in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
            if nbytes <= 0 or not room:
                continue
            index = max(range(len(room)), key=lambda i: (room[i], -i))
            self.slices[instance_id] = (index, nbytes)
            room[index] -= nbytes


def compute_unenforced(nodes: Iterable[NodeView], gpu_compute: int, image: str = ""
                       ) -> list[str]:
    """Ids of the nodes not lost that could run a function asking for `gpu_compute`
    percent of a GPU (and running `image`) but would not apply it: no MPS daemon there.
    Empty when the function asks for no share."""
    if gpu_compute <= 0:
        return []
    return sorted(n.id for n in nodes
                  if n.state is not NodeState.LOST and n.runs(image) and not n.mps_active)

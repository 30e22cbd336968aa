"""The scheduler's view of node agents: a client per node and its last report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from thaw.core.grpcutil import CHANNEL_OPTIONS, call
from thaw.proto import agent_pb2, agent_pb2_grpc, scheduler_pb2
from thaw.scheduler.states import NodeState


class AgentClient:
    """One node agent's control service. Failed calls raise ThawError (grpcutil.call)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = agent_pb2_grpc.AgentStub(self._channel)

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

    async def prewarm(self, manifest: object, peers: list[str],
                      timeout: float = 600.0) -> agent_pb2.PrewarmResponse:
        return await call(self._stub.Prewarm(
            agent_pb2.SnapshotRequest(manifest=manifest, peers=peers), timeout=timeout))

    async def evict(self, manifest: object, timeout: float = 60.0) -> agent_pb2.EvictResponse:
        return await call(self._stub.Evict(agent_pb2.SnapshotRequest(manifest=manifest),
                                           timeout=timeout))

    async def collect_garbage(self, keep: list[object], timeout: float = 300.0
                              ) -> agent_pb2.CollectGarbageResponse:
        return await call(self._stub.CollectGarbage(
            agent_pb2.CollectGarbageRequest(keep=keep), timeout=timeout))

    async def close(self) -> None:
        await self._channel.close()


@dataclass
class NodeView:
    id: str
    control_address: str
    data_url: str
    client: AgentClient
    devices: list[scheduler_pb2.DeviceInfo] = field(default_factory=list)
    state: NodeState = NodeState.READY
    last_heartbeat: float = field(default_factory=time.monotonic)
    reserved_bytes: int = 0
    """Slice memory of the instances the scheduler placed here."""
    starts_in_flight: int = 0
    cordoned: bool = False
    disk_bytes: int = 0
    pinned: scheduler_pb2.PinnedTierInfo = field(default_factory=scheduler_pb2.PinnedTierInfo)
    """The node's pinned-tier accounting, from its last heartbeat."""

    @property
    def capacity_bytes(self) -> int:
        return sum(d.capacity_bytes for d in self.devices)

    def device_free(self) -> list[int]:
        """Free slice memory per device, as the node last reported it, less what the
        scheduler has placed there since (a start in flight is not reported yet)."""
        reported_used = sum(d.used_bytes for d in self.devices)
        unreported = max(0, self.reserved_bytes - reported_used)
        free = [max(0, d.capacity_bytes - d.used_bytes) for d in self.devices]
        # Charge the not-yet-reported reservations to the roomiest devices first.
        for i in sorted(range(len(free)), key=lambda j: -free[j]):
            take = min(free[i], unreported)
            free[i] -= take
            unreported -= take
        return free

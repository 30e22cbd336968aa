"""The gateway's client of the scheduler; failed calls raise ThawError.

One mutual-TLS channel, presenting the gateway's certificate, carries every service
the gateway calls there (core/pki.py)."""

from __future__ import annotations

import grpc

from thaw.core.grpcutil import call, secure_channel
from thaw.core.pki import SCHEDULER, Identity
from thaw.gateway import tracing
from thaw.proto import scheduler_pb2, scheduler_pb2_grpc

# Metadata calls are quick; Acquire may wait for a cold start (its own deadline).
META_TIMEOUT = 30.0
CREATE_TIMEOUT = 1800.0


class SchedulerClient:
    def __init__(self, address: str, tls: Identity | None) -> None:
        """`tls`: the gateway's identity (core.pki.internal_identity); None only under
        the insecure_internal opt-out (plaintext)."""
        self._channel = secure_channel(address, tls, SCHEDULER)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        """For stubs of the scheduler's other services (one connection for all)."""
        return self._channel

    async def authenticate(self, key_sha256: str) -> scheduler_pb2.Principal:
        resp = await call(self._stub.Authenticate(
            scheduler_pb2.AuthenticateRequest(key_sha256=key_sha256), timeout=META_TIMEOUT))
        principal: scheduler_pb2.Principal = resp.principal
        return principal

    async def create_function(self, tenant: str, bundle: bytes, wait: bool,
                              force: bool = False) -> scheduler_pb2.FunctionInfo:
        return await call(self._stub.CreateFunction(
            scheduler_pb2.CreateFunctionRequest(tenant=tenant, bundle=bundle, wait=wait,
                                                force=force),
            timeout=CREATE_TIMEOUT))

    async def get_function(self, tenant: str, name: str) -> scheduler_pb2.FunctionInfo:
        return await call(self._stub.GetFunction(
            scheduler_pb2.FunctionRequest(tenant=tenant, name=name), timeout=META_TIMEOUT))

    async def list_functions(self, tenant: str) -> list[scheduler_pb2.FunctionInfo]:
        resp = await call(self._stub.ListFunctions(
            scheduler_pb2.ListFunctionsRequest(tenant=tenant), timeout=META_TIMEOUT))
        return list(resp.functions)

    async def delete_function(self, tenant: str, name: str) -> None:
        await call(self._stub.DeleteFunction(
            scheduler_pb2.FunctionRequest(tenant=tenant, name=name), timeout=META_TIMEOUT))

    async def acquire(self, tenant: str, name: str, wait: float, priority: int = 0,
                      invocation_id: str = "") -> scheduler_pb2.Lease:
        return await call(self._stub.Acquire(
            scheduler_pb2.AcquireRequest(tenant=tenant, name=name, wait_seconds=wait,
                                         priority=priority, invocation_id=invocation_id),
            timeout=wait + 30.0, metadata=tracing.grpc_metadata()))

    async def set_priority(self, invocation_id: str, priority: int, tenant: str = "",
                           bookkeeping: bool = False) -> scheduler_pb2.SetPriorityResponse:
        return await call(self._stub.SetPriority(
            scheduler_pb2.SetPriorityRequest(invocation_id=invocation_id, priority=priority,
                                             tenant=tenant, bookkeeping=bookkeeping),
            timeout=META_TIMEOUT))

    async def set_function_priority(self, tenant: str, name: str, priority: int
                                    ) -> scheduler_pb2.FunctionInfo:
        return await call(self._stub.SetFunctionPriority(
            scheduler_pb2.SetFunctionPriorityRequest(tenant=tenant, name=name,
                                                     priority=priority),
            timeout=META_TIMEOUT))

    async def release(self, lease_id: str, failed: bool = False, reason: str = "") -> None:
        await call(self._stub.Release(
            scheduler_pb2.ReleaseRequest(lease_id=lease_id, instance_failed=failed,
                                         reason=reason), timeout=META_TIMEOUT))

    async def list_events(self, after_seq: int = 0, limit: int = 100,
                          kinds: list[str] | None = None) -> scheduler_pb2.ListEventsResponse:
        return await call(self._stub.ListEvents(
            scheduler_pb2.ListEventsRequest(after_seq=after_seq, limit=limit,
                                            kinds=kinds or []), timeout=META_TIMEOUT))

    async def list_nodes(self) -> list[scheduler_pb2.NodeInfo]:
        resp = await call(self._stub.ListNodes(scheduler_pb2.ListNodesRequest(),
                                               timeout=META_TIMEOUT))
        return list(resp.nodes)

    async def cordon(self, node_id: str, cordoned: bool) -> scheduler_pb2.NodeInfo:
        return await call(self._stub.Cordon(
            scheduler_pb2.CordonRequest(node_id=node_id, cordoned=cordoned),
            timeout=META_TIMEOUT))

    async def prewarm(self, tenant: str, name: str, node_id: str = "") -> scheduler_pb2.TierReply:
        return await call(self._stub.Prewarm(
            scheduler_pb2.PrewarmRequest(tenant=tenant, name=name, node_id=node_id),
            timeout=CREATE_TIMEOUT))

    async def evict(self, tenant: str, name: str, node_id: str = "") -> scheduler_pb2.TierReply:
        return await call(self._stub.Evict(
            scheduler_pb2.PrewarmRequest(tenant=tenant, name=name, node_id=node_id),
            timeout=META_TIMEOUT))

    async def ready(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError:
            return False
        serving: bool = resp.status == health_pb2.HealthCheckResponse.SERVING
        return serving

    async def close(self) -> None:
        await self._channel.close()

"""gRPC edge of the scheduler: Scheduler (for gateways) and NodeRegistry (for agents)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

import grpc

from thaw.core.errors import InvalidArgument, ThawError
from thaw.core.grpcutil import encode_error, servicer_method, status_for
from thaw.core.priority import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, valid_priority
from thaw.proto import agent_pb2, scheduler_pb2, scheduler_pb2_grpc
from thaw.scheduler import snapshots
from thaw.scheduler.budgets import TENANT as TENANT_BUDGETS
from thaw.scheduler.budgets import budgets_of
from thaw.scheduler.control import ControlPlane
from thaw.scheduler.environments import node_environments
from thaw.scheduler.events import Event, EventKind
from thaw.scheduler.nodes import NodeView, compute_unenforced
from thaw.scheduler.priority import set_function_priority
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import FunctionRecord
from thaw.scheduler.versions import VersionRecord

# Bundles stream to agents in pieces well under the message limit.
BUNDLE_PIECE_BYTES = 1024 * 1024


async def function_info(control: ControlPlane, fn: FunctionRecord) -> scheduler_pb2.FunctionInfo:
    info = await _function_fields(control, fn)
    disk, pinned = await control.snapshot_tiers(fn)
    info.snapshot_disk_nodes.extend(disk)
    info.snapshot_pinned_nodes.extend(pinned)
    info.active_version = fn.version
    # Nodes that would run it without applying its GPU compute share (no MPS daemon).
    info.gpu_compute_unenforced_nodes.extend(compute_unenforced(
        control.nodes.values(), fn.spec.resources.gpu_compute, fn.spec.runtime.image))
    latest = await control.store.run(control.versions.latest, fn.id)
    if latest is not None:
        info.latest_build.CopyFrom(version_info(latest, fn))
        control.builds.steps.fill(info.latest_build, fn.tenant, fn.name)
    return info


def version_info(v: VersionRecord, fn: FunctionRecord) -> scheduler_pb2.VersionInfo:
    return scheduler_pb2.VersionInfo(
        version=v.version, state=v.state.value, reason=v.reason,
        bundle_digest=v.bundle_digest, handler=v.handler, start_mode=v.start_mode,
        snapshot_state=v.snapshot_state, snapshot_bytes=v.snapshot_bytes,
        created_at=v.created_at, activated_at=v.activated_at or 0.0,
        active=fn.state is FunctionState.READY and v.version == fn.version,
        config_json=json.dumps(v.spec.to_dict()))


async def _function_fields(control: ControlPlane, fn: FunctionRecord
                           ) -> scheduler_pb2.FunctionInfo:
    snapshot_bytes, input_schema = await control.snapshot_facts(fn)
    if not input_schema and fn.start_mode == "fresh":
        # No snapshot manifest to read it from: the version keeps what its build read.
        input_schema = await control.store.run(control.versions.input_schema, fn.id,
                                               fn.version)
    return scheduler_pb2.FunctionInfo(
        tenant=fn.tenant, name=fn.name, version=str(fn.version), state=fn.state.value,
        reason=fn.reason, start_mode=fn.start_mode, handler=fn.handler,
        bundle_digest=fn.bundle_digest, snapshot_bytes=snapshot_bytes,
        config_json=json.dumps(fn.spec.to_dict()), created_at=fn.created_at,
        updated_at=fn.updated_at, warm_instances=control.warm_count(fn.id),
        priority=fn.priority or 0, input_schema=input_schema)


def request_priority(priority: int) -> int:
    """An Acquire's priority: 0 (an older gateway, or none given) is the default; the
    gateway checked the key's range, so out of range here is only clamped."""
    if priority <= 0:
        return PRIORITY_DEFAULT
    return min(priority, PRIORITY_MAX)


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    @servicer_method
    async def Authenticate(self, request: scheduler_pb2.AuthenticateRequest,
                           context: grpc.aio.ServicerContext) -> scheduler_pb2.AuthenticateResponse:
        store = self.control.store
        key = await store.run(store.authenticate, request.key_sha256)
        # Budgets travel with the principal: the gateway counts them without a lookup.
        found = await store.run(budgets_of, store, key.tenant, [key.id, TENANT_BUDGETS])
        return scheduler_pb2.AuthenticateResponse(principal=scheduler_pb2.Principal(
            tenant=key.tenant, key_id=key.id, scopes=list(key.scopes),
            priority_default=key.priority_default, priority_max=key.priority_max,
            expires_at=key.expires_at or 0.0, key_budgets=found[key.id],
            tenant_budgets=found[TENANT_BUDGETS]))

    @servicer_method
    async def CreateFunction(self, request: scheduler_pb2.CreateFunctionRequest,
                             context: grpc.aio.ServicerContext) -> scheduler_pb2.FunctionInfo:
        deployed = await self.control.deploy(request.tenant, request.bundle, request.wait,
                                             request.force)
        info = await function_info(self.control, deployed.function)
        info.unchanged = deployed.unchanged
        return info

    @servicer_method
    async def GetFunction(self, request: scheduler_pb2.FunctionRequest,
                          context: grpc.aio.ServicerContext) -> scheduler_pb2.FunctionInfo:
        fn = await self.control.get_function(request.tenant, request.name)
        return await function_info(self.control, fn)

    @servicer_method
    async def ListFunctions(self, request: scheduler_pb2.ListFunctionsRequest,
                            context: grpc.aio.ServicerContext
                            ) -> scheduler_pb2.ListFunctionsResponse:
        fns = await self.control.list_functions(request.tenant)
        return scheduler_pb2.ListFunctionsResponse(
            functions=[await function_info(self.control, fn) for fn in fns])

    @servicer_method
    async def DeleteFunction(self, request: scheduler_pb2.FunctionRequest,
                             context: grpc.aio.ServicerContext
                             ) -> scheduler_pb2.DeleteFunctionResponse:
        await self.control.delete_function(request.tenant, request.name)
        return scheduler_pb2.DeleteFunctionResponse()

    @servicer_method
    async def Acquire(self, request: scheduler_pb2.AcquireRequest,
                      context: grpc.aio.ServicerContext) -> scheduler_pb2.Lease:
        grant = await self.control.acquire(request.tenant, request.name, request.wait_seconds,
                                           request_priority(request.priority),
                                           request.invocation_id)
        start = {"warm": agent_pb2.START_UNSPECIFIED, "restore": agent_pb2.START_RESTORE,
                 "fresh": agent_pb2.START_FRESH}[grant.start]
        return scheduler_pb2.Lease(
            lease_id=grant.lease_id, node_id=grant.instance.node_id, data_url=grant.data_url,
            instance_id=grant.instance.id, start=start, timeout_seconds=grant.timeout,
            timings=[agent_pb2.Timing(stage=s, seconds=v) for s, v in grant.timings],
            version=grant.instance.version,
            generation=self.control.generation(grant.instance.function_id,
                                               grant.instance.version))

    @servicer_method
    async def ListVersions(self, request: scheduler_pb2.FunctionRequest,
                           context: grpc.aio.ServicerContext
                           ) -> scheduler_pb2.ListVersionsResponse:
        fn, versions = await self.control.list_versions(request.tenant, request.name)
        infos = [version_info(v, fn) for v in versions]
        for info in infos:
            self.control.builds.steps.fill(info, fn.tenant, fn.name)
        return scheduler_pb2.ListVersionsResponse(
            active_version=fn.version if fn.state is FunctionState.READY else 0,
            versions=infos)

    @servicer_method
    async def Rollback(self, request: scheduler_pb2.RollbackRequest,
                       context: grpc.aio.ServicerContext) -> scheduler_pb2.RollbackResponse:
        fn, rebuilt = await self.control.rollback(request.tenant, request.name,
                                                  request.version)
        if rebuilt:
            message = (f"version {fn.version}'s snapshot had been collected: rebuilt from "
                       "its bundle, then switched to it")
        else:
            message = f"version {fn.version} serves again, at once (nothing rebuilt)"
        return scheduler_pb2.RollbackResponse(function=await function_info(self.control, fn),
                                              rebuilt=rebuilt, message=message)

    @servicer_method
    async def Release(self, request: scheduler_pb2.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> scheduler_pb2.ReleaseResponse:
        await self.control.release(request.lease_id, request.instance_failed, request.reason)
        return scheduler_pb2.ReleaseResponse()

    @servicer_method
    async def SetPriority(self, request: scheduler_pb2.SetPriorityRequest,
                          context: grpc.aio.ServicerContext
                          ) -> scheduler_pb2.SetPriorityResponse:
        if not request.invocation_id:
            raise InvalidArgument("invocation_id is required", field="invocation_id")
        if not valid_priority(request.priority):
            raise InvalidArgument(f"priority must be from {PRIORITY_MIN} to {PRIORITY_MAX}, "
                                  f"got {request.priority}", field="priority")
        function, priority, effective, ahead = self.control.set_priority(
            request.invocation_id, request.priority, request.tenant,
            bookkeeping=request.bookkeeping)
        return scheduler_pb2.SetPriorityResponse(function=function, priority=priority,
                                                 effective_priority=effective, ahead=ahead)

    @servicer_method
    async def SetFunctionPriority(self, request: scheduler_pb2.SetFunctionPriorityRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> scheduler_pb2.FunctionInfo:
        store = self.control.store
        fn = await store.run(set_function_priority, store, request.tenant, request.name,
                             request.priority or None)
        return await function_info(self.control, fn)


    @servicer_method
    async def ListNodes(self, request: scheduler_pb2.ListNodesRequest,
                        context: grpc.aio.ServicerContext) -> scheduler_pb2.ListNodesResponse:
        return scheduler_pb2.ListNodesResponse(
            nodes=[self._node_info(n) for n in sorted(self.control.nodes.values(),
                                                       key=lambda n: n.id)])

    @servicer_method
    async def Cordon(self, request: scheduler_pb2.CordonRequest,
                     context: grpc.aio.ServicerContext) -> scheduler_pb2.NodeInfo:
        return self._node_info(await self.control.cordon(request.node_id, request.cordoned))

    @servicer_method
    async def Prewarm(self, request: scheduler_pb2.PrewarmRequest,
                      context: grpc.aio.ServicerContext) -> scheduler_pb2.TierReply:
        nodes, nbytes, seconds = await self.control.prewarm(request.tenant, request.name,
                                                            request.node_id)
        return scheduler_pb2.TierReply(node_ids=nodes, bytes=nbytes, seconds=seconds)

    @servicer_method
    async def Evict(self, request: scheduler_pb2.PrewarmRequest,
                    context: grpc.aio.ServicerContext) -> scheduler_pb2.TierReply:
        nodes, nbytes = await self.control.evict(request.tenant, request.name, request.node_id)
        return scheduler_pb2.TierReply(node_ids=nodes, bytes=nbytes)

    @servicer_method
    async def ListEvents(self, request: scheduler_pb2.ListEventsRequest,
                         context: grpc.aio.ServicerContext
                         ) -> scheduler_pb2.ListEventsResponse:
        log = self.control.events
        events = log.since(request.after_seq, request.limit, _kinds(request.kinds))
        return scheduler_pb2.ListEventsResponse(events=[event_message(e) for e in events],
                                                last_seq=log.last_seq)

    async def Events(self, request: scheduler_pb2.ListEventsRequest,
                     context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[scheduler_pb2.Event]:
        try:
            kinds = _kinds(request.kinds)
        except ThawError as exc:
            await context.abort(status_for(exc), encode_error(exc))
            return
        async for event in self.control.events.subscribe(request.after_seq, kinds):
            yield event_message(event)

    # ---- snapshots and drains (scheduler/snapshots.py) ------------------------------

    @servicer_method
    async def ListSnapshots(self, request: scheduler_pb2.ListFunctionsRequest,
                            context: grpc.aio.ServicerContext
                            ) -> scheduler_pb2.ListSnapshotsResponse:
        return scheduler_pb2.ListSnapshotsResponse(
            snapshots=await snapshots.list_snapshots(self.control, request.tenant))

    @servicer_method
    async def GetSnapshot(self, request: scheduler_pb2.FunctionRequest,
                          context: grpc.aio.ServicerContext) -> scheduler_pb2.SnapshotInfo:
        return await snapshots.get_snapshot(self.control, request.tenant, request.name)

    async def _snapshot_pass(self, kind: str, request: scheduler_pb2.PrewarmRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[agent_pb2.SnapshotProgress]:
        try:
            async for message in snapshots.snapshot_pass(
                    self.control, kind, request.tenant, request.name, request.node_id):
                yield message
        except ThawError as exc:
            await context.abort(status_for(exc), encode_error(exc))

    # Async generators themselves: grpc tells streaming handlers apart by that.
    async def PrewarmProgress(self, request: scheduler_pb2.PrewarmRequest,
                              context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[agent_pb2.SnapshotProgress]:
        async for message in self._snapshot_pass("prewarm", request, context):
            yield message

    async def VerifySnapshot(self, request: scheduler_pb2.PrewarmRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[agent_pb2.SnapshotProgress]:
        async for message in self._snapshot_pass("verify", request, context):
            yield message

    @servicer_method
    async def Drain(self, request: scheduler_pb2.DrainRequest,
                    context: grpc.aio.ServicerContext) -> scheduler_pb2.DrainResponse:
        reply = await snapshots.drain(self.control, request.node_id)
        reply.node.CopyFrom(self._node_info(self.control.nodes[request.node_id]))
        return reply

    @servicer_method
    async def CollectGarbage(self, request: scheduler_pb2.NodeGcRequest,
                             context: grpc.aio.ServicerContext
                             ) -> scheduler_pb2.NodeGcResponse:
        return scheduler_pb2.NodeGcResponse(
            nodes=await self.control.gc.collect(request.node_id))

    @servicer_method
    async def NodeEnvironments(self, request: scheduler_pb2.NodeEnvironmentsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> scheduler_pb2.NodeEnvironmentsResponse:
        return scheduler_pb2.NodeEnvironmentsResponse(nodes=await node_environments(
            self.control.gc, request.node_id, request.collect))

    def _node_info(self, node: NodeView) -> scheduler_pb2.NodeInfo:
        pressure = self.control.pressure
        return scheduler_pb2.NodeInfo(
            id=node.id, state=node.state.value, control_address=node.control_address,
            data_url=node.data_url, devices=node.devices, pinned=node.pinned,
            instances=self.control.node_instances(node.id), disk_bytes=node.disk_bytes,
            last_heartbeat_age_seconds=self.control.heartbeat_age(node),
            pressure=pressure.node_level(node.id).label, telemetry=node.telemetry,
            runtime=node.runtime, conditions=node.conditions,
            pressures=[scheduler_pb2.ResourcePressure(
                resource=resource, level=state.level.label, used_fraction=state.fraction,
                used_bytes=state.used, capacity_bytes=state.capacity)
                for resource, state in sorted(pressure.resources(node.id).items())])


def _kinds(names: Iterable[str]) -> list[EventKind]:
    try:
        return [EventKind(k) for k in names]
    except ValueError as exc:
        known = ", ".join(k.value for k in EventKind)
        raise InvalidArgument(f"unknown event kind ({exc}); known: {known}",
                              field="kinds") from exc


def event_message(event: Event) -> scheduler_pb2.Event:
    return scheduler_pb2.Event(seq=event.seq, time=event.time, kind=event.kind.value,
                               message=event.message, node_id=event.node_id,
                               function=event.function, attrs=dict(event.attrs))


class NodeRegistryService(scheduler_pb2_grpc.NodeRegistryServicer):
    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    @servicer_method
    async def Register(self, request: scheduler_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> scheduler_pb2.RegisterResponse:
        await self.control.register(request)
        return scheduler_pb2.RegisterResponse(
            heartbeat_interval_seconds=self.control.heartbeat_interval)

    @servicer_method
    async def Heartbeat(self, request: scheduler_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> scheduler_pb2.HeartbeatResponse:
        known = await self.control.heartbeat(request)
        return scheduler_pb2.HeartbeatResponse(reregister=not known)

    async def GetBundle(self, request: scheduler_pb2.GetBundleRequest,
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[scheduler_pb2.BundleChunk]:
        try:
            data = self.control.bundles.get(request.digest)
        except ThawError as exc:
            await context.abort(status_for(exc), encode_error(exc))
            return
        for start in range(0, len(data), BUNDLE_PIECE_BYTES):
            yield scheduler_pb2.BundleChunk(data=data[start:start + BUNDLE_PIECE_BYTES])

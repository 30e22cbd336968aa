"""gRPC edge of the node agent: the Agent service the scheduler calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from thaw.core.errors import ThawError
from thaw.core.grpcutil import encode_error, servicer_method, status_for
from thaw.platform.agent import Agent
from thaw.platform.gc import CHUNKS, Freed, GcPolicy, InFlight, NodeCollector, build_key
from thaw.platform.peers import read_chunks
from thaw.platform.snapshot_passes import CountingSource, progress_for, report, verify_chunks
from thaw.platform.volumes import VOLUMES
from thaw.proto import agent_pb2, agent_pb2_grpc


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.in_flight = InFlight()
        """The bundles and builds of the requests running now: garbage collection
        leaves them alone."""
        self.collector = NodeCollector(
            agent.home, in_flight=self.in_flight,
            live_instances=lambda: list(agent.instances),
            live_pids=lambda: [*(i.pid for i in agent.instances.values() if i.pid),
                               *(t.process.proc.pid
                                 for t in agent.templates.templates.values())])

    @servicer_method
    async def BuildSnapshot(self, request: agent_pb2.BuildSnapshotRequest,
                            context: grpc.aio.ServicerContext
                            ) -> agent_pb2.BuildSnapshotResponse:
        spec = request.function
        with self.in_flight.using(spec.bundle_digest,
                                  build_key(spec.tenant, spec.name, spec.version)):
            return await self.agent.build_snapshot(request)

    @servicer_method
    async def StartInstance(self, request: agent_pb2.StartInstanceRequest,
                            context: grpc.aio.ServicerContext
                            ) -> agent_pb2.StartInstanceResponse:
        with self.in_flight.using(request.function.bundle_digest):
            return await self.agent.start_instance(request)

    @servicer_method
    async def StopInstance(self, request: agent_pb2.StopInstanceRequest,
                           context: grpc.aio.ServicerContext) -> agent_pb2.StopInstanceResponse:
        await self.agent.stop_instance(request.instance_id, request.reason)
        return agent_pb2.StopInstanceResponse()

    @servicer_method
    async def PrepareTemplate(self, request: agent_pb2.PrepareTemplateRequest,
                              context: grpc.aio.ServicerContext
                              ) -> agent_pb2.PrepareTemplateResponse:
        with self.in_flight.using(request.function.bundle_digest):
            seconds = await self.agent.prepare_template(request.function, request.manifest)
        return agent_pb2.PrepareTemplateResponse(seconds=seconds)

    async def FetchChunks(self, request: agent_pb2.FetchChunksRequest,
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[agent_pb2.ChunkData]:
        chunks = read_chunks(self.agent.snapshots, list(request.digests))
        while True:
            try:
                item = await asyncio.to_thread(next, chunks, None)
            except ThawError as exc:
                await context.abort(status_for(exc), encode_error(exc))
                return
            if item is None:
                return
            yield agent_pb2.ChunkData(digest=item[0], data=item[1])

    @servicer_method
    async def Prewarm(self, request: agent_pb2.SnapshotRequest,
                      context: grpc.aio.ServicerContext) -> agent_pb2.PrewarmResponse:
        nbytes, seconds = await self.agent.prewarm(request.manifest, list(request.peers),
                                                   background=request.background)
        return agent_pb2.PrewarmResponse(bytes=nbytes, seconds=seconds)

    @servicer_method
    async def Evict(self, request: agent_pb2.SnapshotRequest,
                    context: grpc.aio.ServicerContext) -> agent_pb2.EvictResponse:
        return agent_pb2.EvictResponse(bytes=await self.agent.evict(request.manifest))

    @servicer_method
    async def Environments(self, request: agent_pb2.EnvironmentsRequest,
                           context: grpc.aio.ServicerContext
                           ) -> agent_pb2.EnvironmentsResponse:
        """The node's Python environments; with `collect`, unused ones removed first."""
        # `thaw env ls` on this node; with `collect`, `thaw env gc` first.
        return await self.agent.environments.reply(request, self.agent.templates)

    @servicer_method
    async def CollectGarbage(self, request: agent_pb2.CollectGarbageRequest,
                             context: grpc.aio.ServicerContext
                             ) -> agent_pb2.CollectGarbageResponse:
        """Snapshots no kept manifest names (unless skip_chunks), then, with `files`,
        the node's files (platform/gc.py)."""
        removed, chunk_bytes = 0, 0
        if not request.skip_chunks:
            removed, chunk_bytes = await self.agent.collect_garbage(list(request.keep))
        freed = [Freed(CHUNKS, removed, chunk_bytes)]
        if request.files:
            freed += await self.collector.collect(GcPolicy(
                keep_bundles=frozenset(request.keep_bundles),
                log_max_age=max(0.0, request.log_max_age_seconds)))
            if self.agent.volumes is not None:
                # Materialised volumes no instance holds, idle past the hour.
                freed.append(Freed(VOLUMES, *await self.agent.volumes.collect()))
        return agent_pb2.CollectGarbageResponse(
            removed_chunks=removed, freed_bytes=sum(f.bytes for f in freed),
            freed=[agent_pb2.GarbageFreed(kind=f.kind, items=f.items, bytes=f.bytes)
                   for f in freed])

    async def PrewarmProgress(self, request: agent_pb2.SnapshotRequest,
                              context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[agent_pb2.SnapshotProgress]:
        agent = self.agent
        progress = progress_for(request.manifest)
        try:
            await agent.chunks.ensure(request.manifest, list(request.peers))
        except ThawError as exc:
            yield progress.message(agent.node_id, 0.0, finished=True, error=exc.message)
            return
        source = CountingSource(agent.snapshots.disk, progress)
        async for message in report(agent.node_id, progress, lambda: agent.snapshots.prewarm(
                request.manifest, source)):
            yield message

    async def VerifySnapshot(self, request: agent_pb2.SnapshotRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[agent_pb2.SnapshotProgress]:
        agent = self.agent
        progress = progress_for(request.manifest)
        async for message in report(agent.node_id, progress, lambda: verify_chunks(
                agent.snapshots, request.manifest, progress)):
            yield message

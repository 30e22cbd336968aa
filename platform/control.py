"""gRPC edge of the node agent: the Agent service the scheduler calls."""

from __future__ import annotations

import grpc

from thaw.core.grpcutil import servicer_method
from thaw.platform.agent import Agent
from thaw.proto import agent_pb2, agent_pb2_grpc


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @servicer_method
    async def BuildSnapshot(self, request: agent_pb2.BuildSnapshotRequest,
                            context: grpc.aio.ServicerContext
                            ) -> agent_pb2.BuildSnapshotResponse:
        return await self.agent.build_snapshot(request)

    @servicer_method
    async def StartInstance(self, request: agent_pb2.StartInstanceRequest,
                            context: grpc.aio.ServicerContext
                            ) -> agent_pb2.StartInstanceResponse:
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
        seconds = await self.agent.prepare_template(request.function, request.manifest)
        return agent_pb2.PrepareTemplateResponse(seconds=seconds)

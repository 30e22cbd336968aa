"""An agent tells the scheduler its runtime when it registers (RegisterRequest.runtime,
from AgentConfig.runtime): a real AgentServer on the process runtime against a
NodeRegistry that records what it is sent."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.tls import platform_identity
from thaw.core.config import AgentConfig
from thaw.core.grpcutil import add_secure_port, internal_server
from thaw.platform import server as server_module
from thaw.platform.process import ProcessRuntime
from thaw.proto import scheduler_pb2, scheduler_pb2_grpc


class RecordingRegistry(scheduler_pb2_grpc.NodeRegistryServicer):
    def __init__(self) -> None:
        self.registered: list[scheduler_pb2.RegisterRequest] = []

    async def Register(self, request: scheduler_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> scheduler_pb2.RegisterResponse:
        self.registered.append(request)
        return scheduler_pb2.RegisterResponse(heartbeat_interval_seconds=60.0)

    async def Heartbeat(self, request: scheduler_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> scheduler_pb2.HeartbeatResponse:
        return scheduler_pb2.HeartbeatResponse()


def test_runtime_is_a_new_field_an_older_agent_leaves_empty() -> None:
    field = scheduler_pb2.RegisterRequest.DESCRIPTOR.fields_by_name["runtime"]
    numbers = [f.number for f in scheduler_pb2.RegisterRequest.DESCRIPTOR.fields]
    assert field.number == 6 and numbers.count(6) == 1
    older = scheduler_pb2.RegisterRequest(node_id="n1").SerializeToString()
    assert scheduler_pb2.RegisterRequest.FromString(older).runtime == ""
    assert scheduler_pb2.NodeInfo(runtime="docker").runtime == "docker"


@pytest.mark.parametrize("runtime", ["process", "docker"])
async def test_agent_registers_with_its_configured_runtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str) -> None:
    # Instances never start here: a process runtime stands in for docker's (which
    # needs an engine and the base image), so both values go through the same path.
    monkeypatch.setattr(server_module, "make_runtime", lambda cfg: ProcessRuntime(None))
    registry = RecordingRegistry()
    # A scheduler's port: mutual TLS, callers checked; the agent finds its own
    # certificate under its home, as `thaw up` makes it.
    tls = platform_identity(tmp_path / "home", "scheduler")
    server = internal_server(tls)
    scheduler_pb2_grpc.add_NodeRegistryServicer_to_server(registry, server)
    port = add_secure_port(server, "127.0.0.1:0", tls)
    await server.start()
    config = AgentConfig(home=tmp_path / "home", node_id="n-reg", agent_port=0, data_port=0,
                         scheduler_address=f"127.0.0.1:{port}", host_devices="1x64MiB",
                         pinned_capacity="16MiB", shm_dir=tmp_path / "shm", runtime=runtime)
    agent = server_module.AgentServer(config)
    try:
        await agent.start()
    finally:
        await agent.stop()
        await server.stop(grace=None)
    assert [r.runtime for r in registry.registered] == [runtime]
    assert registry.registered[0].node_id == "n-reg"

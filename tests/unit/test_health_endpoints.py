"""Liveness and readiness over HTTP, through real servers: the gateway's /livez and
/readyz (a stand-in scheduler that can be reachable or not), the scheduler's health
listener (a real SchedulerServer on SQLite) and an agent's (a real AgentServer against
a NodeRegistry that can ask it to register again and then refuse it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import pytest
from aiohttp.test_utils import TestServer
from grpc_health.v1 import health, health_pb2

from tests.tls import platform_identity
from thaw.core.config import AgentConfig, GatewayConfig, SchedulerConfig
from thaw.core.grpcutil import add_secure_port, internal_server
from thaw.core.health_http import HealthServer, split_listen
from thaw.gateway.app import make_app
from thaw.gateway.origins import FUNCTION_ORIGIN_PATHS
from thaw.platform import server as server_module
from thaw.platform.process import ProcessRuntime
from thaw.proto import scheduler_pb2, scheduler_pb2_grpc
from thaw.scheduler.server import SchedulerServer

WAIT_SECONDS = 20.0


class StandInScheduler:
    """Enough of SchedulerClient for the app to start and answer readiness."""

    def __init__(self) -> None:
        self.channel = grpc.aio.insecure_channel("127.0.0.1:9")
        self.reachable = True

    async def ready(self) -> bool:
        return self.reachable

    async def close(self) -> None:
        await self.channel.close()


async def test_gateway_livez_does_not_depend_on_the_scheduler() -> None:
    sched = StandInScheduler()
    app = make_app(GatewayConfig(alerts_interval=3600), scheduler=sched)  # type: ignore[arg-type]
    async with TestServer(app, host="127.0.0.1") as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        live, ready = await http.get(f"{base}/livez"), await http.get(f"{base}/readyz")
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        assert ready.status_code == 200
        sched.reachable = False
        live, ready = await http.get(f"{base}/livez"), await http.get(f"{base}/readyz")
        assert live.status_code == 200  # alive: restarting it would not bring the scheduler
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "unavailable"
    assert "/livez" in FUNCTION_ORIGIN_PATHS


def test_a_port_alone_binds_loopback() -> None:
    assert split_listen("8081") == ("127.0.0.1", 8081)
    assert split_listen("0.0.0.0:8081") == ("0.0.0.0", 8081)
    assert split_listen("[::1]:9") == ("::1", 9)
    with pytest.raises(Exception, match="scheduler_health_listen"):
        SchedulerConfig.load(scheduler_health_listen="nope")


async def test_readiness_follows_grpc_health_and_checks() -> None:
    servicer = health.aio.HealthServicer()
    failing: list[str] = []

    async def check() -> str | None:
        return failing[0] if failing else None

    async def broken() -> str | None:
        raise RuntimeError("boom")

    server = HealthServer("test", servicer, {"thing": check})
    port = await server.start("127.0.0.1:0")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/livez")).status_code == 200
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            got = await http.get("/readyz")
            assert got.status_code == 503 and "grpc" in got.json()["reasons"]
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            assert (await http.get("/readyz")).json() == {"status": "ready",
                                                          "component": "test"}
            failing.append("the thing is away")
            got = await http.get("/readyz")
            assert got.status_code == 503
            assert got.json()["reasons"] == {"thing": "the thing is away"}
            await servicer.enter_graceful_shutdown()
            got = await http.get("/readyz")
            assert "NOT_SERVING" in got.json()["reasons"]["grpc"]
            assert (await http.get("/livez")).status_code == 200
            assert (await http.get("/metrics")).status_code == 404  # nothing else
    finally:
        await server.close()
    server = HealthServer("test", None, {"broken": broken})
    port = await server.start("0")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            got = await http.get("/readyz")
            assert got.status_code == 503
            assert got.json()["reasons"] == {"broken": "RuntimeError: boom"}
    finally:
        await server.close()


async def test_the_scheduler_serves_health_when_asked(tmp_path: Path) -> None:
    platform_identity(tmp_path, "scheduler")
    plain = SchedulerServer(SchedulerConfig(home=tmp_path, scheduler_listen="127.0.0.1:0"))
    await plain.start()
    try:
        assert plain.health_port == 0  # off by default
    finally:
        await plain.stop()
    server = SchedulerServer(SchedulerConfig(home=tmp_path, scheduler_listen="127.0.0.1:0",
                                             scheduler_health_listen="127.0.0.1:0"))
    await server.start()
    try:
        async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{server.health_port}") as http:
            assert (await http.get("/livez")).json() == {"status": "alive",
                                                         "component": "scheduler"}
            assert (await http.get("/readyz")).status_code == 200
            # The database goes away (its file made unreadable as a directory).
            db = tmp_path / "scheduler" / "thaw.db"
            assert db.is_file()
            db.rename(tmp_path / "moved.db")
            db.mkdir()
            server_engine_reset(server)
            got = await http.get("/readyz")
            assert got.status_code == 503
            assert "database" in got.json()["reasons"]
            assert (await http.get("/livez")).status_code == 200
            db.rmdir()
            (tmp_path / "moved.db").rename(db)
    finally:
        await server.stop()


def server_engine_reset(server: SchedulerServer) -> None:
    """Drop the pooled connections, so the next check opens the database again."""
    assert server.store is not None
    engine = server.store._sessions.kw["bind"]
    engine.dispose()


class Registry(scheduler_pb2_grpc.NodeRegistryServicer):
    """Registers once; told to, answers the next heartbeat with `reregister` and
    refuses registrations until let in again."""

    def __init__(self) -> None:
        self.open = True
        self.send_back = False
        self.refused = asyncio.Event()

    async def Register(self, request: scheduler_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> scheduler_pb2.RegisterResponse:
        if not self.open:
            self.refused.set()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        return scheduler_pb2.RegisterResponse(heartbeat_interval_seconds=0.05)

    async def Heartbeat(self, request: scheduler_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> scheduler_pb2.HeartbeatResponse:
        return scheduler_pb2.HeartbeatResponse(reregister=self.send_back)


async def test_an_agent_is_ready_while_registered(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "make_runtime", lambda cfg: ProcessRuntime(None))
    registry = Registry()
    tls = platform_identity(tmp_path / "home", "scheduler")
    grpc_server = internal_server(tls)
    scheduler_pb2_grpc.add_NodeRegistryServicer_to_server(registry, grpc_server)
    port = add_secure_port(grpc_server, "127.0.0.1:0", tls)
    await grpc_server.start()
    config = AgentConfig(home=tmp_path / "home", node_id="n-health", agent_port=0,
                         data_port=0, scheduler_address=f"127.0.0.1:{port}",
                         host_devices="1x64MiB", pinned_capacity="16MiB",
                         shm_dir=tmp_path / "shm", agent_health_listen="127.0.0.1:0")
    agent = server_module.AgentServer(config)
    try:
        await agent.start()
        async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{agent.health_port}") as http:
            assert (await http.get("/readyz")).json() == {"status": "ready",
                                                          "component": "agent"}
            registry.open, registry.send_back = False, True
            await asyncio.wait_for(registry.refused.wait(), WAIT_SECONDS)
            got = await http.get("/readyz")
            assert got.status_code == 503
            assert got.json()["reasons"] == {
                "registration": "not registered with the scheduler"}
            assert (await http.get("/livez")).status_code == 200
            registry.open, registry.send_back = True, False
            for _ in range(400):
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await http.get("/readyz")).status_code == 200
    finally:
        await agent.stop()
        await grpc_server.stop(grace=None)

"""`thaw scheduler`: the gRPC server that owns the metadata DB."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from prometheus_client import start_http_server

from thaw.core.config import SchedulerConfig
from thaw.core.grpcutil import add_health, add_secure_port, internal_server, mark_serving
from thaw.core.health_http import HealthServer
from thaw.core.pki import SCHEDULER, internal_identity
from thaw.proto import (
    images_pb2_grpc,
    invocations_pb2_grpc,
    scheduler_pb2_grpc,
    secrets_pb2_grpc,
    tenancy_pb2_grpc,
    usage_pb2_grpc,
    volumes_pb2_grpc,
)
from thaw.scheduler.blobs import Blobs, ChunkDisk
from thaw.scheduler.bundles import BundleStore
from thaw.scheduler.control import ControlPlane
from thaw.scheduler.db import make_engine, upgrade
from thaw.scheduler.health import database_check
from thaw.scheduler.images import ImagesService, ImageStore
from thaw.scheduler.invocations import InvocationStore
from thaw.scheduler.invocations_service import InvocationsService
from thaw.scheduler.key_audit import BOOTSTRAP, AuditedTenancyService, issue_entry, record_issue
from thaw.scheduler.nodes import AgentClient
from thaw.scheduler.policy import PolicyConfig
from thaw.scheduler.schedule_ticker import ScheduleTicker
from thaw.scheduler.schedules import ScheduleBook
from thaw.scheduler.secrets import open_secret_store
from thaw.scheduler.secrets_service import SecretsService
from thaw.scheduler.service import NodeRegistryService, SchedulerService
from thaw.scheduler.store import ALL_SCOPES, Store
from thaw.scheduler.usage import MeteringService, UsageStore
from thaw.scheduler.volumes import Volumes
from thaw.scheduler.volumes_service import VolumesService

log = structlog.get_logger()
DEV_TENANT = "dev"


def ensure_dev_key(store: Store, path: Path) -> str:
    """The development API key: created once (on the audit log, `key.issue`), kept in
    `path` (mode 0600)."""
    if path.exists():
        key = path.read_text().strip()
        if key and store.key_exists(key):
            return key
    name = "development key"
    key_id, key = store.create_key(DEV_TENANT, name=name)
    record_issue(store, issue_entry(DEV_TENANT, key_id, scopes=list(ALL_SCOPES), name=name,
                                    caller=BOOTSTRAP, source=f"dev key file {path}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


class SchedulerServer:
    def __init__(self, config: SchedulerConfig, dev_key_file: Path | None = None,
                 policy: PolicyConfig | None = None) -> None:
        self.config = config
        self.policy = policy or config
        self.dev_key_file = dev_key_file
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.control: ControlPlane | None = None
        self.store: Store | None = None
        self.metrics_port = 0
        self._metrics: WSGIServer | None = None
        self.health_port = 0
        self._health: HealthServer | None = None

    async def start(self) -> int:
        cfg = self.config
        # First: without its certificates the scheduler does not start at all.
        tls = internal_identity(cfg, SCHEDULER)
        engine = make_engine(cfg.db_url())
        await asyncio.to_thread(upgrade, engine)
        self.store = Store(engine)
        if self.dev_key_file is not None:
            await self.store.run(ensure_dev_key, self.store, self.dev_key_file)
        # The key is read (or made, once) before anything may need a secret's value.
        secrets = await asyncio.to_thread(open_secret_store, self.store, cfg.home)
        self.control = ControlPlane(
            self.store, BundleStore(cfg.home / "scheduler" / "bundles"),
            heartbeat_interval=cfg.heartbeat_interval, node_timeout=cfg.node_timeout,
            build_timeout=cfg.build_timeout, acquire_wait=cfg.acquire_wait,
            policy=self.policy, agent_client=functools.partial(AgentClient, tls=tls),
            gc_log_age=cfg.gc_log_age, secrets=secrets)
        await self.control.recover()
        server = internal_server(tls)
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerService(self.control), server)
        scheduler_pb2_grpc.add_NodeRegistryServicer_to_server(
            NodeRegistryService(self.control), server)
        invocations_pb2_grpc.add_InvocationsServicer_to_server(
            InvocationsService(InvocationStore(self.store)), server)
        usage_pb2_grpc.add_MeteringServicer_to_server(
            MeteringService(UsageStore(self.store)), server)
        tenancy_pb2_grpc.add_TenancyServicer_to_server(
            AuditedTenancyService(self.store, self.control.quotas), server)
        blobs = Blobs(self.store, ChunkDisk(cfg.home / "scheduler" / "blobs"))
        volumes_pb2_grpc.add_VolumesServicer_to_server(
            VolumesService(blobs, Volumes(self.store, blobs), self.control), server)
        images_pb2_grpc.add_ImagesServicer_to_server(
            ImagesService(ImageStore(cfg.home / "scheduler" / "images")), server)
        secrets_pb2_grpc.add_SecretsServicer_to_server(
            SecretsService(secrets, self.control), server)
        health = add_health(server)
        self.port = add_secure_port(server, cfg.scheduler_listen, tls)
        await server.start()
        await mark_serving(health, "thaw.v1.Scheduler", "thaw.v1.NodeRegistry",
                           "thaw.v1.Metering", "thaw.v1.Tenancy", "thaw.v1.Invocations",
                           "thaw.v1.Volumes", "thaw.v1.Images")
        await mark_serving(health, "thaw.v1.Secrets")
        self._server = server
        self._tasks.append(asyncio.create_task(
            self.control.reconcile_forever(cfg.reconcile_interval)))
        self._tasks.append(asyncio.create_task(self.control.gc.run_forever(cfg.gc_interval)))
        self.schedules = ScheduleTicker(
            ScheduleBook(self.store), self.control.events, self.control.input_schema,
            grace_seconds=cfg.schedule_grace_seconds, clock_file=cfg.schedule_clock_file)
        self._tasks.append(asyncio.create_task(
            self.schedules.run_forever(cfg.schedule_tick_seconds)))
        if cfg.metrics_listen:
            host, _, port = cfg.metrics_listen.rpartition(":")
            # Restore failures by fault, events by kind (scheduler/events.py).
            self._metrics, _ = start_http_server(int(port), addr=host,
                                                 registry=self.control.events.registry)
            self.metrics_port = self._metrics.server_port
        if cfg.scheduler_health_listen:
            self._health = HealthServer("scheduler", health,
                                        {"database": database_check(engine)})
            self.health_port = await self._health.start(cfg.scheduler_health_listen)
        log.info("scheduler listening", port=self.port, db=cfg.db_url().split("@")[-1])
        return self.port

    async def stop(self) -> None:
        if self._health is not None:
            await self._health.close()
            self._health = None
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.shutdown)
            self._metrics.server_close()
            self._metrics = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.stop(grace=2)
        if self.control is not None:
            await self.control.close()
        if self.store is not None:
            self.store.close()


async def serve(config: SchedulerConfig, dev_key_file: Path | None = None,
                port_file: Path | None = None) -> None:
    server = SchedulerServer(config, dev_key_file)
    port = await server.start()
    if port_file is not None:
        port_file.write_text(str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("scheduler stopping")
    await server.stop()

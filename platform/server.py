"""`thaw agent`: one per machine. gRPC control service, HTTP data plane, and the
registration/heartbeat loop to the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed

from thaw.blobstore import DiskTier, PinnedTier
from thaw.core.config import AgentConfig
from thaw.core.errors import ThawError
from thaw.core.grpcutil import (
    add_health,
    add_secure_port,
    call,
    internal_server,
    mark_serving,
    secure_channel,
)
from thaw.core.health_http import HealthServer
from thaw.core.pki import AGENT, SCHEDULER, internal_identity
from thaw.core.units import parse_size
from thaw.platform.activation import activation_budget
from thaw.platform.agent import Agent, local_fingerprint
from thaw.platform.control import AgentService
from thaw.platform.cuda.api import DEFAULT_MPS_PIPE_DIRECTORY
from thaw.platform.dataplane import DataPlane
from thaw.platform.device_setup import open_devices
from thaw.platform.devices import shm_root
from thaw.platform.environments_launch import default_environments, environment_settings
from thaw.platform.process import ProcessRuntime
from thaw.platform.runtime import Runtime
from thaw.platform.sandbox.areas import parse_uid_range
from thaw.platform.sandbox.plan import SandboxSettings
from thaw.platform.snapshots import NodeSnapshots
from thaw.platform.storage import StorageCondition, StorageHealth
from thaw.platform.telemetry import NodeSample, pinned_tier_info
from thaw.platform.template_eviction import EvictionPolicy
from thaw.platform.volumes import NodeVolumes, blob_fetcher
from thaw.proto import agent_pb2, agent_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

log = structlog.get_logger()
# How long to wait between attempts to reach a scheduler that is not up yet.
REGISTER_RETRY_SECONDS = 0.5
# In-flight requests get this long to finish on SIGTERM before instances are stopped.
DRAIN_SECONDS = 30.0
# Longest the shutdown waits to tell the scheduler that the agent stops.
STOPPING_NOTICE_SECONDS = 3.0
# Longest a registration waits for the storage check, so that it reports a full or
# read-only disk from the start (heartbeats never wait: they send the last answer).
STORAGE_CHECK_WAIT_SECONDS = 5.0


def telemetry_message(sample: NodeSample) -> agent_pb2.NodeTelemetry:
    return agent_pb2.NodeTelemetry(
        cpu_percent=sample.cpu_percent, memory_used_bytes=sample.memory_used_bytes,
        memory_total_bytes=sample.memory_total_bytes,
        instances=[agent_pb2.InstanceTelemetry(
            instance_id=i.id, function=i.function, rss_bytes=i.rss_bytes,
            unique_bytes=i.uss_bytes, cpu_percent=i.cpu_percent) for i in sample.instances],
        devices=[agent_pb2.DeviceTelemetry(
            id=d.id, kind=d.kind, capacity_bytes=d.capacity_bytes, used_bytes=d.used_bytes,
            utilization_percent=-1.0 if d.utilization_percent is None
            else d.utilization_percent) for d in sample.devices],
        slices=[agent_pb2.SliceTelemetry(
            device_id=s.device_id, instance_id=s.instance_id, function=s.function,
            size_bytes=s.size_bytes) for s in sample.slices])


def _log_unreachable(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    log.debug("scheduler not reachable yet", error=str(error))


def sandbox_settings(cfg: AgentConfig) -> SandboxSettings | None:
    """The process runtime's sandbox as configured; None when sandbox = off."""
    if cfg.sandbox == "off":
        log.warning("sandbox is off: every tenant's instances run as the agent's user "
                    "and can read and change each other and the node (development only)")
        return None
    extra = tuple(p for p in cfg.sandbox_read_only_paths.split(os.pathsep) if p)
    return SandboxSettings(
        uid_range=parse_uid_range(cfg.sandbox_uids),
        tmp_bytes=parse_size(cfg.sandbox_tmp_size), max_processes=cfg.sandbox_max_processes,
        max_open_files=cfg.sandbox_max_open_files, read_only_paths=extra,
        gpus=cfg.device == "cuda", mps_pipe_directory=_mps_pipe(cfg))


def _mps_pipe(cfg: AgentConfig) -> str:
    """The MPS daemon's pipe folder when this cuda node may use MPS and it runs."""
    if cfg.device != "cuda" or cfg.cuda_mps == "off":
        return ""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_MPS_PIPE_DIRECTORY)
    return pipe if os.path.exists(os.path.join(pipe, "control")) else ""


def _process_runtime(cfg: AgentConfig) -> Runtime:
    settings = sandbox_settings(cfg)
    if settings is not None and os.geteuid() != 0:
        raise ThawError("the process runtime's sandbox needs the agent to run as root "
                        "(it gives each tenant a uid of its own); set THAW_SANDBOX=off "
                        "to run instances unsandboxed, for development only")
    return ProcessRuntime(cfg.instance_python or None, sandbox=settings)


def _docker_runtime(cfg: AgentConfig) -> Runtime:
    from thaw.platform.docker import DockerRuntime

    return DockerRuntime.from_config(cfg)


# AgentConfig.runtime -> how that runtime is made; the name is also what the agent
# reports when it registers.
RUNTIMES: dict[str, Callable[[AgentConfig], Runtime]] = {
    "process": _process_runtime, "docker": _docker_runtime}


def make_runtime(cfg: AgentConfig) -> Runtime:
    """The runtime the config names; the process runtime for a name not in RUNTIMES."""
    return RUNTIMES.get(cfg.runtime, _process_runtime)(cfg)


class AgentServer:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node_id = config.node_id or socket.gethostname()
        self.control_port = 0
        self.data_port = 0
        self.agent: Agent | None = None
        self._grpc: grpc.aio.Server | None = None
        self._dataplane: DataPlane | None = None
        self.health_port = 0
        self._health: HealthServer | None = None
        self.registered = False
        """Registered with the scheduler (and not told to register again since)."""
        self._channel: grpc.aio.Channel | None = None
        self._registry: scheduler_pb2_grpc.NodeRegistryStub | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._storage_check: asyncio.Task[list[StorageCondition]] | None = None
        self.boot_id = uuid.uuid4().hex
        """This process's incarnation: the scheduler tells a restart from a retry by it."""

    async def _fetch_bundle(self, digest: str) -> bytes:
        assert self._registry is not None
        parts = []
        try:
            async for piece in self._registry.GetBundle(
                    scheduler_pb2.GetBundleRequest(digest=digest), timeout=120):
                parts.append(piece.data)
        except grpc.RpcError as exc:
            from thaw.core.grpcutil import decode_error
            raise decode_error(exc) from exc
        return b"".join(parts)

    async def start(self) -> None:
        cfg = self.config
        tls = internal_identity(cfg, AGENT)  # no certificates: the agent does not start
        home = cfg.home / "agent" / self.node_id
        # Unix socket paths must stay under 108 bytes: keep them short, in tmpfs.
        short = hashlib.sha256(f"{self.node_id}:{home}".encode()).hexdigest()[:10]
        shm = shm_root(cfg.shm_dir, short)
        devices, allocator = open_devices(cfg, shm / "slices")
        # Blocking: the cuda backend may time a copy to size the budget.
        activation = await asyncio.to_thread(activation_budget, devices,
                                             cfg.restore_concurrency_per_link)
        snapshots = NodeSnapshots(DiskTier(home / "chunks"),
                                  PinnedTier(parse_size(cfg.pinned_capacity),
                                             allocator=allocator), shm / "snapshots")
        self._channel = secure_channel(cfg.scheduler_address, tls, SCHEDULER)
        self._registry = scheduler_pb2_grpc.NodeRegistryStub(self._channel)
        runtime = make_runtime(cfg)
        # Instances may run another Python than the agent (docker images): restores
        # are checked against the instances' environment.
        fingerprint = {**local_fingerprint(devices), **runtime.fingerprint()}
        uid_range = parse_uid_range(cfg.sandbox_uids)
        # Per-function Python environments, made as the env_* settings say.
        environments = default_environments(home, runtime, uid_range,
                                            environment_settings(cfg, uid_range))
        self.agent = Agent(node_id=self.node_id, home=home, run_dir=shm / "run",
                           devices=devices, runtime=runtime, fingerprint=fingerprint,
                           snapshots=snapshots, fetch_bundle=self._fetch_bundle,
                           start_timeout=cfg.start_timeout, activation=activation,
                           uid_range=uid_range, tls=tls, environments=environments,
                           restored_templates=cfg.restored_templates)
        self.agent.volumes = self.agent.builds.volumes = NodeVolumes(
            home / "volumes", blob_fetcher(self._channel))
        # Zygotes need the process runtime: a docker template is a container of its own.
        zygotes = cfg.zygotes == "on" and isinstance(runtime, ProcessRuntime)
        self.agent.templates.configure(
            eviction=EvictionPolicy(parse_size(cfg.template_memory_budget),
                                    parse_size(cfg.template_min_available),
                                    cfg.template_idle_seconds),
            zygotes_home=home if zygotes else None)
        self.agent.restored.linger = cfg.restored_template_idle_seconds
        self.agent.restored.memory_low = self.agent.templates.memory_low

        server = internal_server(tls)
        agent_pb2_grpc.add_AgentServicer_to_server(AgentService(self.agent), server)
        health = add_health(server)
        self.control_port = add_secure_port(server, f"{cfg.agent_host}:{cfg.agent_port}", tls)
        await server.start()
        await mark_serving(health, "thaw.v1.Agent")
        self._grpc = server

        self.agent.storage = StorageHealth(self.node_id, [home, shm],
                                           parse_size(cfg.storage_min_free))
        self._dataplane = DataPlane(self.agent, tls)
        self.data_port = await self._dataplane.start(cfg.agent_host, cfg.data_port)
        await self._register()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        if cfg.agent_health_listen:
            self._health = HealthServer("agent", health,
                                        {"registration": self._registration_check})
            self.health_port = await self._health.start(cfg.agent_health_listen)
        log.info("agent ready", node=self.node_id, control_port=self.control_port,
                 data_port=self.data_port)

    def _data_scheme(self) -> str:
        assert self._dataplane is not None
        return self._dataplane.scheme

    def _devices(self) -> list[scheduler_pb2.DeviceInfo]:
        assert self.agent is not None
        return [scheduler_pb2.DeviceInfo(id=d.id, kind=d.kind, capacity_bytes=d.capacity,
                                         used_bytes=d.used)
                for d in self.agent.devices.usage()]

    def _pinned_info(self) -> scheduler_pb2.PinnedTierInfo:
        assert self.agent is not None
        snaps = self.agent.snapshots
        return pinned_tier_info(snaps.pinned.usage(), snaps.pinned_keys())

    async def _storage_conditions(self, wait: float = 0.0) -> list[scheduler_pb2.NodeCondition]:
        """The data directories' conditions: a check (statvfs and a test write, off the
        loop) is started unless one runs, and awaited up to `wait` seconds; otherwise
        the last one's answer, so a disk that stalls never holds up a heartbeat."""
        assert self.agent is not None
        storage = self.agent.storage
        if storage is None:
            return []
        check = self._storage_check
        if check is None or check.done():
            check = self._storage_check = asyncio.create_task(asyncio.to_thread(storage.check))
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(check), wait)
        return [c.message_pb() for c in storage.conditions]

    async def _register(self) -> float:
        assert self._registry is not None and self.agent is not None
        cfg = self.config
        conditions = await self._storage_conditions(wait=STORAGE_CHECK_WAIT_SECONDS)
        request = scheduler_pb2.RegisterRequest(
            node_id=self.node_id, control_address=f"{cfg.agent_host}:{self.control_port}",
            data_url=f"{self._data_scheme()}://{cfg.agent_host}:{self.data_port}",
            devices=self._devices(),
            instance_ids=list(self.agent.instances), runtime=cfg.runtime,
            boot_id=self.boot_id, conditions=conditions)
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(ThawError), wait=wait_fixed(REGISTER_RETRY_SECONDS),
                before_sleep=_log_unreachable, reraise=True):
            with attempt:
                resp = await call(self._registry.Register(request, timeout=10))
        self.registered = True
        return resp.heartbeat_interval_seconds or 2.0

    async def _registration_check(self) -> str | None:
        if not self.registered:
            return "not registered with the scheduler"
        return None

    async def _heartbeat_loop(self) -> None:
        assert self._registry is not None and self.agent is not None
        interval = 2.0
        while True:
            await asyncio.sleep(interval)
            exited = self.agent.take_exited()
            repaired, self.agent.repaired = self.agent.repaired, []
            try:
                pinned = await asyncio.to_thread(self._pinned_info)
                telemetry = telemetry_message(await asyncio.to_thread(
                    self.agent.sample_telemetry))
                telemetry.mps_active = self.agent.devices.compute_shares_enforced()
                conditions = await self._storage_conditions()
                resp = await call(self._registry.Heartbeat(scheduler_pb2.HeartbeatRequest(
                    node_id=self.node_id, devices=self._devices(),
                    instance_ids=list(self.agent.instances), exited=exited, pinned=pinned,
                    disk_bytes=self.agent.snapshots.disk.stored_bytes(),
                    telemetry=telemetry, boot_id=self.boot_id, repaired=repaired,
                    conditions=conditions, building=self.agent.builds.steps.messages()),
                    timeout=10))
                if resp.reregister:
                    self.registered = False
                    interval = await self._register()
            except ThawError as exc:
                self.agent.exited[:0] = exited  # report them next time
                self.agent.repaired[:0] = repaired
                log.warning("heartbeat failed", error=str(exc))
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                # Anything unexpected (a sample that raised, a bad answer) is logged and
                # the next heartbeat goes as usual: a node whose heartbeats stopped
                # would be written off as lost with all its instances.
                self.agent.exited[:0] = exited
                self.agent.repaired[:0] = repaired
                log.exception("heartbeat failed unexpectedly")

    async def _say_stopping(self) -> None:
        """Tell the scheduler this agent stops, so its node waits as "restarting"
        instead of being written off as lost when its calls fail meanwhile."""
        if self._registry is None:
            return
        try:
            await call(self._registry.Heartbeat(scheduler_pb2.HeartbeatRequest(
                node_id=self.node_id, boot_id=self.boot_id, stopping=True),
                timeout=STOPPING_NOTICE_SECONDS))
        except ThawError as exc:
            log.warning("could not tell the scheduler the agent stops", error=str(exc))

    async def stop(self) -> None:
        if self._health is not None:
            await self._health.close()
            self._health = None
        if self._heartbeat is not None:
            # Before the notice: a heartbeat after it would bring the node back.
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
            await self._say_stopping()
        if self.agent is not None:
            self.agent.draining = True
            deadline = asyncio.get_running_loop().time() + DRAIN_SECONDS
            while (any(i.inflight for i in self.agent.instances.values())
                   and asyncio.get_running_loop().time() < deadline):
                await asyncio.sleep(0.05)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._storage_check is not None:
            with contextlib.suppress(Exception):
                await self._storage_check  # a thread cannot be cancelled: let it end
        if self._dataplane is not None:
            await self._dataplane.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=1)
        if self.agent is not None:
            await self.agent.close()
            self.agent.snapshots.close()
        if self._channel is not None:
            await self._channel.close()


async def serve(config: AgentConfig, port_file: Path | None = None) -> None:
    server = AgentServer(config)
    await server.start()
    if port_file is not None:
        port_file.write_text(f"{server.control_port} {server.data_port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("agent draining")
    await server.stop()

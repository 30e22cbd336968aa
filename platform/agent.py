"""The node agent's bookkeeping: instances and tiers; bundles and snapshot builds are
builds.py's, behind ensure_bundle and build_snapshot.

Edges call into this (control.py for gRPC, dataplane.py for HTTP); instances are run
by the node's runtime (the `Runtime` protocol, runtime.py) from the LaunchSpecs of
launch.py, and templates are kept by templates.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from thaw.core.errors import (
    CorruptChunk,
    FingerprintMismatch,
    InstanceFailed,
    NodeFault,
    NotFound,
    ThawError,
)
from thaw.core.pki import Identity
from thaw.platform.activation import ActivationBudget
from thaw.platform.background import when_quiet
from thaw.platform.build_failures import schema_text
from thaw.platform.builds import Builds
from thaw.platform.chunk_repair import refetch_corrupt
from thaw.platform.devices import DeviceBackend, Slice
from thaw.platform.environments_build import Environments
from thaw.platform.environments_launch import (
    LaunchEnvironments,
    default_environments,
    environment_fingerprint,
    snapshot_environment,
)
from thaw.platform.instances import Instance, InstanceState, any_busy
from thaw.platform.launch import (
    IMAGE_ENVIRONMENT_FIELDS,
    IMAGE_NEEDS_DOCKER,
    check_image,
    code_digest,
    fresh_spec,
    image_fingerprint,
    in_area,
    instance_env,
    limit_memory,
    local_fingerprint,
    restore_spec,
    spawn_request_for,
)
from thaw.platform.logs import RUNTIME, FunctionLogs
from thaw.platform.peers import PeerChunks
from thaw.platform.process import ProcessWatch, log_tail
from thaw.platform.restore_faults import restore_fault
from thaw.platform.restored import RestoredTemplates, ready_prefault, start_stages
from thaw.platform.runtime import (
    Failed,
    LaunchSpec,
    MemoryLimitHit,
    ProcessHandle,
    PythonEnv,
    Ready,
    Runtime,
    SliceGrant,
    SpawnRequest,
    TemplateReady,
)
from thaw.platform.sandbox.areas import TenantAreas
from thaw.platform.slice_fill import fill_slice, slice_handover
from thaw.platform.snapshots import NodeSnapshots, ReadersWriter
from thaw.platform.storage import StorageHealth
from thaw.platform.telemetry import NodeSample, SliceSample, Telemetry
from thaw.platform.templates import Template, TemplatePool
from thaw.platform.volumes import NodeVolumes, with_volumes
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.snapshotter.manifest import check_fingerprint, manifest_key

__all__ = [
    "IMAGE_ENVIRONMENT_FIELDS", "IMAGE_NEEDS_DOCKER", "Agent", "ReadersWriter", "Template",
    "code_digest", "image_fingerprint", "instance_env", "limit_memory", "local_fingerprint",
]

log = structlog.get_logger()
# Tenant uids on a node (sandbox_uids): far above any login or system user.
DEFAULT_UID_RANGE = (200000, 265535)


class Agent:
    def __init__(self, *, node_id: str, home: Path, run_dir: Path, devices: DeviceBackend,
                 runtime: Runtime, snapshots: NodeSnapshots,
                 fetch_bundle: Callable[[str], Awaitable[bytes]], start_timeout: float,
                 fingerprint: dict[str, str] | None = None,
                 activation: ActivationBudget | None = None,
                 uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
                 tls: Identity | None = None,
                 environments: Environments | None = None,
                 restored_templates: bool = True) -> None:
        self.node_id = node_id
        self.home = home
        self.run_dir = run_dir
        self.devices = devices
        self.runtime = runtime
        self.snapshots = snapshots
        self.chunks = PeerChunks(snapshots, tls)
        """Chunks from peer agents, over mutual TLS with this agent's identity (`tls`;
        None only under the insecure_internal opt-out)."""
        self.telemetry = Telemetry()
        self.logs = FunctionLogs()
        """Instances' output per function (served by the data plane's GET /logs)."""
        self.shm = ReadersWriter()
        self.fetch_bundle = fetch_bundle
        self.start_timeout = start_timeout
        self.fingerprint = fingerprint or local_fingerprint(devices)
        self.activation = activation or getattr(devices, "activation", None) \
            or ActivationBudget()
        """At most N restores fill slices over one PCIe link at once (activation.py)."""
        self.instances: dict[str, Instance] = {}
        self._slices: dict[str, Slice] = {}
        """Instance id -> the slice allocated for it."""
        self.exited: list[scheduler_pb2.InstanceExit] = []
        self.repaired: list[str] = []
        """Corrupt chunks fetched again since the last heartbeat (it reports them)."""
        self.storage: StorageHealth | None = None
        """Whether the node's data directories are writable (None: not checked)."""
        self._watchers: set[asyncio.Task[None]] = set()
        self.draining = False
        for sub in ("bundles", "builds", "logs"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.areas = TenantAreas(home=home, run_dir=run_dir, uid_range=uid_range,
                                 owned=runtime.capabilities.uid_per_tenant)
        """Each tenant's uid and writable folders (sockets, logs, build outputs)."""
        self.environments = LaunchEnvironments(
            environments or default_environments(home, runtime, uid_range),
            runtime.capabilities)
        """Per-function Python environments (environments*.py; None of them on a
        runtime without them)."""
        self.builds = Builds(home=home, runtime=runtime, areas=self.areas,
                             snapshots=snapshots, logs=self.logs, fetch_bundle=fetch_bundle,
                             start_timeout=start_timeout, environments=self.environments)
        """Bundles and snapshot builds (builds.py)."""
        self.templates = TemplatePool(
            runtime=runtime, areas=self.areas, start_timeout=start_timeout,
            ensure_bundle=self.ensure_bundle, spawn_task=self._spawn_task)
        self.builds.templates = self.templates
        self.restored = RestoredTemplates(
            runtime=runtime, places=self._restored_places, start_timeout=start_timeout,
            spawn_task=self._spawn_task, exit_status=self.templates.exited,
            enabled=restored_templates)
        """Per snapshot, a fork of its template that restored it once: later instances
        fork from it (restored.py)."""
        self.volumes: NodeVolumes | None = None
        """Model volumes (volumes.py), set by the server that can fetch their chunks."""

    # ---- bundles and builds (builds.py) ---------------------------------------------

    async def ensure_bundle(self, digest: str, data: bytes | None = None) -> Path:
        """The bundle unpacked under <home>/bundles/<digest> (fetched if need be)."""
        return await self.builds.ensure_bundle(digest, data)

    async def build_snapshot(self, req: agent_pb2.BuildSnapshotRequest
                             ) -> agent_pb2.BuildSnapshotResponse:
        """Run the function's setup() and store its snapshot (builds.py)."""
        if self.storage is not None:
            # 507 before writing anything.
            self.storage.refuse_writes(f"building {req.function.tenant}/{req.function.name}")
        return await self.builds.build_snapshot(req)

    def _as_tenant(self, launch: LaunchSpec, spec: agent_pb2.FunctionSpec) -> LaunchSpec:
        """The launch under its tenant's uid, its area writable (where the runtime
        runs instances under tenant uids)."""
        return in_area(launch, self.areas.area(spec.tenant), self.runtime.capabilities)

    def _restored_places(self, tenant: str, snapshot: str) -> tuple[str, str]:
        """A restored template's control socket and log, in its tenant's area."""
        area = self.areas.area(tenant)
        return str(area.run / f"rt-{snapshot[:16]}.sock"), \
            str(area.logs / f"restored-template-{snapshot[:16]}.log")

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def prepare_template(self, spec: agent_pb2.FunctionSpec,
                               manifest: manifest_pb2.SnapshotManifest) -> float:
        started = time.perf_counter()
        await self.chunks.ensure(manifest, [])
        python_env = await self._snapshot_env(spec, manifest, "template")
        async with self.shm.reading():
            mat = await asyncio.to_thread(self.snapshots.materialize, manifest)
            await self.templates.ensure(spec, manifest, mat, python_env)
        return time.perf_counter() - started

    def _env_progress(self, spec: agent_pb2.FunctionSpec, source: str) -> Callable[[str], None]:
        """Environment steps (resolving, installing, cached) as lines of the function's
        logs."""
        return functools.partial(self.logs.append, f"{spec.tenant}/{spec.name}", source,
                                 RUNTIME)

    async def _snapshot_env(self, spec: agent_pb2.FunctionSpec,
                            manifest: manifest_pb2.SnapshotManifest, source: str
                            ) -> PythonEnv | None:
        env = await self.environments.for_snapshot(
            snapshot_environment(manifest), f"{spec.tenant}/{spec.name}",
            self._env_progress(spec, source))
        return self.environments.python_env(env)

    # ---- instances -------------------------------------------------------------------

    def _new_instance(self, instance_id: str, spec: agent_pb2.FunctionSpec,
                      state: InstanceState) -> Instance:
        if instance_id in self.instances:
            raise InstanceFailed(f"instance {instance_id} already exists")
        area = self.areas.area(spec.tenant)
        inst = Instance(
            id=instance_id, function=f"{spec.tenant}/{spec.name}", version=spec.version,
            socket=str(area.run / f"{instance_id}.sock"),
            max_concurrency=max(1, spec.max_concurrency), timeout=spec.timeout_seconds or 300.0,
            state=state, log_path=str(area.logs / f"{instance_id}.log"))
        inst.slots = asyncio.Semaphore(inst.max_concurrency)
        self.instances[instance_id] = inst
        self.logs.watch(inst.id, inst.function, inst.log_path)
        self.logs.append(inst.function, inst.id, RUNTIME,
                         f"instance {inst.id} {state.value} (version {spec.version})")
        return inst

    async def start_instance(self, req: agent_pb2.StartInstanceRequest
                             ) -> agent_pb2.StartInstanceResponse:
        if self.draining:
            # Not this snapshot's fault: the scheduler places the start elsewhere.
            raise NodeFault(f"node {self.node_id} is draining")
        spec = req.function
        restore = req.kind == agent_pb2.START_RESTORE
        inst = self._new_instance(req.instance_id, spec,
                                  InstanceState.RESTORING if restore else InstanceState.STARTING)
        try:
            if spec.gpu_memory_bytes:
                await self._allocate_slice(inst, spec, restore,
                                           req.manifest.device.size if restore else None)
            if restore:
                timings = await self._restore_or_repair(inst, spec, req.manifest,
                                                        list(req.peers))
            else:
                timings = await self._start_fresh(inst, spec)
        except BaseException as exc:
            await self._discard(inst, f"start failed: {exc}")
            # The error tells the scheduler whose fault a failed restore is: only the
            # snapshot's own faults quarantine it (restore_faults.py).
            reported = restore_fault(exc) if restore else exc
            if reported is not exc:
                raise reported from exc
            raise
        if spec.memory_limit_bytes:
            limit_memory(inst.pid, spec.memory_limit_bytes)
        inst.move(InstanceState.READY)
        self._watch(inst)
        self.logs.append(inst.function, inst.id, RUNTIME, f"instance {inst.id} ready ("
                         f"{'restore' if restore else 'fresh'}, pid {inst.pid}, " + ", ".join(
                             f"{k} {v:.3f}s" for k, v in timings) + ")")
        log.info("instance ready", instance=inst.id, function=inst.function,
                 start="restore" if restore else "fresh", pid=inst.pid,
                 timings={k: round(v, 4) for k, v in timings})
        return agent_pb2.StartInstanceResponse(
            instance_id=inst.id, kind=req.kind, pid=inst.pid, input_schema=inst.input_schema,
            timings=[agent_pb2.Timing(stage=k, seconds=v) for k, v in timings])

    async def _allocate_slice(self, inst: Instance, spec: agent_pb2.FunctionSpec,
                              restore: bool, resident: int | None = None) -> None:
        """The instance's slice, allocated off the event loop (a GPU allocation zeroes
        its memory and waits for that). Cancelled meanwhile, the allocation still ends
        in its thread: what it got is then given back. `resident`: a restore's device
        arena, the part of the slice allocated now (the rest is booked)."""
        task = asyncio.ensure_future(asyncio.to_thread(
            self._allocate, spec.gpu_memory_bytes, inst.id, spec.gpu_compute, restore,
            resident))
        try:
            sl = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_abandoned)
            raise
        self._slices[inst.id] = sl
        inst.slice_id, inst.slice_device, inst.slice_bytes = sl.id, sl.device_id, sl.size

    def _allocate(self, size: int, owner: str, compute_percent: int, restore: bool,
                  resident: int | None) -> Slice:
        """A slice carries the function's compute share (applied under MPS) and, for a
        restore, counts on its link from now (the activation budget) and allocates
        only the device arena it is filled with."""
        return self.devices.allocate(size, owner, compute_percent=compute_percent,
                                     restore=restore, resident=resident)

    def _release_abandoned(self, task: asyncio.Future[Slice]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        slice_id = task.result().id

        async def release() -> None:
            with contextlib.suppress(ThawError):
                await asyncio.to_thread(self.devices.release, slice_id)

        self._spawn_task(release())

    async def _start_fresh(self, inst: Instance, spec: agent_pb2.FunctionSpec
                           ) -> list[tuple[str, float]]:
        began = time.perf_counter()
        bundle = await self.ensure_bundle(spec.bundle_digest)
        check_image(spec, self.runtime.capabilities)
        env = await self.environments.for_bundle(bundle, inst.function,
                                                 self._env_progress(spec, inst.id), spec.image)
        python_env = self.environments.python_env(env)
        self.environments.hold(inst.id, env)
        grant = (SliceGrant(inst.slice_id, inst.slice_device, inst.slice_bytes)
                 if inst.slice_id else None)
        launch = fresh_spec(spec, bundle, instance_id=inst.id, socket=inst.socket,
                            log_path=inst.log_path, grant=grant)
        launch = await with_volumes(self.volumes, launch, spec, self.runtime.capabilities)
        proc = await self.runtime.launch(self._as_tenant(
            dataclasses.replace(launch, python_env=python_env), spec))
        inst.pid = proc.pid
        inst.process = proc
        event = await proc.next_status(self.start_timeout)
        if not isinstance(event, Ready):
            await proc.kill()
            inst.move(InstanceState.SETUP_FAILED)
            stage, reason = ((event.stage.value, event.reason) if isinstance(event, Failed)
                             else ("start", "unknown"))
            raise InstanceFailed(f"{stage} failed: {reason}")
        inst.input_schema = schema_text(event.input_schema)
        t = event.timings
        imported, set_up = float(t.get("import", 0.0)), float(t.get("setup", 0.0))
        # The rest of the start: its bundle and environment made ready, the process
        # launched (sandbox, interpreter) until the runtime began importing.
        launching = max(0.0, time.perf_counter() - began - imported - set_up)
        return [("launch", launching), ("import", imported), ("setup", set_up)]

    async def _restore_or_repair(self, inst: Instance, spec: agent_pb2.FunctionSpec,
                                 manifest: manifest_pb2.SnapshotManifest,
                                 peers: list[str]) -> list[tuple[str, float]]:
        """_restore; a chunk found corrupt on this node is fetched again from a peer and
        the restore tried once more (chunk_repair.py); heartbeats report the repair."""
        if self.storage is not None and self.storage.conditions:
            missing = await asyncio.to_thread(self.chunks.missing, manifest)
            if missing:  # they would be written here: the scheduler restores elsewhere
                self.storage.refuse_writes(f"fetching the chunks of {spec.tenant}/{spec.name}")
        try:
            return await self._restore(inst, spec, manifest, peers)
        except CorruptChunk as exc:
            repaired = await refetch_corrupt(self.snapshots, self.chunks, manifest, peers,
                                             exc, self.node_id)
            if repaired is None:
                raise
            self.repaired.append(repaired)
            return await self._restore(inst, spec, manifest, peers)

    async def _restore(self, inst: Instance, spec: agent_pb2.FunctionSpec,
                       manifest: manifest_pb2.SnapshotManifest,
                       peers: list[str]) -> list[tuple[str, float]]:
        if manifest.fingerprint.function_version not in ("", spec.version):
            raise FingerprintMismatch(
                f"snapshot is of version {manifest.fingerprint.function_version}, "
                f"not {spec.version}", field="fingerprint.function_version")
        env = await self.environments.for_snapshot(
            snapshot_environment(manifest), inst.function, self._env_progress(spec, inst.id))
        check_fingerprint(manifest, image_fingerprint(
            environment_fingerprint(self.fingerprint, env,
                                    self.runtime.capabilities.environments_on_own_python),
            spec, manifest))
        python_env = self.environments.python_env(env)
        self.environments.hold(inst.id, env)
        await self.chunks.ensure(manifest, peers)
        sl = self._slices.get(inst.id)
        # The memfds must stay open until the instance has them: no eviction or garbage
        # collection closes them between materializing and handing them over.
        async with self.shm.reading():
            mat = await asyncio.to_thread(self.snapshots.materialize, manifest)
            started = time.perf_counter()
            template = await self.templates.ensure(spec, manifest, mat, python_env)
            template_s = time.perf_counter() - started
            started = time.perf_counter()
            request = spawn_request_for(spec, instance_id=inst.id, socket=inst.socket,
                                        log=inst.log_path, fds=mat.descriptors())
            waited = 0.0
            self.restored.hold(inst.id, mat.key)
            snapshot = (mat.key, manifest.device.size)
            if sl is None:
                pid, prefault, forked = await self._spawn(inst, spec, request, template,
                                                          python_env, snapshot)
            else:
                # Admitted among the restores sharing the slice's link, from the fill
                # until the instance is up: the wait is the start's queue stage.
                async with self.activation.admit(sl) as waited:
                    started = time.perf_counter()
                    # Filled before the instance hears of it: it restores views into it.
                    await asyncio.to_thread(fill_slice, self.devices, sl, manifest,
                                            self.snapshots)
                    descriptor, slice_fd = slice_handover(sl)
                    fds = dict(request.fds)
                    if slice_fd is not None:
                        fds["slice"] = slice_fd
                    request = dataclasses.replace(request, fds=fds, slice=descriptor,
                                                  env={**request.env, **sl.instance_env()})
                    pid, prefault, forked = await self._spawn(inst, spec, request, template,
                                                              python_env, snapshot)
        inst.pid = pid
        return [("queue", waited), ("fetch", mat.seconds), ("template", template_s),
                *start_stages(time.perf_counter() - started, prefault, forked)]

    async def _spawn(self, inst: Instance, spec: agent_pb2.FunctionSpec,
                     request: SpawnRequest, template: Template,
                     python_env: PythonEnv | None, snapshot: tuple[str, int]
                     ) -> tuple[int, float, float | None]:
        """Fork the instance from its snapshot's restored template, else from its
        template, or restore it without a fork where the template may not fork; returns
        its pid, the seconds its restore waited on prefaulting the host arena (the
        runtime's `prefault` timing; 0 when unknown) and, for a fork of a restored
        template, this start's wait for that one to start (None: no such fork)."""
        if not template.fork_safe:
            return await self._restore_unforked(inst, spec, request, template,
                                                python_env), 0.0, None
        forked = await self.restored.spawn(
            snapshot=snapshot[0], tenant=spec.tenant, template_control=template.control,
            request=request, device_size=snapshot[1])
        if forked is not None:
            self.logs.append(inst.function, inst.id, RUNTIME,
                             f"instance {inst.id} forked from its restored template")
            return forked.pid, ready_prefault(forked.ready), forked.restore_seconds
        pid, ready = await self.runtime.spawn(template.control, request, self.start_timeout)
        return pid, ready_prefault(ready), None

    async def _restore_unforked(self, inst: Instance, spec: agent_pb2.FunctionSpec,
                                request: SpawnRequest, template: Template,
                                python_env: PythonEnv | None) -> int:
        """Restore in a fresh interpreter that imports the function and then takes the
        same spawn request (and descriptors) a template would: for a snapshot whose
        template may not fork. Returns the instance's pid."""
        reason = template.unsafe_reason or "its template may not fork"
        log.info("restoring without fork", instance=inst.id, function=inst.function,
                 reason=reason)
        self.logs.append(inst.function, inst.id, RUNTIME,
                         f"instance {inst.id} restores in a fresh interpreter: {reason}")
        bundle = await self.ensure_bundle(spec.bundle_digest)
        control = str(self.areas.area(spec.tenant).run / f"r-{inst.id}.sock")
        grant = (SliceGrant(inst.slice_id, inst.slice_device, inst.slice_bytes, request.slice)
                 if inst.slice_id else None)
        launch = restore_spec(spec, bundle, instance_id=inst.id, control=control,
                              log_path=inst.log_path, grant=grant)
        # Its imports initialise CUDA before any request comes: the slice's environment
        # (its GPU, an MPS share) must be there from the start.
        proc = await self.runtime.launch(self._as_tenant(dataclasses.replace(
            launch, env={**launch.env, **request.env}, python_env=python_env), spec))
        inst.process = proc
        inst.pid = proc.pid
        event = await proc.next_status(self.start_timeout)
        if not isinstance(event, TemplateReady):
            await proc.kill()
            stage, why = ((event.stage.value, event.reason) if isinstance(event, Failed)
                          else ("import", f"unexpected {event.event} event"))
            raise InstanceFailed(f"{stage} failed: {why}")
        await self.runtime.spawn(control, request, self.start_timeout)
        return proc.pid

    def _watch(self, inst: Instance) -> None:
        async def watch() -> None:
            watcher = ProcessWatch(inst.pid)
            try:
                await watcher.done.wait()
            finally:
                watcher.close()
            if inst.state is not InstanceState.DEFUNCT:
                exited = (await inst.process.exited() if inst.process is not None
                          else await self.templates.exited(inst.pid))
                how = f" ({exited.reason})" if exited is not None else ""
                if isinstance(exited, MemoryLimitHit):
                    log.warning("instance ran out of memory", instance=inst.id,
                                function=inst.function)
                tail = log_tail(inst.log_path, 5)
                reason = f"the instance process exited{how}" + (
                    f"; its last output:\n{tail}" if tail else "")
                await self.fail_instance(inst, reason)

        self._spawn_task(watch())

    async def _discard(self, inst: Instance, reason: str) -> None:
        if not inst.ended:
            if inst.state is InstanceState.READY:
                inst.move(InstanceState.DRAINING)
            inst.move(InstanceState.DEFUNCT)
        inst.exit_reason = inst.exit_reason or reason
        inst.exited.set()
        if inst.pid:
            await self.runtime.stop(inst.process or ProcessHandle(inst.pid), reason)
        self._slices.pop(inst.id, None)
        await self.restored.release(inst.id)
        self.environments.release(inst.id)
        if self.volumes is not None:
            self.volumes.release(inst.id)
        if inst.slice_id:
            # A GPU release zeroes the slice and waits for it: off the event loop.
            try:
                await asyncio.to_thread(self.devices.release, inst.slice_id)
            except NotFound:
                pass
            except ThawError as exc:  # e.g. a slice that could not be zeroed: kept out
                log.error("slice not released", instance=inst.id, error=str(exc))
            inst.slice_id = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inst.socket)
        self.instances.pop(inst.id, None)
        # Its last lines are read from disk: off the event loop.
        await self.logs.unwatch_in_thread(inst.id)
        self.logs.append(inst.function, inst.id, RUNTIME,
                         f"instance {inst.id} ended: {inst.exit_reason}")

    async def fail_instance(self, inst: Instance, reason: str) -> None:
        """An instance broke while serving (hung past its timeout, ...): stop it and
        tell the scheduler, which places the next request elsewhere."""
        if inst.state is InstanceState.DEFUNCT:
            return
        inst.exit_reason = reason
        await self._discard(inst, reason)
        self.exited.append(scheduler_pb2.InstanceExit(instance_id=inst.id, reason=reason))
        log.warning("instance failed", instance=inst.id, function=inst.function, reason=reason)

    async def stop_instance(self, instance_id: str, reason: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:
            return
        if inst.state is InstanceState.READY:
            inst.move(InstanceState.DRAINING)
        await self._discard(inst, reason or "stopped")
        log.info("instance stopped", instance=instance_id, reason=reason)

    # ---- tiers ---------------------------------------------------------------------

    async def prewarm(self, manifest: manifest_pb2.SnapshotManifest, peers: list[str],
                      background: bool = False) -> tuple[int, float]:
        """Move a snapshot's chunks into the pinned tier (no GPU memory is used);
        `background`: first wait for a quiet node (platform/background.py)."""
        started = time.perf_counter()
        if background:
            await when_quiet(lambda: any_busy(self.instances.values()))
        await self.chunks.ensure(manifest, peers)
        nbytes = await asyncio.to_thread(self.snapshots.prewarm, manifest)
        return nbytes, time.perf_counter() - started

    async def evict(self, manifest: manifest_pb2.SnapshotManifest) -> int:
        async with self.shm.writing():
            return await asyncio.to_thread(self.snapshots.evict, manifest)

    async def collect_garbage(self, keep: list[manifest_pb2.SnapshotManifest]) -> tuple[int, int]:
        """Forget every snapshot not in `keep`: its template, host-memory copies and
        the disk chunks no kept manifest shares."""
        await self.restored.collect({manifest_key(m) for m in keep})
        await self.templates.collect({manifest_key(m) for m in keep})
        await self.collect_environments(keep)
        async with self.shm.writing():
            return await asyncio.to_thread(self.snapshots.collect_garbage, keep)

    async def collect_environments(self, keep: list[manifest_pb2.SnapshotManifest]
                                   ) -> list[str]:
        """Remove the node's environments that nothing in use runs in (`thaw env gc`,
        and every garbage collection); returns their keys."""
        return list(await self.environments.collect(keep, self.templates.environment_keys()))

    def sample_telemetry(self) -> NodeSample:
        """Blocking (psutil): call from a thread."""
        instances = list(self.instances.values())
        return self.telemetry.sample(
            [(i.id, i.function, i.pid) for i in instances], self.devices.usage(),
            [SliceSample(i.slice_device, i.id, i.function, i.slice_bytes)
             for i in instances if i.slice_id])

    def take_exited(self) -> list[scheduler_pb2.InstanceExit]:
        exited, self.exited = self.exited, []
        return exited

    async def close(self) -> None:
        """Stop every instance and template: no process outlives the agent."""
        self.draining = True
        await asyncio.gather(*(self.stop_instance(i, "agent shutting down")
                               for i in list(self.instances)), return_exceptions=True)
        for task in list(self._watchers):
            task.cancel()
        await self.restored.close()
        await self.templates.close()
        self.devices.close()
        await self.chunks.close()
        await self.runtime.close()

"""The node agent's bookkeeping: bundles, snapshot builds, templates, instances.

Edges call into this (control.py for gRPC, dataplane.py for HTTP); the processes
themselves are run by the process runtime (process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import os
import resource
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from thaw.core.errors import (
    ChunkNotFound,
    FingerprintMismatch,
    ImageNotOnNode,
    InstanceFailed,
    NotFound,
    SnapshotError,
    ThawError,
)
from thaw.core.spec import extract_bundle
from thaw.platform.devices import DeviceBackend, gpu_info
from thaw.platform.instances import Instance, InstanceState
from thaw.platform.logs import RUNTIME, FunctionLogs
from thaw.platform.peers import PeerChunks
from thaw.platform.process import (
    ProcessRuntime,
    ProcessWatch,
    RuntimeProcess,
    describe_exit,
    log_tail,
    terminate,
)
from thaw.platform.snapshots import Materialized, NodeSnapshots
from thaw.platform.telemetry import NodeSample, SliceSample, Telemetry
from thaw.proto import agent_pb2, manifest_pb2, scheduler_pb2
from thaw.snapshotter.manifest import check_fingerprint, manifest_key

log = structlog.get_logger()
# After an instance's process ends, how long to wait for its template to report the
# exit status (it reaps the child and writes a line on its status pipe).
EXIT_STATUS_WAIT_SECONDS = 0.5
# Why a node without containers cannot run a function that names an image (thaw.toml
# [runtime] image): the process runtime has no image to run it in.
IMAGE_NEEDS_DOCKER = ("this node runs the process runtime; image functions need "
                      "THAW_RUNTIME=docker")
# Fingerprint fields an image function's image decides (its Python and packages). The
# spec pins the image by id and the snapshot was built in that very image, so these
# match by construction; the node's own values (its virtualenv's) say nothing of it.
IMAGE_ENVIRONMENT_FIELDS = ("python", "torch", "numpy")


@dataclass
class Template:
    """A zygote that imported a snapshot's modules; restores fork from it."""

    key: str
    process: RuntimeProcess
    control: str
    import_seconds: float


def local_fingerprint(device_type: str) -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return ""

    model, driver = gpu_info() if device_type == "cuda" else ("", "")
    return {"python": ".".join(map(str, sys.version_info[:3])), "torch": version("torch"),
            "numpy": version("numpy"), "device_type": device_type, "gpu_model": model,
            "driver": driver}


def code_digest(bundle: Path) -> str:
    """SHA-256 over a bundle's files, thaw.toml excluded (names and settings differ
    between copies of one model; the code they import does not)."""
    h = hashlib.sha256()
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel == "thaw.toml" or "__pycache__" in rel:
            continue
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def instance_env(spec: agent_pb2.FunctionSpec, per_function: bool = True) -> dict[str, str]:
    """What the in-instance runtime reads from its environment (templates pass it on
    to the instances they fork, so a shared template gets no per-function names)."""
    env = {"THAW_FUNCTION": f"{spec.tenant}/{spec.name}",
           "THAW_FUNCTION_VERSION": spec.version} if per_function else {}
    if spec.max_batch_size > 1:
        env["THAW_MAX_BATCH_SIZE"] = str(spec.max_batch_size)
        env["THAW_MAX_BATCH_WAIT_MS"] = f"{spec.max_batch_wait_ms:g}"
    return env


def image_fingerprint(local: dict[str, str], spec: agent_pb2.FunctionSpec,
                      manifest: manifest_pb2.SnapshotManifest) -> dict[str, str]:
    """What a restore of `spec` is checked against: this node's fingerprint, except
    for an image function, whose environment fields are its image's (see
    IMAGE_ENVIRONMENT_FIELDS); the device fields are the node's either way."""
    if not spec.image:
        return local
    return {**local, **{key: getattr(manifest.fingerprint, key)
                        for key in IMAGE_ENVIRONMENT_FIELDS}}


def limit_memory(pid: int, extra_bytes: int) -> None:
    """Cap what the instance may allocate from now on: RLIMIT_DATA counts private
    writable memory (heap, anonymous and copy-on-write mappings), so the cap is what
    it holds after its restore plus the function's `resources.memory`. Past it,
    allocations fail with MemoryError and the runtime answers 5xx and exits (it is
    then replaced). Portable: needs no cgroup."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            data_kb = next(int(line.split()[1]) for line in handle
                           if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        return
    limit = data_kb * 1024 + extra_bytes
    with contextlib.suppress(OSError):
        resource.prlimit(pid, resource.RLIMIT_DATA, (limit, limit))


class ReadersWriter:
    """Restores read the tmpfs snapshot files (many at once); eviction and garbage
    collection delete them (alone). asyncio has no such lock."""

    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            async with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            async with self._changed:
                self._writing = False
                self._changed.notify_all()


class Agent:
    def __init__(self, *, node_id: str, home: Path, run_dir: Path, devices: DeviceBackend,
                 runtime: ProcessRuntime, snapshots: NodeSnapshots,
                 fetch_bundle: Callable[[str], Awaitable[bytes]], start_timeout: float,
                 fingerprint: dict[str, str] | None = None) -> None:
        self.node_id = node_id
        self.home = home
        self.run_dir = run_dir
        self.devices = devices
        self.runtime = runtime
        self.snapshots = snapshots
        self.chunks = PeerChunks(snapshots)
        self.telemetry = Telemetry()
        self.logs = FunctionLogs()
        """Instances' output per function (served by the data plane's GET /logs)."""
        self.shm = ReadersWriter()
        self.fetch_bundle = fetch_bundle
        self.start_timeout = start_timeout
        self.fingerprint = fingerprint or local_fingerprint(devices.kind)
        self.instances: dict[str, Instance] = {}
        self.templates: dict[str, Template] = {}
        self._template_starts: dict[str, asyncio.Task[Template]] = {}
        self.exited: list[scheduler_pb2.InstanceExit] = []
        self._watchers: set[asyncio.Task[None]] = set()
        self._exit_codes: dict[int, int] = {}
        self._code_digests: dict[str, str] = {}
        self._template_users: dict[str, set[str]] = {}
        self._templates_by_code: dict[tuple[str, str], str] = {}
        """Template key -> the snapshots (manifest keys) restored from it."""
        self._exit_waiters: dict[int, asyncio.Future[int]] = {}
        self.draining = False
        for sub in ("bundles", "builds", "logs"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)

    # ---- bundles ----------------------------------------------------------------

    async def ensure_bundle(self, digest: str, data: bytes | None = None) -> Path:
        target = self.home / "bundles" / digest
        if target.exists():
            return target
        if data is None:
            data = await self.fetch_bundle(digest)
        staging = self.home / "bundles" / f".{digest}-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(extract_bundle, data, str(staging))
        try:
            os.replace(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another start won the race
        return target

    # ---- builds ------------------------------------------------------------------

    async def build_snapshot(self, req: agent_pb2.BuildSnapshotRequest
                             ) -> agent_pb2.BuildSnapshotResponse:
        spec = req.function
        name = f"{spec.tenant}/{spec.name}"
        bundle = await self.ensure_bundle(spec.bundle_digest, req.bundle or None)
        if spec.image and self.runtime.name != "docker":
            return agent_pb2.BuildSnapshotResponse(ok=False, stage="runtime",
                                                   reason=IMAGE_NEEDS_DOCKER)
        build_id = f"{spec.tenant}-{spec.name}-{spec.version}-{uuid.uuid4().hex[:6]}"
        out = self.home / "builds" / build_id
        out.mkdir(parents=True)
        log_path = str(self.home / "logs" / f"build-{spec.tenant}-{spec.name}-{spec.version}.log")
        try:
            template = await self._template_with_code(spec)
            build_in_template = getattr(self.runtime, "build_in_template", None)
            if template is not None and build_in_template is not None:
                # Same code as a running template: fork it, skip the imports.
                try:
                    event = await build_in_template(template.control, {
                        "out": str(out), "log": log_path,
                        "function_version": spec.version}, self.start_timeout)
                except ThawError as exc:
                    return agent_pb2.BuildSnapshotResponse(ok=False, stage="setup",
                                                           reason=str(exc))
            else:
                event = await self._build_fresh(spec, bundle, out, log_path)
            if event.get("event") != "captured":
                return agent_pb2.BuildSnapshotResponse(
                    ok=False, stage=event.get("stage", "setup"),
                    reason=event.get("reason", "unknown"),
                    attribute_path=event.get("attribute_path") or "")
            try:
                manifest, stored = await asyncio.to_thread(
                    self.snapshots.store_capture, out, function=name, version=spec.version)
            except (OSError, ThawError) as exc:
                return agent_pb2.BuildSnapshotResponse(ok=False, stage="store", reason=str(exc))
            log.info("snapshot built", function=name, version=spec.version,
                     host_bytes=manifest.host.size, stored_bytes=stored,
                     setup_s=round(manifest.setup_seconds, 3))
            return agent_pb2.BuildSnapshotResponse(ok=True, manifest=manifest,
                                                   stored_bytes=stored)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    async def _build_fresh(self, spec: agent_pb2.FunctionSpec, bundle: Path, out: Path,
                           log_path: str) -> dict[str, Any]:
        proc = await self.runtime.launch(
            "build", ["--bundle", str(bundle), "--handler", spec.handler, "--out", str(out),
                      "--function-version", spec.version], log_path, cwd=str(bundle),
            env=instance_env(spec), instance_id=out.name,
            memory_limit_bytes=spec.memory_limit_bytes, **self._image_option(spec))
        try:
            return await proc.next_event(self.start_timeout)
        except ThawError as exc:
            return {"event": "failed", "stage": "setup", "reason": str(exc)}
        finally:
            await proc.proc.wait()

    async def _template_with_code(self, spec: agent_pb2.FunctionSpec) -> Template | None:
        """A running template that imported exactly this bundle's code and handler."""
        code = await self._code_digest(spec)
        key = self._templates_by_code.get((code, spec.handler))
        template = self.templates.get(key) if key else None
        if template is None or template.process.proc.returncode is not None:
            return None
        return template

    async def _code_digest(self, spec: agent_pb2.FunctionSpec) -> str:
        """The bundle's code digest; for an image function, of the code and the image
        (the same code in another image imports other packages: no shared template)."""
        code = self._code_digests.get(spec.bundle_digest)
        if code is None:
            bundle = await self.ensure_bundle(spec.bundle_digest)
            code = await asyncio.to_thread(code_digest, bundle)
            if spec.image:
                code = hashlib.sha256(f"{code}\nimage:{spec.image}".encode()).hexdigest()
            self._code_digests[spec.bundle_digest] = code
        return code

    def _image_option(self, spec: agent_pb2.FunctionSpec) -> dict[str, str]:
        """The launch option naming an image function's image; refused on a node
        whose runtime runs no containers."""
        if not spec.image:
            return {}
        if self.runtime.name != "docker":
            raise InstanceFailed(f"runtime: {IMAGE_NEEDS_DOCKER}")
        return {"image": spec.image}

    # ---- templates -----------------------------------------------------------------

    async def template_key(self, spec: agent_pb2.FunctionSpec,
                           manifest: manifest_pb2.SnapshotManifest) -> str:
        """Templates are per environment, not per function: bundles with the same code
        (thaw.toml aside) and the same imported modules share one template, so many
        copies of a model cost one set of imports in memory."""
        code = await self._code_digest(spec)
        h = hashlib.sha256(f"{code}\n{spec.handler}\n".encode())
        if self.runtime.name == "docker":
            # A template's container holds the instances it forks: one per tenant, so
            # a container never holds two tenants' instances.
            h.update(f"tenant:{spec.tenant}\n".encode())
        h.update("\n".join(manifest.modules).encode())
        h.update(json.dumps(instance_env(spec, per_function=False), sort_keys=True).encode())
        return h.hexdigest()[:24]

    async def ensure_template(self, spec: agent_pb2.FunctionSpec,
                              manifest: manifest_pb2.SnapshotManifest,
                              mat: Materialized) -> Template:
        key = await self.template_key(spec, manifest)
        self._template_users.setdefault(key, set()).add(mat.key)
        template = self.templates.get(key)
        if template is not None and template.process.proc.returncode is None:
            return template
        task = self._template_starts.get(key)
        if task is None:
            task = asyncio.create_task(self._start_template(key, spec, mat))
            self._template_starts[key] = task
            task.add_done_callback(lambda _t: self._template_starts.pop(key, None))
        return await asyncio.shield(task)

    async def _start_template(self, key: str, spec: agent_pb2.FunctionSpec,
                              mat: Materialized) -> Template:
        bundle = await self.ensure_bundle(spec.bundle_digest)
        control = str(self.run_dir / f"t-{key[:16]}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        log_path = str(self.home / "logs" / f"template-{spec.tenant}-{spec.name}.log")
        proc = await self.runtime.launch(
            "template", ["--bundle", str(bundle), "--handler", spec.handler,
                         "--snapshot-json", mat.snapshot_json, "--control", control],
            log_path, cwd=str(bundle), env=instance_env(spec, per_function=False),
            instance_id=f"template-{key[:16]}", memory_limit_bytes=spec.memory_limit_bytes,
            **self._image_option(spec))
        event = await proc.next_event(self.start_timeout)
        if event.get("event") != "template_ready":
            await proc.kill()
            raise InstanceFailed(f"template failed: {event.get('reason', event)}")
        seconds = float(event.get("timings", {}).get("import", 0.0))
        template = Template(key, proc, control, seconds)
        self._spawn_task(self._follow_template(template))
        self.templates[key] = template
        self._templates_by_code[(await self._code_digest(spec), spec.handler)] = key
        log.info("template ready", function=f"{spec.tenant}/{spec.name}", pid=proc.pid,
                 import_s=round(seconds, 3))
        return template

    async def _follow_template(self, template: Template) -> None:
        """Exit statuses of the template's instances arrive on its status pipe."""
        while True:
            line = await template.process.events.readline()
            if not line:
                return
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "child_exited":
                pid, code = int(event["pid"]), int(event["returncode"])
                self._exit_codes[pid] = code
                waiter = self._exit_waiters.pop(pid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(code)

    async def _exit_code(self, inst: Instance) -> int | None:
        """How the instance's process ended, if its parent can tell us."""
        if inst.process is not None:
            return await inst.process.proc.wait()
        code = self._exit_codes.pop(inst.pid, None)
        if code is not None:
            return code
        waiter = self._exit_waiters.setdefault(
            inst.pid, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(waiter, EXIT_STATUS_WAIT_SECONDS)
        except TimeoutError:
            return None
        finally:
            self._exit_waiters.pop(inst.pid, None)
            self._exit_codes.pop(inst.pid, None)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def prepare_template(self, spec: agent_pb2.FunctionSpec,
                               manifest: manifest_pb2.SnapshotManifest) -> float:
        started = time.perf_counter()
        await self.chunks.ensure(manifest, [])
        async with self.shm.reading():
            mat = await asyncio.to_thread(self.snapshots.materialize, manifest)
            await self.ensure_template(spec, manifest, mat)
        return time.perf_counter() - started

    # ---- instances -------------------------------------------------------------------

    def _new_instance(self, instance_id: str, spec: agent_pb2.FunctionSpec,
                      state: InstanceState) -> Instance:
        if instance_id in self.instances:
            raise InstanceFailed(f"instance {instance_id} already exists")
        inst = Instance(
            id=instance_id, function=f"{spec.tenant}/{spec.name}", version=spec.version,
            socket=str(self.run_dir / f"{instance_id}.sock"),
            max_concurrency=max(1, spec.max_concurrency), timeout=spec.timeout_seconds or 300.0,
            state=state, log_path=str(self.home / "logs" / f"{instance_id}.log"))
        inst.slots = asyncio.Semaphore(inst.max_concurrency)
        self.instances[instance_id] = inst
        self.logs.watch(inst.id, inst.function, inst.log_path)
        self.logs.append(inst.function, inst.id, RUNTIME,
                         f"instance {inst.id} {state.value} (version {spec.version})")
        return inst

    async def start_instance(self, req: agent_pb2.StartInstanceRequest
                             ) -> agent_pb2.StartInstanceResponse:
        if self.draining:
            raise InstanceFailed(f"node {self.node_id} is draining")
        spec = req.function
        restore = req.kind == agent_pb2.START_RESTORE
        inst = self._new_instance(req.instance_id, spec,
                                  InstanceState.RESTORING if restore else InstanceState.STARTING)
        try:
            if spec.gpu_memory_bytes:
                sl = self.devices.allocate(spec.gpu_memory_bytes, inst.id)
                inst.slice_id, inst.slice_device, inst.slice_bytes = sl.id, sl.device_id, sl.size
            if restore:
                timings = await self._restore(inst, spec, req.manifest, list(req.peers))
            else:
                timings = await self._start_fresh(inst, spec)
        except BaseException as exc:
            await self._discard(inst, f"start failed: {exc}")
            # A missing image says nothing about the snapshot: the scheduler tries
            # another docker node rather than quarantining it.
            if (restore and isinstance(exc, ThawError)
                    and not isinstance(exc, (SnapshotError, ChunkNotFound, ImageNotOnNode))):
                raise SnapshotError(f"restore failed: {exc}") from exc
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
            instance_id=inst.id, kind=req.kind, pid=inst.pid,
            timings=[agent_pb2.Timing(stage=k, seconds=v) for k, v in timings])

    async def _start_fresh(self, inst: Instance, spec: agent_pb2.FunctionSpec
                           ) -> list[tuple[str, float]]:
        bundle = await self.ensure_bundle(spec.bundle_digest)
        proc = await self.runtime.launch(
            "fresh", ["--bundle", str(bundle), "--handler", spec.handler,
                      "--socket", inst.socket], inst.log_path, cwd=str(bundle),
            env=instance_env(spec), instance_id=inst.id,
            memory_limit_bytes=spec.memory_limit_bytes, **self._image_option(spec))
        inst.pid = proc.pid
        inst.process = proc
        event = await proc.next_event(self.start_timeout)
        if event.get("event") != "ready":
            await proc.kill()
            inst.move(InstanceState.SETUP_FAILED)
            raise InstanceFailed(
                f"{event.get('stage', 'start')} failed: {event.get('reason', 'unknown')}")
        t = event.get("timings", {})
        return [("import", float(t.get("import", 0.0))), ("setup", float(t.get("setup", 0.0)))]

    async def _restore(self, inst: Instance, spec: agent_pb2.FunctionSpec,
                       manifest: manifest_pb2.SnapshotManifest,
                       peers: list[str]) -> list[tuple[str, float]]:
        if manifest.fingerprint.function_version not in ("", spec.version):
            raise FingerprintMismatch(
                f"snapshot is of version {manifest.fingerprint.function_version}, "
                f"not {spec.version}", field="fingerprint.function_version")
        check_fingerprint(manifest, image_fingerprint(self.fingerprint, spec, manifest))
        await self.chunks.ensure(manifest, peers)
        # The files must still be there when the child maps them: no eviction or
        # garbage collection deletes tmpfs files between materializing and mapping.
        async with self.shm.reading():
            mat = await asyncio.to_thread(self.snapshots.materialize, manifest)
            started = time.perf_counter()
            template = await self.ensure_template(spec, manifest, mat)
            template_s = time.perf_counter() - started
            started = time.perf_counter()
            pid, event = await self.runtime.spawn(template.control, {
                "instance_id": inst.id, "socket": inst.socket, "pickle": mat.pickle,
                "host_arena": mat.host_arena, "device_arena": mat.device_arena,
                "snapshot_json": mat.snapshot_json, "log": inst.log_path,
            }, self.start_timeout)
        inst.pid = pid
        return [("fetch", mat.seconds), ("template", template_s),
                ("restore", time.perf_counter() - started)]

    def _watch(self, inst: Instance) -> None:
        async def watch() -> None:
            watcher = ProcessWatch(inst.pid)
            try:
                await watcher.done.wait()
            finally:
                watcher.close()
            if inst.state is not InstanceState.DEFUNCT:
                code = await self._exit_code(inst)
                how = f" ({describe_exit(code)})" if code is not None else ""
                tail = log_tail(inst.log_path, 5)
                reason = f"the instance process exited{how}" + (
                    f"; its last output:\n{tail}" if tail else "")
                await self.fail_instance(inst, reason)

        self._spawn_task(watch())

    async def _discard(self, inst: Instance, reason: str) -> None:
        if inst.state is not InstanceState.DEFUNCT:
            if inst.state is InstanceState.READY:
                inst.move(InstanceState.DRAINING)
            inst.state = InstanceState.DEFUNCT
        inst.exit_reason = inst.exit_reason or reason
        inst.exited.set()
        if inst.pid:
            await terminate(inst.pid)
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
        self.logs.unwatch(inst.id)
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

    async def prewarm(self, manifest: manifest_pb2.SnapshotManifest,
                      peers: list[str]) -> tuple[int, float]:
        """Move a snapshot's chunks into the pinned tier (no GPU memory is used)."""
        started = time.perf_counter()
        await self.chunks.ensure(manifest, peers)
        nbytes = await asyncio.to_thread(self.snapshots.prewarm, manifest)
        return nbytes, time.perf_counter() - started

    async def evict(self, manifest: manifest_pb2.SnapshotManifest) -> int:
        async with self.shm.writing():
            return await asyncio.to_thread(self.snapshots.evict, manifest)

    async def collect_garbage(self, keep: list[manifest_pb2.SnapshotManifest]) -> tuple[int, int]:
        """Forget every snapshot not in `keep`: its template, host-memory copies and
        the disk chunks no kept manifest shares."""
        keys = {manifest_key(m) for m in keep}
        for key in [k for k in self.templates
                    if not self._template_users.get(k, set()) & keys]:
            template = self.templates.pop(key)
            self._template_users.pop(key, None)
            await template.process.kill()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(template.control)
        async with self.shm.writing():
            return await asyncio.to_thread(self.snapshots.collect_garbage, keep)

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
        for template in self.templates.values():
            await template.process.kill()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(template.control)
        self.templates.clear()
        self.devices.close()
        await self.chunks.close()
        await self.runtime.close()

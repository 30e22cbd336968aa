"""A node's bundles and snapshot builds: bundles unpacked once per digest, and builds
that run a function's setup() (forked from a template of the same code, or fresh)
and store what it captured as chunks. The agent holds one `Builds` and its
`ensure_bundle`/`build_snapshot` delegate here."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from thaw.core.bundle import limits_for
from thaw.core.errors import ThawError
from thaw.core.logs import bound_reason
from thaw.core.spec import extract_bundle
from thaw.platform.build_failures import build_failed, event_text
from thaw.platform.build_steps import NodeBuildSteps, StepLines
from thaw.platform.environments_launch import LaunchEnvironments, recorded
from thaw.platform.launch import (
    IMAGE_NEEDS_DOCKER,
    build_spec,
    check_image,
    in_area,
    template_build_request,
)
from thaw.platform.logs import MAX_BUILD_LOG_BYTES, RUNTIME, FunctionLogs
from thaw.platform.runtime import Captured, LaunchSpec, PythonEnv, Runtime
from thaw.platform.sandbox.areas import (
    TenantAreas,
    make_readable,
    remove_quietly,
    seal_output,
)
from thaw.platform.snapshots import NodeSnapshots
from thaw.platform.templates import TemplatePool
from thaw.platform.volumes import NodeVolumes, with_volumes
from thaw.proto import agent_pb2

log = structlog.get_logger()
# Where a build's output is moved (out of its tenant's reach) before it is read.
SEALED_BUILDS = ".sealed"


class Builds:
    """Bundles under <home>/bundles/<digest>, builds under <home>/builds (garbage
    collection: platform/gc.py)."""

    def __init__(self, *, home: Path, runtime: Runtime, areas: TenantAreas,
                 snapshots: NodeSnapshots, logs: FunctionLogs,
                 fetch_bundle: Callable[[str], Awaitable[bytes]],
                 start_timeout: float, environments: LaunchEnvironments) -> None:
        self.home = home
        self.runtime = runtime
        self.areas = areas
        self.snapshots = snapshots
        self.logs = logs
        self.fetch_bundle = fetch_bundle
        self.start_timeout = start_timeout
        self.environments = environments
        """The function's own Python environment, where its bundle asks for one."""
        self.volumes: NodeVolumes | None = None
        """Model volumes (volumes.py) a build mounts, set with the agent's."""
        self.templates: TemplatePool | None = None
        """The agent's templates (a build of running code forks one); set by the agent,
        whose pool itself unpacks bundles through `ensure_bundle`."""
        self.steps = NodeBuildSteps()
        """Each running build's current step (its heartbeats carry them)."""

    async def ensure_bundle(self, digest: str, data: bytes | None = None) -> Path:
        target = self.home / "bundles" / digest
        if target.exists():
            return target
        if data is None:
            data = await self.fetch_bundle(digest)
        staging = self.home / "bundles" / f".{digest}-{uuid.uuid4().hex[:8]}"
        # The scheduler read it under its tenant's limits: unpacked under the same.
        await asyncio.to_thread(extract_bundle, data, str(staging), limits_for(len(data)))
        # Instances read it under their tenants' uids (same digest, same files).
        await asyncio.to_thread(make_readable, staging)
        try:
            os.replace(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another start won the race
        return target

    async def build_snapshot(self, req: agent_pb2.BuildSnapshotRequest
                             ) -> agent_pb2.BuildSnapshotResponse:
        spec = req.function
        key = (spec.tenant, spec.name, spec.version)
        self.steps.set(key, "unpacking the bundle")
        try:
            return await self._build_snapshot(req)
        finally:
            self.steps.end(key)

    async def _build_snapshot(self, req: agent_pb2.BuildSnapshotRequest
                              ) -> agent_pb2.BuildSnapshotResponse:
        spec = req.function
        name = f"{spec.tenant}/{spec.name}"
        step = self.steps.reporter((spec.tenant, spec.name, spec.version))
        bundle = await self.ensure_bundle(spec.bundle_digest, req.bundle or None)
        if spec.image and not self.runtime.capabilities.runs_images:
            return agent_pb2.BuildSnapshotResponse(ok=False, stage="runtime",
                                                   reason=IMAGE_NEEDS_DOCKER)
        build_id = f"{spec.tenant}-{spec.name}-{spec.version}-{uuid.uuid4().hex[:6]}"
        area = await asyncio.to_thread(self.areas.area, spec.tenant)
        out = area.builds / build_id
        out.mkdir()
        if self.areas.owned:
            os.chown(out, area.uid, area.gid)
        sealed = self.home / "builds" / SEALED_BUILDS / build_id
        log_path = str(area.logs / f"build-{spec.tenant}-{spec.name}-{spec.version}.log")
        # A second build of this version (a rollback, a corrupt snapshot rebuilt) starts
        # a new log: the last one may belong to another uid than this build writes as.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_path)
        # The build's output joins the function's logs, at most MAX_BUILD_LOG_BYTES.
        self.logs.watch(build_id, name, log_path, max_bytes=MAX_BUILD_LOG_BYTES)
        try:
            # The resolve and install steps join the function's logs, and each is
            # the build's current step.
            progress = StepLines(
                functools.partial(self.logs.append, name, build_id, RUNTIME), step)
            step("preparing the environment")
            try:
                env = await self.environments.for_bundle(bundle, name, progress, spec.image)
                python_env = self.environments.python_env(env)
            except ThawError as exc:
                return build_failed("environment", exc)
            self.environments.hold(build_id, env)
            # A template's sandbox has no volumes: a function with some builds fresh.
            template = (await self.templates.with_code(spec, env.key if env else "")
                        if self.templates is not None and not spec.volumes else None)
            event: dict[str, Any] | None = None
            step("running setup() and capturing its state")
            if template is not None:
                # Same code as a running template: fork it, skip the imports (where
                # the runtime builds in templates at all).
                try:
                    event = await self.runtime.build_in_template(
                        template.control,
                        template_build_request(spec, out=str(out), log=log_path),
                        self.start_timeout)
                except (ThawError, ValueError) as exc:  # ValueError: a line past the limit
                    return build_failed("setup", exc)
            if event is None:
                event = await self._build_fresh(spec, bundle, out, log_path, python_env)
            if event.get("event") != Captured.event:
                return build_failed(event_text(event.get("stage"), "setup"),
                                    event_text(event.get("reason"), "unknown"),
                                    event_text(event.get("attribute_path"), ""),
                                    event.get("input_schema"))
            step("storing the snapshot")
            try:
                # Out of the tenant's reach and checked before the agent reads it.
                await asyncio.to_thread(seal_output, out, sealed.parent)
                manifest, stored = await asyncio.to_thread(
                    self.snapshots.store_capture, sealed, function=name,
                    version=spec.version,
                    progress=lambda done, total: step("storing the snapshot",
                                                      done / total if total else None))
            except (OSError, ThawError) as exc:
                return build_failed("store", exc)
            if env is not None:
                # A restore on any node rebuilds this very environment from its lock.
                manifest.environment.CopyFrom(recorded(env))
            log.info("snapshot built", function=name, version=spec.version,
                     host_bytes=manifest.host.size, stored_bytes=stored,
                     setup_s=round(manifest.setup_seconds, 3))
            return agent_pb2.BuildSnapshotResponse(ok=True, manifest=manifest,
                                                   stored_bytes=stored)
        finally:
            self.environments.release(build_id)
            if self.volumes is not None:
                self.volumes.release(build_id)
            await self.logs.unwatch_in_thread(build_id)
            await asyncio.to_thread(remove_quietly, out)
            await asyncio.to_thread(remove_quietly, sealed)

    async def _build_fresh(self, spec: agent_pb2.FunctionSpec, bundle: Path, out: Path,
                           log_path: str, python_env: PythonEnv | None = None
                           ) -> dict[str, Any]:
        check_image(spec, self.runtime.capabilities)
        launch = build_spec(spec, bundle, out=out, log_path=log_path)
        launch = await with_volumes(self.volumes, launch, spec, self.runtime.capabilities)
        proc = await self.runtime.launch(self._as_tenant(
            dataclasses.replace(launch, python_env=python_env), spec))
        try:
            return await proc.next_event(self.start_timeout)
        except (ThawError, ValueError) as exc:
            # ValueError: a status line past the reader's limit, or not JSON. The build
            # may still be writing: killed, so that waiting for it cannot hang.
            await proc.kill()
            return {"event": "failed", "stage": "setup", "reason": bound_reason(exc)}
        finally:
            await proc.proc.wait()

    def _as_tenant(self, launch: LaunchSpec, spec: agent_pb2.FunctionSpec) -> LaunchSpec:
        """The launch under its tenant's uid, its area writable (where the runtime
        runs instances under tenant uids)."""
        return in_area(launch, self.areas.area(spec.tenant), self.runtime.capabilities)

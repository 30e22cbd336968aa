"""Templates: zygotes that imported a snapshot's modules, shared by every function
with the same code; restores (and builds, where the runtime allows) fork from them.
A template's status stream also carries the exit codes of the instances it forked."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from thaw.core.errors import InstanceFailed
from thaw.platform.launch import code_digest, instance_env, template_spec
from thaw.platform.runtime import Exited, LaunchedInstance, Runtime, TemplateReady, exit_event
from thaw.platform.snapshots import Materialized
from thaw.proto import agent_pb2, manifest_pb2

log = structlog.get_logger()
# After an instance's process ends, how long to wait for its template to report the
# exit status (it reaps the child and writes a line on its status pipe).
EXIT_STATUS_WAIT_SECONDS = 0.5


@dataclass
class Template:
    """A zygote that imported a snapshot's modules; restores fork from it."""

    key: str
    process: LaunchedInstance
    control: str
    import_seconds: float

    @property
    def running(self) -> bool:
        return self.process.proc.returncode is None


class TemplatePool:
    """The node's templates, keyed by code (and, where the runtime needs it, tenant)."""

    def __init__(self, *, runtime: Runtime, run_dir: Path, log_dir: Path,
                 start_timeout: float, ensure_bundle: Callable[[str], Awaitable[Path]],
                 spawn_task: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.runtime = runtime
        self.run_dir = run_dir
        self.log_dir = log_dir
        self.start_timeout = start_timeout
        self._ensure_bundle = ensure_bundle
        self._spawn_task = spawn_task
        self.templates: dict[str, Template] = {}
        self._starts: dict[str, asyncio.Task[Template]] = {}
        self._users: dict[str, set[str]] = {}
        """Template key -> the snapshots (manifest keys) restored from it."""
        self._by_code: dict[tuple[str, str], str] = {}
        self._code_digests: dict[str, str] = {}
        self._exit_codes: dict[int, int] = {}
        self._exit_waiters: dict[int, asyncio.Future[int]] = {}

    async def code_digest(self, spec: agent_pb2.FunctionSpec) -> str:
        """The bundle's code digest; for an image function, of the code and the image
        (the same code in another image imports other packages: no shared template)."""
        known = self._code_digests.get(spec.bundle_digest)
        if known is not None:
            return known
        bundle = await self._ensure_bundle(spec.bundle_digest)
        code = await asyncio.to_thread(code_digest, bundle)
        if spec.image:
            code = hashlib.sha256(f"{code}\nimage:{spec.image}".encode()).hexdigest()
        self._code_digests[spec.bundle_digest] = code
        return code

    async def with_code(self, spec: agent_pb2.FunctionSpec) -> Template | None:
        """A running template that imported exactly this bundle's code and handler."""
        code = await self.code_digest(spec)
        key = self._by_code.get((code, spec.handler))
        template = self.templates.get(key) if key else None
        if template is None or not template.running:
            return None
        return template

    async def key(self, spec: agent_pb2.FunctionSpec,
                  manifest: manifest_pb2.SnapshotManifest) -> str:
        """Templates are per environment, not per function: bundles with the same code
        (thaw.toml aside) and the same imported modules share one template, so many
        copies of a model cost one set of imports in memory."""
        code = await self.code_digest(spec)
        h = hashlib.sha256(f"{code}\n{spec.handler}\n".encode())
        if self.runtime.capabilities.template_per_tenant:
            # A template's sandbox holds the instances it forks: one per tenant, so
            # a sandbox never holds two tenants' instances.
            h.update(f"tenant:{spec.tenant}\n".encode())
        h.update("\n".join(manifest.modules).encode())
        h.update(json.dumps(instance_env(spec, per_function=False), sort_keys=True).encode())
        return h.hexdigest()[:24]

    async def ensure(self, spec: agent_pb2.FunctionSpec,
                     manifest: manifest_pb2.SnapshotManifest, mat: Materialized) -> Template:
        key = await self.key(spec, manifest)
        self._users.setdefault(key, set()).add(mat.key)
        template = self.templates.get(key)
        if template is not None and template.running:
            return template
        task = self._starts.get(key)
        if task is None:
            task = asyncio.create_task(self._start(key, spec, mat))
            self._starts[key] = task
            task.add_done_callback(lambda _t: self._starts.pop(key, None))
        return await asyncio.shield(task)

    async def _start(self, key: str, spec: agent_pb2.FunctionSpec,
                     mat: Materialized) -> Template:
        bundle = await self._ensure_bundle(spec.bundle_digest)
        control = str(self.run_dir / f"t-{key[:16]}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        log_path = str(self.log_dir / f"template-{spec.tenant}-{spec.name}.log")
        proc = await self.runtime.launch(template_spec(
            spec, bundle, key=key, snapshot_json=mat.snapshot_json, control=control,
            log_path=log_path))
        event = await proc.next_event(self.start_timeout)
        if event.get("event") != TemplateReady.event:
            await proc.kill()
            raise InstanceFailed(f"template failed: {event.get('reason', event)}")
        seconds = float(event.get("timings", {}).get("import", 0.0))
        template = Template(key, proc, control, seconds)
        self._spawn_task(self._follow(template))
        self.templates[key] = template
        self._by_code[(await self.code_digest(spec), spec.handler)] = key
        log.info("template ready", function=f"{spec.tenant}/{spec.name}", pid=proc.pid,
                 import_s=round(seconds, 3))
        return template

    async def _follow(self, template: Template) -> None:
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

    async def exited(self, pid: int) -> Exited | None:
        """How a forked instance's process ended, if its template tells in time."""
        code = await self._exit_code(pid)
        return exit_event(code) if code is not None else None

    async def _exit_code(self, pid: int) -> int | None:
        code = self._exit_codes.pop(pid, None)
        if code is not None:
            return code
        waiter = self._exit_waiters.setdefault(
            pid, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(waiter, EXIT_STATUS_WAIT_SECONDS)
        except TimeoutError:
            return None
        finally:
            self._exit_waiters.pop(pid, None)
            self._exit_codes.pop(pid, None)

    async def collect(self, keep: set[str]) -> None:
        """Stop every template none of the snapshots in `keep` (manifest keys) uses."""
        for key in [k for k in self.templates if not self._users.get(k, set()) & keep]:
            template = self.templates.pop(key)
            self._users.pop(key, None)
            await self._stop(template)

    async def close(self) -> None:
        for template in self.templates.values():
            await self._stop(template)
        self.templates.clear()

    @staticmethod
    async def _stop(template: Template) -> None:
        await template.process.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(template.control)

"""Templates: zygotes that imported a snapshot's modules, shared by every function
with the same code; restores (and builds, where the runtime allows) fork from them.
A template's status stream also carries the exit codes of the instances it forked.

A template whose imports initialised CUDA cannot fork (a CUDA context does not survive
fork). The pool stops it as soon as it says so (it would fork nothing, and a context it
holds takes device memory no slice accounts for) and keeps its verdict: `ensure` then
answers with a `Template` whose `fork_safe` is False, and the agent starts that
snapshot's instances as fresh interpreters that import and then restore. Never a
quarantine: the snapshot is fine, only forking is not.

With zygotes (zygotes.py), a template is forked from its environment's zygote, which
holds the environment's imports once; without one, or where that fails, it is launched.
Idle templates are stopped least recently used when they hold too much memory
(template_eviction.py); the next restore starts one again."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from thaw.core.errors import DeadlineExceeded, InstanceFailed
from thaw.platform.launch import code_digest, in_area, instance_env, template_spec
from thaw.platform.runtime import (
    Exited,
    LaunchedInstance,
    LaunchSpec,
    PythonEnv,
    Runtime,
    TemplateReady,
    exit_event,
    parse_status,
)
from thaw.platform.sandbox.areas import TenantArea, TenantAreas
from thaw.platform.snapshots import Materialized
from thaw.platform.template_eviction import (
    EvictionPolicy,
    TemplateMemory,
    TemplateUse,
    available_memory,
    choose_evictions,
    template_memory,
)
from thaw.platform.zygotes import ForkedTemplate, ZygotePool, import_env_set
from thaw.proto import agent_pb2, manifest_pb2
from thaw.snapshotter.runtime.zygote import IMPORT_ENV_MARK

log = structlog.get_logger()
# After an instance's process ends, how long to wait for its template to report the
# exit status (it reaps the child and writes a line on its status pipe).
EXIT_STATUS_WAIT_SECONDS = 0.5
# How often idle templates are checked against the memory budget and the node's
# available memory (besides after each template start).
EVICTION_INTERVAL_SECONDS = 10.0


@dataclass
class Template:
    """A zygote that imported a snapshot's modules; restores fork from it."""

    key: str
    process: LaunchedInstance
    control: str
    import_seconds: float
    fork_safe: bool = True
    """False when the template's imports initialised CUDA (a context does not survive
    fork): its instances then start as fresh interpreters in restore mode."""
    unsafe_reason: str = ""
    """Why it is not fork-safe, e.g. "torch initialised CUDA at import (module x)"."""
    env_key: str = ""
    """The function's own Python environment it runs in ("" : the node's)."""
    zygote: str = ""
    """The zygote it was forked from ("": launched on its own)."""

    @property
    def running(self) -> bool:
        return self.process.proc.returncode is None


class TemplatePool:
    """The node's templates, keyed by code (and, where the runtime needs it, tenant)."""

    def __init__(self, *, runtime: Runtime, areas: TenantAreas,
                 start_timeout: float, ensure_bundle: Callable[[str], Awaitable[Path]],
                 spawn_task: Callable[[Coroutine[Any, Any, None]], None],
                 zygotes: ZygotePool | None = None,
                 eviction: EvictionPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 measure: Callable[[int], TemplateMemory] = template_memory,
                 available: Callable[[], int] = available_memory) -> None:
        self.runtime = runtime
        self.areas = areas
        """Each template's control socket and log are in its tenant's area."""
        self.start_timeout = start_timeout
        self._ensure_bundle = ensure_bundle
        self._spawn_task = spawn_task
        self.templates: dict[str, Template] = {}
        self._starts: dict[str, asyncio.Task[Template]] = {}
        self._users: dict[str, set[str]] = {}
        """Template key -> the snapshots (manifest keys) restored from it."""
        self._by_code: dict[tuple[str, ...], str] = {}
        """(code, handler[, tenant, network]) -> the running template of that code, for
        builds (`with_code`): where templates are per tenant, only the tenant's own."""
        self._code_digests: dict[str, str] = {}
        self._exit_codes: dict[int, int] = {}
        self._exit_waiters: dict[int, asyncio.Future[int]] = {}
        self.fork_unsafe: dict[str, Template] = {}
        """Template key -> a template that was not fork-safe (stopped; its verdict
        stays until none of its snapshots is kept)."""
        self._unsafe_told: set[str] = set()
        """Snapshots (manifest keys) whose fork-unsafe template was already logged."""
        self.zygotes = zygotes
        self._import_env: dict[str, dict[str, str]] = {}
        """Template key -> what its function's code sets in the environment as it is
        imported (its zygote imports with those set)."""
        self._import_env_seen: dict[str, dict[str, str]] = {}
        """Zygote key without import variables -> what the last function of that
        confinement set as it was imported (the first guess for the next one)."""
        """Where templates fork from (None: every template is launched)."""
        self.eviction = eviction or EvictionPolicy()
        self._clock = clock
        self._measure = measure
        self._available = available
        self._last_used: dict[str, float] = {}
        """Template key -> when a restore or build last asked for it."""
        self._eviction_loop = False
        self.evicted: list[str] = []
        """Keys of the templates stopped for memory, oldest first (for tests, logs)."""

    def configure(self, *, eviction: EvictionPolicy, zygotes_home: Path | None) -> None:
        """The agent's settings: when to stop idle templates, and whether templates fork
        from zygotes (`zygotes_home`: the agent's home, where zygotes' bundle views
        live; None: no zygotes)."""
        self.eviction = eviction
        self.zygotes = None if zygotes_home is None else ZygotePool(
            runtime=self.runtime, home=zygotes_home, start_timeout=self.start_timeout,
            spawn_task=self._spawn_task)

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

    async def with_code(self, spec: agent_pb2.FunctionSpec, env_key: str = ""
                        ) -> Template | None:
        """A running template that imported exactly this bundle's code and handler, in
        the Python environment `env_key` ("": the node's)."""
        key = self._by_code.get(await self._code_key(spec, env_key))
        template = self.templates.get(key) if key else None
        if template is None or not template.running:
            return None
        return template

    async def _code_key(self, spec: agent_pb2.FunctionSpec, env_key: str
                        ) -> tuple[str, ...]:
        code = await self.code_digest(spec)
        if self.runtime.capabilities.template_per_tenant:
            # A template's sandbox is its tenant's: another tenant's build never forks it.
            return (code, spec.handler, env_key, spec.tenant, spec.network or "none")
        return (code, spec.handler, env_key)

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
        if spec.network == "egress":
            # The template's network namespace is its forks': one per network.
            h.update(b"network:egress\n")
        if manifest.environment.key:
            # The interpreter and packages it imported are the environment's.
            h.update(f"environment:{manifest.environment.key}\n".encode())
        # As a set: copies built fresh and copies built in a template of the same
        # code list the same modules, maybe in another order.
        h.update("\n".join(sorted(set(manifest.modules))).encode())
        h.update(json.dumps(instance_env(spec, per_function=False), sort_keys=True).encode())
        return h.hexdigest()[:24]

    async def ensure(self, spec: agent_pb2.FunctionSpec,
                     manifest: manifest_pb2.SnapshotManifest, mat: Materialized,
                     python_env: PythonEnv | None = None) -> Template:
        """The template for this snapshot, started if need be: a running one, or,
        where its imports initialised CUDA, the stopped record of one whose
        `fork_safe` is False (never spawn from it: start a restore-mode instance)."""
        key = await self.key(spec, manifest)
        self._users.setdefault(key, set()).add(mat.key)
        self._last_used[key] = self._clock()
        template = self.fork_unsafe.get(key) or self.templates.get(key)
        if template is None or (template.fork_safe and not template.running):
            task = self._starts.get(key)
            started = task is None
            if task is None:
                task = asyncio.create_task(self._start(key, spec, manifest, mat, python_env))
                self._starts[key] = task
                task.add_done_callback(lambda _t: self._starts.pop(key, None))
            template = await asyncio.shield(task)
            self._last_used[key] = self._clock()
            if started and self.eviction.active:
                await self.evict(keep={key})
                self._watch_memory()
        if not template.fork_safe and mat.key not in self._unsafe_told:
            self._unsafe_told.add(mat.key)
            log.warning("template not fork-safe: instances start as fresh interpreters",
                        function=f"{spec.tenant}/{spec.name}", snapshot=mat.key,
                        reason=template.unsafe_reason)
        return template

    async def _start(self, key: str, spec: agent_pb2.FunctionSpec,
                     manifest: manifest_pb2.SnapshotManifest, mat: Materialized,
                     python_env: PythonEnv | None) -> Template:
        bundle = await self._ensure_bundle(spec.bundle_digest)
        area = await asyncio.to_thread(self.areas.area, spec.tenant)
        control = str(area.run / f"t-{key[:16]}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        log_path = str(area.logs / f"template-{spec.tenant}-{spec.name}.log")
        launch = in_area(dataclasses.replace(
            template_spec(spec, bundle, key=key, snapshot_json=mat.snapshot_json,
                          control=control, log_path=log_path),
            python_env=python_env), area, self.runtime.capabilities)
        forked = await self._fork_from_zygote(key, launch, area, manifest)
        proc: LaunchedInstance
        zygote = ""
        if forked is not None:
            proc, ready = forked
            zygote = forked[0].zygote
        else:
            proc = await self.runtime.launch(launch)
            ready = await self._ready(proc)
        seconds = float(ready.timings.get("import", 0.0))
        env_key = python_env.key if python_env is not None else ""
        template = Template(key, proc, control, seconds, fork_safe=ready.fork_safe,
                            unsafe_reason=ready.unsafe_reason, env_key=env_key,
                            zygote=zygote)
        if not template.fork_safe:
            await self._stop(template)
            self.fork_unsafe[key] = template
            return template
        self._spawn_task(self._follow(template))
        self.templates[key] = template
        self._by_code[await self._code_key(spec, env_key)] = key
        log.info("template ready", function=f"{spec.tenant}/{spec.name}", pid=proc.pid,
                 import_s=round(seconds, 3), zygote=template.zygote or None)
        return template

    async def _ready(self, proc: LaunchedInstance) -> TemplateReady:
        event = await proc.next_event(self.start_timeout)
        ready = parse_status(event)
        if not isinstance(ready, TemplateReady):
            await proc.kill()
            raise InstanceFailed(f"template failed: {event.get('reason', event)}")
        return ready

    async def _fork_from_zygote(self, key: str, launch: LaunchSpec, area: TenantArea,
                                manifest: manifest_pb2.SnapshotManifest
                                ) -> tuple[ForkedTemplate, TemplateReady] | None:
        """A template forked from its environment's zygote, ready; None where there is
        none or the forked one did not come up (the caller launches it: a template
        that fails for a reason of its own fails there too, with its own error).

        A function whose code sets environment variables as it is imported gets its
        template from a zygote that imported with those set, as a launched template,
        which imports the function's module first, would have. The forked template
        checks that its import set exactly what its zygote's imports ran with and
        otherwise says what it set (zygote.py IMPORT_ENV_MARK); the first try is
        what this template's function set before, else what the last function of the
        same confinement set (functions of one environment tend to set the same)."""
        if self.zygotes is None:
            return None
        confinement = self.zygotes.key(launch)
        import_env = self._import_env.get(key, self._import_env_seen.get(confinement, {}))
        for _try in range(2):
            proc = await self.zygotes.fork_template(launch, area, list(manifest.modules),
                                                    import_env)
            if proc is None:
                return None
            try:
                ready = await self._ready(proc)
            except (InstanceFailed, DeadlineExceeded) as exc:
                with contextlib.suppress(InstanceFailed):
                    await proc.kill()
                learned = import_env_set(str(exc))
                if learned is None or learned == import_env:
                    log.warning("template forked from a zygote failed: launching it "
                                "instead", zygote=proc.zygote,
                                error="the function removed environment variables as it "
                                      "was imported" if IMPORT_ENV_MARK in str(exc)
                                else str(exc))
                    return None
                # Names only: the values are the function's, never for the node's log.
                log.info("the function's import sets environment variables: its template "
                         "forks from a zygote that imported with them",
                         zygote=proc.zygote, variables=sorted(learned))
                import_env = learned
                continue
            self._import_env[key] = import_env
            self._import_env_seen[confinement] = import_env
            if _try:
                await self.zygotes.prune()  # the zygote tried first may be left unused
            return proc, ready
        return None

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
            self._last_used.pop(key, None)
            await self._stop(template)
        if self.zygotes is not None:
            await self.zygotes.prune()
        for key in [k for k in self.fork_unsafe if not self._users.get(k, set()) & keep]:
            del self.fork_unsafe[key]
            self._users.pop(key, None)
        self._unsafe_told &= keep

    def memory_low(self) -> bool:
        """Whether idle processes should stop now rather than linger: the templates
        have a memory budget (a restored template that lingers keeps its template from
        being idle for it), or the node's available memory is under the floor."""
        floor = self.eviction.min_available_bytes
        return self.eviction.budget_bytes > 0 or (bool(floor) and self._available() < floor)

    async def evict(self, keep: Collection[str] = ()) -> list[str]:
        """Stop idle templates, least recently used first, while the templates hold
        more memory than the budget or the node has less available than its floor;
        returns their keys. Never one in `keep` (one just asked for)."""
        running = [(k, t) for k, t in self.templates.items()
                   if t.running and t.fork_safe and k not in self._starts]
        if not running or not self.eviction.active:
            return []
        available = await asyncio.to_thread(self._available)
        if not self.eviction.budget_bytes and available >= self.eviction.min_available_bytes:
            return []  # nothing to decide: no need to read every template's pages
        measured = await asyncio.to_thread(
            lambda: [(k, self._measure(t.process.pid)) for k, t in running])
        uses = [TemplateUse(k, self._last_used.get(k, 0.0), m.idle and k not in keep,
                            m.unique_bytes) for k, m in measured]
        now = self._clock()
        chosen = choose_evictions(uses, self.eviction, available, now)
        memory = {use.key: use.memory_bytes for use in uses}
        for key, reason in chosen:
            template = self.templates.pop(key, None)
            if template is None:
                continue
            for code_key in [c for c, k in self._by_code.items() if k == key]:
                del self._by_code[code_key]
            await self._stop(template)
            self.evicted.append(key)
            log.info("template evicted", template=key, reason=reason,
                     memory_mb=round(memory[key] / (1 << 20), 1),
                     idle_s=round(now - self._last_used.get(key, now), 1),
                     zygote=template.zygote or None)
        if chosen and self.zygotes is not None:
            await self.zygotes.prune()
        return [key for key, _ in chosen]

    def _watch_memory(self) -> None:
        """Check the templates' memory every EVICTION_INTERVAL_SECONDS from now on."""
        if self._eviction_loop:
            return
        self._eviction_loop = True

        async def watch() -> None:
            while True:
                await asyncio.sleep(EVICTION_INTERVAL_SECONDS)
                try:
                    await self.evict()
                except Exception:  # a failed check must not end the watch
                    log.exception("template eviction check failed")

        self._spawn_task(watch())

    def environment_keys(self) -> set[str]:
        """The Python environments running templates (and their zygotes) use."""
        zygotes = self.zygotes.environment_keys() if self.zygotes is not None else set()
        return {t.env_key for t in self.templates.values() if t.env_key} | zygotes

    async def close(self) -> None:
        for template in self.templates.values():
            await self._stop(template)
        self.templates.clear()
        self.fork_unsafe.clear()
        if self.zygotes is not None:
            await self.zygotes.close()

    @staticmethod
    async def _stop(template: Template) -> None:
        await template.process.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(template.control)

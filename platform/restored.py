"""Restored templates on a node: per snapshot, a process forked from the function's
template that restored the snapshot's host state once and forks its warm instances
(snapshotter/runtime/restored_template.py), so each extra instance costs only the pages
it writes.

One is started by the first restore of a snapshot that has none, and that very instance
is its first fork: every instance of the snapshot, the first included, then shares one
copy of the restored state. (Restoring the first instance the usual way and starting
the restored template beside it would hold that state twice as long as the first
instance lives, and a snapshot that only ever has one instance pays for it most.)
Later restores of the snapshot fork from it and restore nothing. It outlives the
snapshot's last instance on the node by `linger` seconds (the agent's
`restored_template_idle_seconds`), so a cold start within them is a fork that restores
nothing; it is stopped then (at once where the node's memory is low), when its snapshot
is collected, and with the agent. Its instances are the template's children and
outlive it.

Whenever a restored template cannot serve a start (turned off by the agent's
`restored_templates` setting, a snapshot with a device arena, a runtime other than the
process runtime, a restored template that failed, died or refused), `spawn` answers
None and the agent restores from the template as before: never a failed call because
of it. A failure is remembered until the snapshot's last instance ends or its snapshot
is collected, so a snapshot does not pay for a failing attempt on every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from thaw.core.errors import InstanceFailed, ThawError
from thaw.platform.process import ProcessWatch
from thaw.platform.runtime import Exited, ProcessHandle, Runtime, SpawnRequest
from thaw.snapshotter.runtime.restored_template import restored_template_request

log = structlog.get_logger()

# The runtime whose templates fork in the agent's own process tree and pid namespace:
# a restored template's control socket is then reachable as it binds it. (The docker
# runtime's instances keep restoring from their template.)
FORKING_RUNTIME = "process"


class RestoredState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"


_MOVES: dict[RestoredState, set[RestoredState]] = {
    RestoredState.STARTING: {RestoredState.RUNNING, RestoredState.STOPPED},
    RestoredState.RUNNING: {RestoredState.STOPPED},
    RestoredState.STOPPED: set(),
}


@dataclass
class RestoredTemplate:
    """One snapshot's restored template."""

    snapshot: str
    """The manifest key of the snapshot it restored."""
    control: str
    state: RestoredState = RestoredState.STARTING
    pid: int = 0
    restore_seconds: float = 0.0
    """How long it took to start: its fork from the template and its restore."""

    def move(self, to: RestoredState) -> None:
        if to not in _MOVES[self.state]:
            raise ValueError(f"restored template of {self.snapshot}: {self.state.value} "
                             f"-> {to.value} is not a legal move")
        self.state = to


@dataclass(frozen=True)
class Forked:
    """An instance forked from a restored template."""

    pid: int
    ready: dict[str, Any]
    """The instance's ready event."""
    restore_seconds: float
    """This start's wait for the restored template to start (its fork from the
    template and its restore), when it was not running yet; else 0."""


class Places(Protocol):
    """Where a restored template's control socket and log go (the tenant's area)."""

    def __call__(self, tenant: str, snapshot: str) -> tuple[str, str]: ...


class RestoredTemplates:
    """The node's restored templates, one per snapshot in use."""

    def __init__(self, *, runtime: Runtime, places: Places, start_timeout: float,
                 spawn_task: Callable[[Coroutine[Any, Any, None]], None],
                 exit_status: Callable[[int], Awaitable[Exited | None]],
                 enabled: bool = True,
                 wait_exit: Callable[[int], Awaitable[None]] | None = None,
                 linger: float = 0.0,
                 memory_low: Callable[[], bool] = lambda: False) -> None:
        self.runtime = runtime
        self._places = places
        self.start_timeout = start_timeout
        self._spawn_task = spawn_task
        self._exit_status = exit_status
        """How a process the template forked ended (TemplatePool.exited)."""
        self.enabled = enabled and runtime.name == FORKING_RUNTIME
        self._wait_exit = wait_exit or _wait_exit
        self.running: dict[str, RestoredTemplate] = {}
        """Snapshot (manifest key) -> its restored template, starting or running."""
        self._starts: dict[str, asyncio.Task[RestoredTemplate]] = {}
        self._users: dict[str, set[str]] = {}
        """Snapshot -> the instances restored from it on this node (starting ones too)."""
        self._snapshot_of: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        """Snapshot -> why its restored template failed (its starts restore as before)."""
        self.linger = linger
        """Seconds a restored template outlives its snapshot's last instance."""
        self.memory_low = memory_low
        """Whether the node's memory is low (then none lingers)."""
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        """Snapshot -> the timer that stops its restored template, once it has none."""

    def hold(self, instance_id: str, snapshot: str) -> None:
        """The instance restores from `snapshot`: its restored template stays while it
        lives (call before spawning it)."""
        timer = self._lingering.pop(snapshot, None)
        if timer is not None:
            timer.cancel()
        self._users.setdefault(snapshot, set()).add(instance_id)
        self._snapshot_of[instance_id] = snapshot

    async def release(self, instance_id: str) -> None:
        """The instance ended: after the last one of its snapshot, the restored template
        lingers `linger` seconds, then stops (at once if that is 0 or memory is low)."""
        snapshot = self._snapshot_of.pop(instance_id, None)
        if snapshot is None:
            return
        users = self._users.get(snapshot, set())
        users.discard(instance_id)
        if users:
            return
        self._users.pop(snapshot, None)
        self.refused.pop(snapshot, None)
        if self.linger > 0 and snapshot in self.running and not self.memory_low():
            self._lingering[snapshot] = asyncio.get_running_loop().call_later(
                self.linger, lambda: self._spawn_task(self._expire(snapshot)))
            return
        await self.stop(snapshot, "its snapshot's last instance ended")

    async def _expire(self, snapshot: str) -> None:
        self._lingering.pop(snapshot, None)
        if not self._users.get(snapshot):
            await self.stop(snapshot, f"no instance of its snapshot for {self.linger:g}s")

    async def spawn(self, *, snapshot: str, tenant: str, template_control: str,
                    request: SpawnRequest, device_size: int) -> Forked | None:
        """The instance `request` describes, forked from the snapshot's restored
        template (started for it if need be); None where there is none to fork from
        (the caller restores as before)."""
        if not self.enabled or device_size or snapshot in self.refused:
            return None
        started = time.perf_counter()
        restoring = 0.0
        try:
            rt = self.running.get(snapshot)
            if rt is None or rt.state is not RestoredState.RUNNING:
                rt = await self._ensure(snapshot, tenant, template_control, request)
                restoring = time.perf_counter() - started
        except (ThawError, OSError) as exc:
            self._refuse(snapshot, f"it did not start: {exc}")
            return None
        try:
            pid, ready = await self.runtime.spawn(rt.control, request, self.start_timeout)
        except (ThawError, OSError) as exc:
            self._refuse(snapshot, f"it did not fork an instance: {exc}")
            await self.stop(snapshot, "it did not fork an instance")
            return None
        return Forked(pid, ready, restoring)

    def _refuse(self, snapshot: str, reason: str) -> None:
        log.warning("restored template not used: instances restore from the template",
                    snapshot=snapshot, reason=reason)
        self.refused[snapshot] = reason

    async def _ensure(self, snapshot: str, tenant: str, template_control: str,
                      request: SpawnRequest) -> RestoredTemplate:
        task = self._starts.get(snapshot)
        if task is None:
            task = asyncio.ensure_future(
                self._start(snapshot, tenant, template_control, request))
            self._starts[snapshot] = task
            task.add_done_callback(lambda _t: self._starts.pop(snapshot, None))
        return await asyncio.shield(task)

    async def _start(self, snapshot: str, tenant: str, template_control: str,
                     request: SpawnRequest) -> RestoredTemplate:
        control, log_path = await asyncio.to_thread(self._places, tenant, snapshot)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        rt = RestoredTemplate(snapshot, control)
        self.running[snapshot] = rt
        started = time.perf_counter()
        try:
            rt.pid, _ready = await self.runtime.spawn(
                template_control,
                restored_template_request(control=control, log=log_path,
                                          name=f"rt-{snapshot[:16]}", fds=request.fds),
                self.start_timeout)
        except BaseException:
            if rt.state is not RestoredState.STOPPED:
                rt.move(RestoredState.STOPPED)
            if self.running.get(snapshot) is rt:
                del self.running[snapshot]
            raise
        rt.restore_seconds = time.perf_counter() - started
        if rt.state is RestoredState.STOPPED:  # stopped while it started
            await self._end(rt, "stopped while it started")
            raise InstanceFailed(f"restored template of {snapshot} was stopped as it started")
        rt.move(RestoredState.RUNNING)
        self._spawn_task(self._follow(rt))
        log.info("restored template ready", snapshot=snapshot, pid=rt.pid,
                 restore_s=round(rt.restore_seconds, 4))
        return rt

    async def _follow(self, rt: RestoredTemplate) -> None:
        """Forget it when its process ends, however it ends."""
        await self._wait_exit(rt.pid)
        exited = await self._exit_status(rt.pid)  # the template reaped it: take the status
        if rt.state is RestoredState.STOPPED:
            return
        rt.move(RestoredState.STOPPED)
        if self.running.get(rt.snapshot) is rt:
            del self.running[rt.snapshot]
        how = exited.reason if exited is not None else "ended"
        self._refuse(rt.snapshot, f"its process {how}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rt.control)

    async def stop(self, snapshot: str, reason: str) -> None:
        """Stop the snapshot's restored template, if it has one; its instances go on."""
        timer = self._lingering.pop(snapshot, None)
        if timer is not None:
            timer.cancel()
        rt = self.running.pop(snapshot, None)
        if rt is None or rt.state is RestoredState.STOPPED:
            return
        was = rt.state
        rt.move(RestoredState.STOPPED)
        if was is RestoredState.RUNNING:
            await self._end(rt, reason)
        # A starting one is ended by its start, once its pid is known.

    async def _end(self, rt: RestoredTemplate, reason: str) -> None:
        log.info("restored template stopped", snapshot=rt.snapshot, pid=rt.pid,
                 reason=reason)
        if rt.pid:
            await self.runtime.stop(ProcessHandle(rt.pid), reason)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rt.control)

    async def collect(self, keep: set[str]) -> None:
        """Stop the restored templates of every snapshot not in `keep`."""
        for snapshot in [s for s in self.running if s not in keep]:
            await self.stop(snapshot, "its snapshot was collected")
        for snapshot in [s for s in self.refused if s not in keep]:
            del self.refused[snapshot]

    async def close(self) -> None:
        for snapshot in list(self.running):
            await self.stop(snapshot, "agent shutting down")

    def pids(self) -> dict[str, int]:
        """Snapshot -> pid of its running restored template."""
        return {s: rt.pid for s, rt in self.running.items()
                if rt.state is RestoredState.RUNNING}


async def _wait_exit(pid: int) -> None:
    watch = ProcessWatch(pid)
    try:
        await watch.done.wait()
    finally:
        watch.close()


def ready_prefault(ready: dict[str, Any]) -> float:
    """An instance's wait on prefaulting its host arena, from its ready event's timings
    (0 when it tells none)."""
    timings = ready.get("timings") if isinstance(ready, dict) else None
    prefault = timings.get("prefault", 0.0) if isinstance(timings, dict) else 0.0
    return max(0.0, float(prefault)) if isinstance(prefault, (int, float)) else 0.0


def start_stages(spawned: float, prefault: float, forked: float | None
                 ) -> list[tuple[str, float]]:
    """A restore's stages once its template is ready, adding up to `spawned` (from the
    spawn's start, its slice's fill included, to the instance being ready): `restore`
    then `prefault` (the instance's wait on its host arena's pages). For an instance
    forked from a restored template (`forked` not None): `restore` is this start's wait
    for that template to start (`forked` seconds; 0 when it was running: nothing was
    restored), `fork` the rest (the fork and the instance's own part: its env and
    secrets, its slice, on_restore, its socket)."""
    prefault = min(max(prefault, 0.0), spawned)
    rest = spawned - prefault
    if forked is None:
        return [("restore", rest), ("prefault", prefault)]
    restore = min(max(forked, 0.0), rest)
    return [("restore", restore), ("fork", rest - restore), ("prefault", prefault)]

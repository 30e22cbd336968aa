"""Instance leases, reused across calls of one function so that most calls make no
scheduler round trip (Acquire and Release are ~2 ms of a ~3 ms warm call).

- A finished call's lease goes straight to a call of the same function waiting in this
  replica (hand-off), else it is kept idle for `linger` seconds for the next call. The
  waiting calls are served by priority, FIFO among equals, with aging (core/priority.py),
  the same order the scheduler serves their Acquires in.
- A call that finds no idle lease waits for a hand-off *and* asks the scheduler; the
  first to arrive serves it, the other is kept for the next call.

Correctness: a lease is one concurrency slot of one instance, counted by the scheduler
until it is released. A lease serves one call at a time, so the scheduler's count stays
an upper bound on the real load and max_concurrency holds. A lease goes back to the
scheduler once it is `max_age` old, even under steady traffic, so that:
- other replicas' calls waiting at the scheduler for a slot get one within max_age;
- an instance of an old version (retired once it has no lease) or past its
  scaledown_window is not kept alive by this replica's traffic;
- a new version deployed through another replica is used within max_age (sooner: once
  any lease of the new version's generation is granted here, kept leases of other
  versions are released; a deploy or rollback through this replica drops them at once).
While idle, a kept lease makes the scheduler see the slot as busy for up to `linger`.
A lease whose call failed in a way that may be the instance's fault is released as
failed at once, never reused; a reused lease the node refuses (its instance went away)
is released as failed and the call retried on a fresh one (see dispatch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from thaw.core.errors import ThawError
from thaw.core.priority import PRIORITY_DEFAULT, PRIORITY_MIN, PriorityWaitQueue
from thaw.gateway.scheduler_client import SchedulerClient
from thaw.proto import scheduler_pb2

log = structlog.get_logger()

# The reaper wakes this often relative to the linger, so a lease is released at most
# linger * (1 + REAP_FRACTION) after its last call.
REAP_FRACTION = 0.5


class LeasePool:
    def __init__(self, scheduler: SchedulerClient, linger: float, max_age: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 aging_rate: float = 0.0) -> None:
        self.scheduler = scheduler
        self.linger = linger
        self.max_age = max_age
        self.aging_rate = aging_rate
        self._clock = clock
        # function -> idle leases, the most recently used last (reused first, so the
        # rest age out and the pool shrinks to the function's real concurrency).
        self._idle: dict[str, list[tuple[float, scheduler_pb2.Lease]]] = {}
        # function -> calls waiting for a hand-off, in serving order.
        self._waiters: dict[str, PriorityWaitQueue[asyncio.Future[scheduler_pb2.Lease]]] = {}
        # lease id -> when the scheduler granted it (for max_age).
        self._granted: dict[str, float] = {}
        # Versions (a deploy or rollback switches a function's serving version):
        # lease id -> when its Acquire was sent; function -> (version, generation) of
        # the newest generation granted; function -> when this replica deployed or
        # rolled it back. A kept lease of another version, or asked for before that
        # switch, is released instead of reused (see _stale).
        self._asked: dict[str, float] = {}
        self._versions: dict[str, tuple[int, float]] = {}
        self._switched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    @property
    def reusing(self) -> bool:
        return self.linger > 0 and not self.closing

    def take_idle(self, function: str) -> scheduler_pb2.Lease | None:
        """A kept lease of this function, or None."""
        idle = self._idle.get(function)
        while idle:
            _since, lease = idle.pop()
            if not self._stale(function, lease):
                if not idle:
                    del self._idle[function]
                return lease
            self.release_soon(lease)
        self._idle.pop(function, None)
        return None

    async def obtain(self, function: str, tenant: str, name: str, wait: float,
                     timeout: float | None, priority: int = PRIORITY_DEFAULT,
                     invocation_id: str = "") -> tuple[scheduler_pb2.Lease, bool]:
        """A lease from a finishing call or from the scheduler, whichever comes first;
        (lease, handed_off). Raises TimeoutError past `timeout`; a lease the scheduler
        grants after that is kept for the next call."""
        loop = asyncio.get_running_loop()
        acquiring = self.spawn(self._acquire(tenant, name, wait, priority, invocation_id))
        handoff: asyncio.Future[scheduler_pb2.Lease] = loop.create_future()
        waiters = self._waiters.get(function)
        if waiters is None:
            waiters = self._waiters[function] = PriorityWaitQueue(self.aging_rate, self._clock)
        place = waiters.push(handoff, priority, invocation_id) if self.reusing else None
        try:
            await asyncio.wait({handoff, acquiring}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Whatever arrives for this call now serves the next one.
            self._orphan(function, acquiring, invocation_id)
            if handoff.done() and not handoff.cancelled():
                self.done_with(function, handoff.result())
            raise
        finally:
            if not handoff.done():
                handoff.cancel()
            if place is not None:
                waiters.remove(place)
            if not waiters and self._waiters.get(function) is waiters:
                del self._waiters[function]
        if not handoff.cancelled():
            self._orphan(function, acquiring, invocation_id)
            return handoff.result(), True
        if acquiring.done():
            return acquiring.result(), False
        self._orphan(function, acquiring, invocation_id)
        raise TimeoutError

    def _orphan(self, function: str, acquiring: asyncio.Task[scheduler_pb2.Lease],
                invocation_id: str) -> None:
        """The call no longer needs its Acquire: a lease it brings serves the next
        call. While it waits at the scheduler it would hold its call's place there, in
        front of other calls (of other replicas too) that still wait: it goes to the
        back (the calls waiting here have their own Acquires in their own places)."""
        acquiring.add_done_callback(self._adopt_late(function))
        if invocation_id and not acquiring.done():
            self.spawn(self._demote(invocation_id))

    async def _demote(self, invocation_id: str) -> None:
        # Granted meanwhile (NotFound), or the scheduler is away: no harm either way.
        with contextlib.suppress(ThawError):
            await self.scheduler.set_priority(invocation_id, PRIORITY_MIN, bookkeeping=True)

    async def _acquire(self, tenant: str, name: str, wait: float, priority: int,
                       invocation_id: str) -> scheduler_pb2.Lease:
        asked = self._clock()
        lease = await self.scheduler.acquire(tenant, name, wait, priority, invocation_id)
        self._granted[lease.lease_id] = self._clock()
        self._asked[lease.lease_id] = asked
        self._note_version(f"{tenant}/{name}", lease)
        return lease

    def _note_version(self, function: str, lease: scheduler_pb2.Lease) -> None:
        """The newest generation's lease says which version serves: kept leases of any
        other version go back (their instances retire once released)."""
        if not lease.version:
            return  # a scheduler without versions
        current = self._versions.get(function)
        if current is not None and lease.generation <= current[1]:
            return
        self._versions[function] = (lease.version, lease.generation)
        if current is not None and current[0] != lease.version:
            self._release_idle(function, lambda kept: kept.version != lease.version)

    def _stale(self, function: str, lease: scheduler_pb2.Lease) -> bool:
        """Not to be reused: too old, of a version no longer serving, or asked for
        before this replica switched the function's version."""
        if self._too_old(lease):
            return True
        current = self._versions.get(function)
        if current is not None and lease.version and lease.version != current[0]:
            return True
        switched = self._switched.get(function)
        return switched is not None and self._asked.get(lease.lease_id, 0.0) <= switched

    def _release_idle(self, function: str,
                      which: Callable[[scheduler_pb2.Lease], bool]) -> None:
        keep = []
        for since, lease in self._idle.get(function, []):
            if which(lease):
                self.release_soon(lease)
            else:
                keep.append((since, lease))
        if keep:
            self._idle[function] = keep
        else:
            self._idle.pop(function, None)

    def _adopt_late(self, function: str) -> Callable[[asyncio.Task[scheduler_pb2.Lease]],
                                                     None]:
        def adopt(task: asyncio.Task[scheduler_pb2.Lease]) -> None:
            if task.cancelled() or task.exception() is not None:
                return  # nothing was granted (the exception is retrieved, not lost)
            # The instance is placed (maybe just restored): the next call uses it.
            self.done_with(function, task.result())
        return adopt

    def done_with(self, function: str, lease: scheduler_pb2.Lease) -> None:
        """The lease's call is over and the instance is fine: hand it to a waiting call,
        keep it for the next one, or release it (too old, or reuse is off)."""
        if not self.reusing or self._stale(function, lease):
            self.release_soon(lease)
            return
        waiters = self._waiters.get(function)
        while waiters:
            waiter = waiters.pop()
            if waiter is not None and not waiter.item.done():
                waiter.item.set_result(lease)
                return
        self._idle.setdefault(function, []).append((self._clock(), lease))

    def set_priority(self, invocation_id: str, priority: int, tenant: str = "") -> bool:
        """Re-prioritize a call of this replica waiting for a hand-off (of `tenant`,
        unless ""); False when none is waiting here."""
        for function, waiters in self._waiters.items():
            waiter = waiters.find(invocation_id)
            if waiter is not None and (not tenant or function.startswith(f"{tenant}/")):
                waiters.set_priority(waiter, priority)
                return True
        return False

    def queued(self, function: str) -> int:
        """Calls of the function waiting here for a hand-off."""
        waiters = self._waiters.get(function)
        return len(waiters) if waiters is not None else 0

    def _too_old(self, lease: scheduler_pb2.Lease) -> bool:
        granted = self._granted.get(lease.lease_id)
        return granted is None or self._clock() - granted >= self.max_age

    def release_soon(self, lease: scheduler_pb2.Lease, failed: bool = False,
                     reason: str = "") -> None:
        """Release in the background: the client's answer does not wait for it."""
        self._granted.pop(lease.lease_id, None)
        self._asked.pop(lease.lease_id, None)
        self.spawn(self._release(lease, failed, reason))

    async def _release(self, lease: scheduler_pb2.Lease, failed: bool, reason: str) -> None:
        try:
            await self.scheduler.release(lease.lease_id, failed, reason)
        except ThawError as exc:
            log.warning("release failed", lease=lease.lease_id, error=str(exc))

    def forget_instance(self, instance_id: str) -> None:
        """Its instance failed: drop every kept lease on it."""
        for function in list(self._idle):
            self._release_idle(function, lambda lease: lease.instance_id == instance_id)

    def forget_function(self, function: str) -> None:
        """Deployed again, rolled back or deleted through this replica: stop serving
        old leases, the kept ones now and those in use when their calls end."""
        self._switched[function] = self._clock()
        for _since, lease in self._idle.pop(function, []):
            self.release_soon(lease)

    def reap(self) -> int:
        """Release leases idle longer than the linger (or stale); returns how many."""
        now = self._clock()
        for function, at in list(self._switched.items()):
            # Leases asked for before are too old by now (bar one granted after a
            # wait longer than max_age: the version check still catches that one).
            if now - at > self.max_age:
                del self._switched[function]
        released = 0
        for function in list(self._idle):
            keep = []
            for since, lease in self._idle[function]:
                if now - since >= self.linger or self._stale(function, lease):
                    self.release_soon(lease)
                    released += 1
                else:
                    keep.append((since, lease))
            if keep:
                self._idle[function] = keep
            else:
                del self._idle[function]
        return released

    async def reap_forever(self) -> None:
        interval = max(self.linger * REAP_FRACTION, 0.01)
        while True:
            await asyncio.sleep(interval)
            self.reap()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run in the background, tracked so close() can wait for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, grace: float) -> None:
        """Release every kept lease; wait up to `grace` seconds for background work
        (releases, Acquires still out, answers read on after a client's deadline), then
        cancel the rest. A lease granted meanwhile is released, not kept: nothing would
        ever release it after this process is gone."""
        self.closing = True
        for function in list(self._idle):
            self.forget_function(function)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Tasks finishing start others (a late lease's release): wait until none is left.
        while self._tasks and (remaining := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._tasks), timeout=remaining)
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)

"""The scheduler's in-memory view of instances: per function, the live instances and
the requests waiting for one. Rebuilt after a restart from the DB and the agents'
registrations (ControlPlane.recover / register)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from thaw.core.priority import PriorityWaitQueue, Waiter
from thaw.core.spec import Scaling
from thaw.scheduler.autoscale import should_start
from thaw.scheduler.states import InstanceState, move


class Broadcast:
    """Wakes every waiter at once. A waiter takes a token *before* checking its
    condition and waits on that token, so a change between the check and the wait is
    never missed. (The pools need no lock: asyncio runs each check-and-update without
    a suspension point in between.)"""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.fired = 0
        """How many times it fired: an epoch to tell whether it did since some moment."""

    def token(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        self.fired += 1
        event.set()

    @staticmethod
    async def wait(token: asyncio.Event, timeout: float) -> None:
        """Until fired since `token` was taken, or `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(token.wait(), max(0.0, timeout))

    @staticmethod
    async def wait_any(tokens: tuple[asyncio.Event, ...], timeout: float) -> None:
        """Until any of the tokens' broadcasts fired, or `timeout` seconds."""
        if any(t.is_set() for t in tokens):
            return
        waits = [asyncio.ensure_future(t.wait()) for t in tokens]
        try:
            await asyncio.wait(waits, timeout=max(0.0, timeout),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


@dataclass
class RoomTurn:
    """A request queued for room (nothing fits, nothing to evict), as an item of the
    control plane's room queue. Room waiters retry placement in queue order: one may
    retry once room changed since its own last try and every waiter ahead of it has
    tried (and failed) since that change, so a lower-priority request only ever takes
    room that the ones ahead of it could not use."""

    tried: int = -1
    """The room epoch (Broadcast.fired) at which its last placement attempt began."""


@dataclass
class QueuedAcquire:
    """A request in a FunctionPool's queue."""

    starting: bool = False
    """It is starting an instance (which it gets if it is first in line by then)."""


@dataclass
class InstanceView:
    id: str
    function_id: str
    version: int
    node_id: str
    start: str  # "restore" | "fresh"
    gpu_memory: int
    state: InstanceState = InstanceState.READY
    inflight: int = 0
    last_used: float = 0.0
    unclaimed_start: tuple[str, tuple[tuple[str, float], ...]] | None = None
    """(start, timings) of a new instance whose starter was not first in the queue:
    the request that gets its first lease reports the cold start."""

    # The scheduler's questions about an instance, answered here only.

    @property
    def ready(self) -> bool:
        """Serving (or able to): counts as live and warm."""
        return self.state is InstanceState.READY

    @property
    def idle(self) -> bool:
        """Ready with no call in flight: scale-down, eviction and drain may stop it."""
        return self.state is InstanceState.READY and self.inflight == 0

    @property
    def gone(self) -> bool:
        """Stopped and forgotten: no longer in any pool."""
        return self.state is InstanceState.GONE

    @property
    def retired(self) -> bool:
        """Marked to stop and its last call has ended: stop it now."""
        return self.state is InstanceState.STOPPING and self.inflight == 0

    def serves(self, version: int) -> bool:
        """Ready and of `version` (the live instances of a version)."""
        return self.state is InstanceState.READY and self.version == version

    def usable(self, version: int, max_concurrency: int) -> bool:
        """May take another call of `version` now (ready, with a free slot)."""
        return self.serves(version) and self.inflight < max_concurrency

    def move(self, target: InstanceState, why: str = "") -> None:
        """The only way its state changes (states.move: checked, refusal logged)."""
        move(self, target, f"instance {self.id}{': ' + why if why else ''}")


@dataclass
class FunctionPool:
    """The live instances of one function and the requests waiting for them."""

    function_id: str
    name: str = ""
    """tenant/name, for logs and events."""
    instances: dict[str, InstanceView] = field(default_factory=dict)
    starting: int = 0
    """Starts in flight for this function (for a request or to keep min_instances)."""
    waiters: int = 0
    """Requests in acquire() that do not hold an instance yet."""
    min_instances: int = 0
    """From the function's current spec: eviction and scale-down never go below it."""
    last_acquired: float = 0.0
    """When a request last asked for this function (the scheduler's clock)."""
    warm_retry_at: float = 0.0
    """No proactive (min_instances) start before this, after one failed."""
    changed: Broadcast = field(default_factory=Broadcast)
    queue: PriorityWaitQueue[QueuedAcquire] = field(default_factory=PriorityWaitQueue)
    """The waiting requests in serving order (priority, then arrival, with aging): only
    the first of them not busy starting an instance may take a free slot, so nobody
    overtakes a request ahead of it."""

    def ready_count(self) -> int:
        """Ready instances of any version (warm, or spare above min_instances)."""
        return sum(1 for i in self.instances.values() if i.ready)

    def first_in_line(self) -> Waiter[QueuedAcquire] | None:
        """Who may take a free slot now: the head, or while the head (and others
        after it) are starting instances of their own, the first one that is not."""
        head = self.queue.head()
        if head is None or not head.item.starting:
            return head
        return next((w for w in self.queue if not w.item.starting), None)

    def live(self, version: int) -> list[InstanceView]:
        return [i for i in self.instances.values() if i.serves(version)]

    def pick(self, version: int, max_concurrency: int) -> InstanceView | None:
        """A warm instance of this version with a free slot: the least busy one."""
        best = None
        for inst in self.instances.values():
            if (inst.usable(version, max_concurrency)
                    and (best is None or inst.inflight < best.inflight)):
                best = inst
        return best

    def needs_instance(self, scaling: Scaling, version: int) -> bool:
        """Start another one? Demand is the requests running on this version's
        instances plus the requests waiting (each waiter counted once, and a request
        that got an instance is no longer a waiter)."""
        live = self.live(version)
        demand = sum(i.inflight for i in live) + self.waiters
        return should_start(len(live), self.starting, demand, scaling)

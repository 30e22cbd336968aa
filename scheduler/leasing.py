"""Leases on instances: acquire (a warm instance with a free slot, else a new one,
else wait in priority order), release, an operator's re-prioritization of a waiting
request, and the bounded queue of requests waiting for room on the nodes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from thaw.core.errors import DeadlineExceeded, FunctionUnavailable, NoCapacity, NotFound
from thaw.core.priority import PRIORITY_DEFAULT, Waiter
from thaw.scheduler.builds import Builds
from thaw.scheduler.events import Actor, EventKind
from thaw.scheduler.fleet import Fleet
from thaw.scheduler.instances import Instances
from thaw.scheduler.plane_state import PlaneState
from thaw.scheduler.pools import Broadcast, FunctionPool, InstanceView, QueuedAcquire, RoomTurn
from thaw.scheduler.starts import NoRoom, Starts, Timings
from thaw.scheduler.states import FunctionState


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: str
    instance: InstanceView
    data_url: str
    start: str  # "warm" | "restore" | "fresh"
    timings: Timings
    timeout: float


class Leasing:
    def __init__(self, state: PlaneState, fleet: Fleet, instances: Instances,
                 starts: Starts, builds: Builds) -> None:
        self.s = state
        self.fleet = fleet
        self.instances = instances
        self.starts = starts
        self.builds = builds

    def warm_count(self, function_id: str) -> int:
        pool = self.s.pools.get(function_id)
        return 0 if pool is None else pool.ready_count()

    async def acquire(self, tenant: str, name: str, wait: float,
                      priority: int = PRIORITY_DEFAULT, invocation_id: str = "") -> LeaseGrant:
        """A lease on an instance of the function: a warm one with a free slot, else a
        new one if the autoscaler wants one for the demand, else wait for either.

        Waiting requests are served in priority order, FIFO among equals, with aging
        (core/priority.py): only the head of the function's queue takes a free slot,
        and a new instance goes to the head, whoever started it. Requests waiting for
        room on the nodes retry placement in that order too (RoomTurn).

        Bounded: past function_queue_max waiting requests -> NoCapacity; when nothing
        fits and nothing can be evicted, at most placement_queue_max requests wait
        for room, each at most placement_queue_timeout; past the deadline ->
        DeadlineExceeded."""
        s = self.s
        started = s.clock()
        acquire_wait = s.timeouts.acquire_wait
        deadline = started + (min(wait, acquire_wait) if wait > 0 else acquire_wait)
        fn = await s.store.run(s.store.get_function, tenant, name)
        while fn.state is FunctionState.BUILDING and self.builds.building(fn):
            fn = await self.builds.wait_built(fn, deadline)  # (a superseded build: the next)
        if fn.state is FunctionState.FAILED:
            raise FunctionUnavailable(f"{tenant}/{name} cannot run: {fn.reason}")
        if fn.state is not FunctionState.READY:
            raise FunctionUnavailable(f"{tenant}/{name} is {fn.state.value}")
        pool = s.pool(fn)
        pool.last_acquired = s.clock()
        scaling = fn.spec.scaling
        if pool.waiters >= s.policy.function_queue_max:
            s.events.emit(EventKind.PLACEMENT_REFUSED,
                          f"{pool.name}: {pool.waiters} requests already waiting",
                          function=pool.name)
            raise NoCapacity(f"{tenant}/{name} already has {pool.waiters} requests waiting "
                             "for an instance; try again later")
        pool.waiters += 1
        me = pool.queue.push(QueuedAcquire(), priority, invocation_id)
        room_since: float | None = None
        room: Waiter[RoomTurn] | None = None
        try:
            while True:
                seen = pool.changed.token()
                if s.active.setdefault(fn.id, (fn.version, fn.updated_at))[0] != fn.version:
                    # A deploy or rollback switched versions since fn was read: place
                    # the serving one (the old one's instances are being retired).
                    fn = await s.store.run(s.store.get_function, tenant, name)
                    scaling = fn.spec.scaling
                    continue
                first_in_line = pool.first_in_line() is me
                inst = pool.pick(fn.version, scaling.max_concurrency) if first_in_line else None
                if inst is not None:
                    return self._grant(pool, inst, "warm", (("queue", s.clock() - started),),
                                       scaling.timeout)
                if pool.needs_instance(scaling, fn.version):
                    pool.starting += 1
                    # Server-Timing stages are disjoint: the queue ends where the start
                    # (restore or import+setup) begins.
                    queued = s.clock() - started
                    epoch = s.room.fired
                    me.item.starting = True
                    try:
                        inst, timings = await self.starts.start_instance(fn)
                    except NoRoom as exc:
                        me.item.starting = False
                        pool.starting -= 1
                        pool.changed.fire()
                        first = room_since is None
                        room_since = s.clock() if room_since is None else room_since
                        if room is None:
                            room = s.room_queue.push(RoomTurn(), me.priority, invocation_id)
                        room.item.tried = epoch
                        s.room_turns.fire()
                        await self._wait_for_room(pool, str(exc), room_since, deadline, first,
                                                  room)
                        continue
                    except BaseException:
                        pool.starting -= 1
                        pool.changed.fire()
                        raise
                    pool.starting -= 1
                    me.item.starting = False
                    self._leave_room_queue(room)
                    room = None
                    if pool.first_in_line() is me:
                        self.instances.add(pool, inst)
                        return self._grant(pool, inst, inst.start,
                                           (("queue", queued), *timings), scaling.timeout)
                    # Started by a request further back: the head takes it (and reports
                    # the cold start); this one waits on in its place.
                    inst.unclaimed_start = (inst.start, timings)
                    self.instances.add(pool, inst)
                    continue
                self._leave_room_queue(room)
                room = None
                remaining = deadline - s.clock()
                if remaining <= 0:
                    live = len(pool.live(fn.version))
                    raise DeadlineExceeded(
                        f"no instance of {tenant}/{name} became free within "
                        f"{s.clock() - started:.0f}s ({live} busy at max_concurrency="
                        f"{scaling.max_concurrency}, max_instances={scaling.max_instances})")
                await Broadcast.wait(seen, remaining)
        finally:
            pool.waiters -= 1
            pool.queue.remove(me)
            self._leave_room_queue(room)
            pool.changed.fire()  # the next in line may take what this one leaves

    def _leave_room_queue(self, room: Waiter[RoomTurn] | None) -> None:
        if room is not None and self.s.room_queue.remove(room):
            self.s.room_turns.fire()

    def _room_turn(self, room: Waiter[RoomTurn]) -> bool:
        """May this room waiter retry placement now (see RoomTurn)?"""
        epoch = self.s.room.fired
        if room.item.tried >= epoch:
            return False  # no room changed since its last try
        for waiter in self.s.room_queue:
            if waiter is room:
                return True
            if waiter.item.tried < epoch:
                return False  # one ahead has yet to try since the change
        return True  # not queued (any more): nothing to wait for

    def set_priority(self, invocation_id: str, priority: int, tenant: str = "",
                     bookkeeping: bool = False) -> tuple[str, int, float, int]:
        """Give a queued invocation a new priority (an operator moving it ahead):
        (tenant/name, priority, effective priority, requests ahead of it now).
        NotFound when no acquire of that invocation (of `tenant`, unless "") is
        waiting here. `bookkeeping`: the gateway's own step (a call that stopped
        waiting sends its Acquire to the back), recorded as such, not as a change."""
        s = self.s
        for pool in s.pools.values():
            waiter = pool.queue.find(invocation_id)
            if waiter is None or (tenant and not pool.name.startswith(f"{tenant}/")):
                continue
            pool.queue.set_priority(waiter, priority)
            room = s.room_queue.find(invocation_id)
            if room is not None:
                s.room_queue.set_priority(room, priority)
                s.room_turns.fire()
            pool.changed.fire()
            if bookkeeping:
                s.events.emit(EventKind.ACQUIRE_DEMOTED,
                              f"invocation {invocation_id} of {pool.name} stopped waiting: "
                              "its request went to the back of the queue",
                              function=pool.name, invocation=invocation_id,
                              priority=str(priority), actor=Actor.SYSTEM.value)
            else:
                s.events.emit(EventKind.PRIORITY_CHANGED,
                              f"invocation {invocation_id} of {pool.name} set to priority "
                              f"{priority}", function=pool.name, invocation=invocation_id,
                              priority=str(priority), actor=Actor.OPERATOR.value)
            return (pool.name, priority, pool.queue.effective(waiter),
                    pool.queue.rank(waiter))
        raise NotFound(f"invocation {invocation_id} is not waiting for an instance "
                       "(it was served, finished or never queued here)",
                       field="invocation_id")

    async def _wait_for_room(self, pool: FunctionPool, why: str, since: float,
                             deadline: float, first: bool,
                             room: Waiter[RoomTurn] | None = None) -> None:
        """Nothing fits and nothing can be evicted: wait (bounded) until room may have
        appeared and it is this request's turn to retry (RoomTurn), then the caller
        tries again from the top (a warm instance may have freed meanwhile)."""
        s = self.s
        seen = s.room.token()  # no suspension since the failed placement
        until = min(deadline, since + s.policy.placement_queue_timeout)
        remaining = until - s.clock()
        if remaining <= 0:
            s.events.emit(EventKind.PLACEMENT_REFUSED,
                          f"{pool.name}: no room within {s.clock() - since:.0f}s: {why}",
                          function=pool.name)
            raise DeadlineExceeded(f"no room for {pool.name} within "
                                   f"{s.clock() - since:.0f}s: {why}")
        if s.room_waiters >= s.policy.placement_queue_max:
            s.events.emit(EventKind.PLACEMENT_REFUSED,
                          f"{pool.name}: placement queue full ({s.room_waiters})",
                          function=pool.name)
            raise NoCapacity(f"{why}; {s.room_waiters} requests are already queued for "
                             "room, try again later")
        if first:
            s.events.emit(EventKind.PLACEMENT_QUEUED, f"{pool.name} waits for room: {why}",
                          function=pool.name)
        s.room_waiters += 1
        try:
            if room is None:
                await Broadcast.wait(seen, remaining)
                return
            while not self._room_turn(room):
                remaining = until - s.clock()
                if remaining <= 0:
                    return  # the caller's next try fails and reports the deadline
                await Broadcast.wait_any((s.room.token(), s.room_turns.token()), remaining)
        finally:
            s.room_waiters -= 1

    def _grant(self, pool: FunctionPool, inst: InstanceView, start: str,
               timings: Timings, timeout: float) -> LeaseGrant:
        if inst.unclaimed_start is not None:
            # Its first lease: the start it waited for was this instance's cold start.
            start, cold = inst.unclaimed_start
            timings = (*timings, *cold)
            inst.unclaimed_start = None
        inst.inflight += 1
        lease_id = uuid.uuid4().hex
        self.s.leases[lease_id] = (pool, inst)
        node = self.s.nodes[inst.node_id]
        return LeaseGrant(lease_id, inst, node.data_url, start, timings, timeout)

    async def release(self, lease_id: str, failed: bool, reason: str) -> None:
        s = self.s
        entry = s.leases.pop(lease_id, None)
        if entry is None:
            return  # granted by a scheduler before a restart, or released twice
        pool, inst = entry
        inst.inflight -= 1
        inst.last_used = s.clock()
        pool.changed.fire()
        s.room.fire()
        if failed:
            await self.instances.forget(inst.id, reason or "failed while serving")
            node = s.nodes.get(inst.node_id)
            if node is not None:
                s.spawn(self.instances.stop_quietly(node, inst.id, reason or "failed"))
                s.spawn(self.fleet.probe(node, reason or "an invocation failed"))
        elif inst.retired:
            await self.instances.stop(pool, inst, "retired")

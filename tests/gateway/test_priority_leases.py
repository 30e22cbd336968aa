"""The gateway's hand-off of a lease a call gives back goes to the highest-priority
call of that function waiting in this gateway, FIFO among equals, with aging; an
admin raise reorders the waiting calls."""

from __future__ import annotations

import asyncio

from tests.gateway.test_leases import FakeClock, FakeScheduler, settle
from thaw.gateway.leases import LeasePool
from thaw.proto import scheduler_pb2

Obtaining = asyncio.Task[tuple[scheduler_pb2.Lease, bool]]


async def waiting_calls(pool: LeasePool, calls: list[tuple[str, int]], clock: FakeClock,
                        spacing: float = 0.0) -> dict[str, Obtaining]:
    before = pool.queued("t/f")
    tasks = {}
    for invocation, priority in calls:
        tasks[invocation] = asyncio.create_task(
            pool.obtain("t/f", "t", "f", 10, None, priority, invocation))
        await settle()
        clock.now += spacing
    assert pool.queued("t/f") == before + len(calls)
    return tasks


async def served_order(pool: LeasePool, lease: scheduler_pb2.Lease,
                       tasks: dict[str, Obtaining]) -> list[str]:
    """Give the one lease back again and again; who got it each time."""
    order = []
    for _ in range(len(tasks)):
        pool.done_with("t/f", lease)
        await settle()
        done = [name for name, t in tasks.items() if t.done() and name not in order]
        assert len(done) == 1, done
        got, handed_off = tasks[done[0]].result()
        assert got is lease and handed_off
        order.append(done[0])
    return order


class RankingScheduler(FakeScheduler):
    def __init__(self) -> None:
        super().__init__()
        self.demoted: list[tuple[str, int]] = []
        self.bookkeeping: list[bool] = []

    async def set_priority(self, invocation_id: str, priority: int, tenant: str = "",
                           bookkeeping: bool = False) -> scheduler_pb2.SetPriorityResponse:
        self.demoted.append((invocation_id, priority))
        self.bookkeeping.append(bookkeeping)
        return scheduler_pb2.SetPriorityResponse(priority=priority)


def saturated() -> tuple[RankingScheduler, FakeClock, LeasePool]:
    sched, clock = RankingScheduler(), FakeClock()
    sched.gate = asyncio.Event()  # the scheduler has nothing free: only hand-offs serve
    return sched, clock, LeasePool(sched, linger=0.2, max_age=1000,  # type: ignore[arg-type]
                                   clock=clock, aging_rate=1.0)


async def test_a_freed_lease_goes_to_the_highest_priority_waiter_fifo_within_a_level(
        ) -> None:
    sched, clock, pool = saturated()
    lease = scheduler_pb2.Lease(lease_id="l0", node_id="n", instance_id="i0")
    pool._granted["l0"] = clock.now
    tasks = await waiting_calls(pool, [("a10", 10), ("b50", 50), ("c90", 90), ("d50", 50),
                                       ("e90", 90)], clock)
    assert await served_order(pool, lease, tasks) == ["c90", "e90", "b50", "d50", "a10"]
    assert pool.queued("t/f") == 0
    # Served by hand-offs, their Acquires still wait at the scheduler: sent to the back.
    assert sorted(sched.demoted) == [(i, 1) for i in ("a10", "b50", "c90", "d50", "e90")]
    assert sched.bookkeeping == [True] * 5  # the gateway's own step, not an operator's
    sched.gate.set()  # type: ignore[union-attr]
    await settle()
    await pool.close(1.0)


async def test_waiting_ages_a_low_priority_call_past_newer_ones() -> None:
    sched, clock, pool = saturated()
    lease = scheduler_pb2.Lease(lease_id="l0", node_id="n", instance_id="i0")
    pool._granted["l0"] = clock.now
    tasks = await waiting_calls(pool, [("old10", 10)], clock)
    clock.now += 60  # 10 + 60 s x 1/s: ahead of a fresh 50, behind a fresh 90
    tasks.update(await waiting_calls(pool, [("new50", 50), ("new90", 90)], clock))
    assert await served_order(pool, lease, tasks) == ["new90", "old10", "new50"]
    sched.gate.set()  # type: ignore[union-attr]
    await settle()
    await pool.close(1.0)


async def test_a_raise_moves_a_waiting_call_ahead_of_its_function_only() -> None:
    sched, clock, pool = saturated()
    lease = scheduler_pb2.Lease(lease_id="l0", node_id="n", instance_id="i0")
    pool._granted["l0"] = clock.now
    tasks = await waiting_calls(pool, [("a", 50), ("b", 50), ("c", 50)], clock)
    assert not pool.set_priority("c", 90, tenant="other")  # another tenant's: untouched
    assert not pool.set_priority("nobody", 90)
    assert pool.set_priority("c", 90, tenant="t")
    assert await served_order(pool, lease, tasks) == ["c", "a", "b"]
    sched.gate.set()  # type: ignore[union-attr]
    await settle()
    await pool.close(1.0)

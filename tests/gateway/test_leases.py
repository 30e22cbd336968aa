"""The gateway's lease pool against an in-memory scheduler: a lease serves one call at
a time, goes to a waiting call or is kept for the next one, and goes back to the
scheduler after the linger or once max_age old."""

from __future__ import annotations

import asyncio

import pytest

from thaw.gateway.leases import LeasePool
from thaw.proto import scheduler_pb2


class FakeScheduler:
    def __init__(self) -> None:
        self.granted = 0
        self.released: list[tuple[str, bool]] = []
        self.gate: asyncio.Event | None = None  # set: Acquire answers

    async def acquire(self, tenant: str, name: str, wait: float, priority: int = 0,
                      invocation_id: str = "") -> scheduler_pb2.Lease:
        if self.gate is not None:
            await self.gate.wait()
        self.granted += 1
        return scheduler_pb2.Lease(lease_id=f"l{self.granted}", node_id="n",
                                   instance_id=f"i{self.granted}", timeout_seconds=30)

    async def release(self, lease_id: str, failed: bool = False, reason: str = "") -> None:
        self.released.append((lease_id, failed))


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def pool_of(sched: FakeScheduler, clock: FakeClock | None = None, linger: float = 0.2,
            max_age: float = 10.0) -> LeasePool:
    return LeasePool(sched, linger=linger, max_age=max_age,  # type: ignore[arg-type]
                     clock=clock or FakeClock())


async def test_a_kept_lease_serves_the_next_call_then_ages_out() -> None:
    sched, clock = FakeScheduler(), FakeClock()
    pool = pool_of(sched, clock)
    first, handed = await pool.obtain("t/f", "t", "f", 10, None)
    assert not handed
    pool.done_with("t/f", first)
    assert pool.take_idle("t/g") is None  # another function's calls do not take it
    again = pool.take_idle("t/f")
    assert again is first and sched.granted == 1
    assert pool.take_idle("t/f") is None  # never two calls on one lease
    pool.done_with("t/f", again)
    clock.now += 0.1
    assert pool.reap() == 0
    clock.now += 0.15
    assert pool.reap() == 1
    await settle()
    assert sched.released == [("l1", False)]
    assert pool.take_idle("t/f") is None


async def test_a_finishing_call_hands_its_lease_to_a_waiting_one() -> None:
    sched = FakeScheduler()
    pool = pool_of(sched)
    busy, _ = await pool.obtain("t/f", "t", "f", 10, None)
    sched.gate = asyncio.Event()  # the scheduler has no free slot for now
    waiting = asyncio.create_task(pool.obtain("t/f", "t", "f", 10, None))
    await settle()
    assert not waiting.done()
    pool.done_with("t/f", busy)
    lease, handed = await waiting
    assert lease is busy and handed
    sched.gate.set()  # the Acquire it also made comes back: kept for the next call
    await settle()
    assert sched.granted == 2 and pool.take_idle("t/f") is not None
    assert sched.released == []


async def test_leases_go_back_once_old_even_when_busy() -> None:
    sched, clock = FakeScheduler(), FakeClock()
    pool = pool_of(sched, clock, linger=5, max_age=2)
    lease, _ = await pool.obtain("t/f", "t", "f", 10, None)
    clock.now += 1
    pool.done_with("t/f", lease)
    assert pool.take_idle("t/f") is lease
    clock.now += 1
    pool.done_with("t/f", lease)  # two seconds old: back to the scheduler
    await settle()
    assert sched.released == [("l1", False)] and pool.take_idle("t/f") is None


async def test_a_deadline_keeps_the_late_lease_for_the_next_call() -> None:
    sched = FakeScheduler()
    sched.gate = asyncio.Event()
    pool = pool_of(sched)
    with pytest.raises(TimeoutError):
        await pool.obtain("t/f", "t", "f", 10, timeout=0.01)
    sched.gate.set()
    await settle()
    assert pool.take_idle("t/f") is not None and sched.released == []


async def test_no_linger_releases_at_once_and_close_releases_all() -> None:
    sched = FakeScheduler()
    pool = pool_of(sched, linger=0)
    lease, _ = await pool.obtain("t/f", "t", "f", 10, None)
    pool.done_with("t/f", lease)
    await settle()
    assert sched.released == [("l1", False)]

    keeping = pool_of(sched, linger=5)
    for fn in ("f", "g"):
        lease, _ = await keeping.obtain(f"t/{fn}", "t", fn, 10, None)
        keeping.done_with(f"t/{fn}", lease)
    await keeping.close(grace=1)
    assert {lease for lease, _ in sched.released} == {"l1", "l2", "l3"}


async def test_leases_on_a_failed_instance_are_dropped() -> None:
    sched = FakeScheduler()
    pool = pool_of(sched, linger=5)
    a, _ = await pool.obtain("t/f", "t", "f", 10, None)
    b, _ = await pool.obtain("t/f", "t", "f", 10, None)
    pool.done_with("t/f", a)
    pool.done_with("t/f", b)
    pool.forget_instance(a.instance_id)
    await settle()
    assert sched.released == [("l1", False)]
    assert pool.take_idle("t/f") is b and pool.take_idle("t/f") is None

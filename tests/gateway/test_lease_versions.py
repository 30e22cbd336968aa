"""The lease pool across a version switch (gateway/leases.py): once a lease of a newer
generation is granted, kept leases of other versions go back instead of being reused,
and a deploy or rollback through this replica (forget_function) stops the reuse of
every lease asked for before it, also those still in use."""

from __future__ import annotations

import asyncio

from tests.gateway.test_leases import FakeClock, settle
from thaw.gateway.leases import LeasePool
from thaw.proto import scheduler_pb2


class VersionedScheduler:
    """Grants leases of the version (and generation) the test sets."""

    def __init__(self) -> None:
        self.version, self.generation = 1, 100.0
        self.granted = 0
        self.released: list[str] = []

    async def acquire(self, tenant: str, name: str, wait: float, priority: int = 0,
                      invocation_id: str = "") -> scheduler_pb2.Lease:
        self.granted += 1
        return scheduler_pb2.Lease(lease_id=f"l{self.granted}", node_id="n",
                                   instance_id=f"i{self.granted}", timeout_seconds=30,
                                   version=self.version, generation=self.generation)

    async def release(self, lease_id: str, failed: bool = False, reason: str = "") -> None:
        self.released.append(lease_id)


def pool_of(sched: VersionedScheduler, clock: FakeClock) -> LeasePool:
    return LeasePool(sched, linger=10.0, max_age=60.0, clock=clock)  # type: ignore[arg-type]


async def test_a_newer_generation_retires_kept_leases_of_the_old_version() -> None:
    sched, clock = VersionedScheduler(), FakeClock()
    pool = pool_of(sched, clock)
    old_kept, _ = await pool.obtain("t/f", "t", "f", 10, None)
    old_busy, _ = await pool.obtain("t/f", "t", "f", 10, None)
    pool.done_with("t/f", old_kept)

    sched.version, sched.generation = 2, 200.0  # the scheduler switched to v2
    new, _ = await pool.obtain("t/f", "t", "f", 10, None)
    await settle()
    assert sched.released == [old_kept.lease_id]  # the kept v1 lease went back at once
    pool.done_with("t/f", old_busy)  # a v1 call in flight ends: not kept either
    await settle()
    assert sched.released == [old_kept.lease_id, old_busy.lease_id]
    pool.done_with("t/f", new)
    assert pool.take_idle("t/f") is new

    # A late grant of the old version (an older generation) does not switch back.
    sched.version, sched.generation = 1, 100.0
    late, _ = await pool.obtain("t/f", "t", "f", 10, None)
    pool.done_with("t/f", late)
    await settle()
    assert late.lease_id in sched.released


async def test_a_rollback_to_a_lower_version_is_a_newer_generation() -> None:
    sched, clock = VersionedScheduler(), FakeClock()
    sched.version, sched.generation = 2, 200.0
    pool = pool_of(sched, clock)
    v2, _ = await pool.obtain("t/f", "t", "f", 10, None)
    pool.done_with("t/f", v2)
    sched.version, sched.generation = 1, 300.0  # rolled back to v1
    v1, _ = await pool.obtain("t/f", "t", "f", 10, None)
    await settle()
    assert sched.released == [v2.lease_id]
    pool.done_with("t/f", v1)
    assert pool.take_idle("t/f") is v1


async def test_forget_function_stops_reuse_of_leases_asked_for_before_it() -> None:
    sched, clock = VersionedScheduler(), FakeClock()
    clock.now = 5.0
    pool = pool_of(sched, clock)
    kept, _ = await pool.obtain("t/f", "t", "f", 10, None)
    busy, _ = await pool.obtain("t/f", "t", "f", 10, None)
    pool.done_with("t/f", kept)
    clock.now = 6.0
    pool.forget_function("t/f")  # deployed through this replica
    await settle()
    assert sched.released == [kept.lease_id]
    clock.now = 6.5
    waiting = asyncio.ensure_future(pool.obtain("t/f", "t", "f", 10, None))
    pool.done_with("t/f", busy)  # not handed to the waiting call: released
    fresh, handed = await waiting
    await settle()
    assert not handed and busy.lease_id in sched.released
    pool.done_with("t/f", fresh)
    assert pool.take_idle("t/f") is fresh

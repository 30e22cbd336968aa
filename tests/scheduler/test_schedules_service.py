"""What the Invocations service tells about schedules: an invocation's source and
schedule, the list filtered by source, and each schedule's last due time with its
run's state now (ListSchedules, scheduler/schedules_service.py)."""

from __future__ import annotations

import pytest

from tests.scheduler.test_schedules import T0, Clock, deploy, ticker
from thaw.core.errors import InvalidArgument
from thaw.proto import invocations_pb2
from thaw.scheduler.invocations import Completion, InvocationState, InvocationStore
from thaw.scheduler.schedules_service import list_schedules
from thaw.scheduler.store import Store


async def test_last_run_source_and_filter(store: Store) -> None:
    deploy(store, '[[schedule]]\ncron = "* * * * *"\ninput = {n = 3}\n'
                  '[[schedule]]\ncron = "0 0 1 1 *"\ntimezone = "Europe/Paris"\n')
    clock = Clock()
    tick, _ = ticker(store, clock)
    await tick.tick()
    [every, yearly] = list_schedules(store, clock, "acme", "")
    assert (every.cron, every.position, every.last_outcome, every.last_run_at) == (
        "* * * * *", 0, "", 0.0)
    assert (yearly.timezone, yearly.position, yearly.next_run_at > T0) == (
        "Europe/Paris", 1, True)
    assert list_schedules(store, clock, "acme", "other") == []
    assert list_schedules(store, clock, "someone-else", "") == []

    clock.now = T0 + 31
    await tick.tick()
    [every, _] = list_schedules(store, clock, "acme", "tick")
    assert every.last_outcome == "queued" and every.last_run_at == T0 + 31
    assert every.last_due_at == T0 + 30 and every.input_json == '{"n": 3}'
    invs = InvocationStore(store, clock)
    run = invs.get("acme", every.last_invocation_id, with_bodies=False)
    assert (run.source, run.schedule_id) == ("schedule", every.id)

    # A client's call beside it: source "call", and the filter keeps each apart.
    call, _ = invs.create(invocations_pb2.Invocation(tenant="acme", function="tick"), "", 0)
    assert (call.source, call.schedule_id) == ("call", "")
    assert [i.id for i in invs.list_recent("acme", 10, source="schedule")] == [run.id]
    assert [i.id for i in invs.list_recent("acme", 10, source="call")] == [call.id]
    assert len(invs.list_recent("acme", 10)) == 2
    with pytest.raises(InvalidArgument) as refused:
        invs.list_recent("acme", 10, source="cron")
    assert refused.value.field == "source"

    # The run's state as it is now: running, then its outcome.
    [claimed] = [c for c in invs.claim("gw", 10, 30) if c.id == run.id]
    assert list_schedules(store, clock, "acme", "tick")[0].last_outcome == "running"
    invs.complete(claimed.id, "gw", Completion(InvocationState.FAILED, 500, "text/plain",
                                               b"boom"), ttl_seconds=60)
    assert list_schedules(store, clock, "acme", "tick")[0].last_outcome == "failed"
    clock.now = T0 + 31 + 61  # past the result's TTL
    # The next due time (T0 + 90) was missed by 2 s: it runs.
    await tick.tick()
    latest = list_schedules(store, clock, "acme", "tick")[0]
    assert latest.last_outcome == "queued" and latest.last_invocation_id != run.id

    # A due time found past the grace is skipped: the outcome says so, the last run stays.
    clock.now += 600
    await tick.tick()
    skipped = list_schedules(store, clock, "acme", "tick")[0]
    assert skipped.last_outcome == "skipped"
    assert skipped.last_invocation_id == latest.last_invocation_id
    assert skipped.last_run_at == latest.last_run_at


def test_a_tenant_is_needed(store: Store) -> None:
    with pytest.raises(InvalidArgument) as refused:
        list_schedules(store, Clock(), "", "")
    assert refused.value.field == "tenant"

"""Cron schedules at the scheduler, on an injected clock: kept in step with the serving
spec, each due time claimed once, missed and overlapping runs skipped with an event,
a refused input recorded as a failed run."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from thaw.core.spec import parse_spec
from thaw.scheduler import models
from thaw.scheduler.events import EventKind, EventLog
from thaw.scheduler.schedule_ticker import ScheduleTicker, check_input
from thaw.scheduler.schedules import SOURCE_SCHEDULE, ScheduleBook
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import Store

T0 = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC).timestamp()
SCHEMA = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                     "required": ["n"]})


def deploy(store: Store, schedule: str) -> None:
    spec = parse_spec('name = "tick"\nhandler = "app:Tick"\n' + schedule)
    store.upsert_function("acme", spec, "d" * 64, "snapshot", FunctionState.READY)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def ticker(store: Store, clock: Clock, schema: str = "") -> tuple[ScheduleTicker, EventLog]:
    events = EventLog()

    async def input_schema(tenant: str, name: str) -> str:
        return schema
    return ScheduleTicker(ScheduleBook(store), events, input_schema, grace_seconds=60,
                          clock=clock), events


def invocations(store: Store) -> list[models.Invocation]:
    with store._session() as s:
        return list(s.query(models.Invocation).order_by(models.Invocation.created_at))


async def test_a_due_time_runs_once_with_its_input(store: Store) -> None:
    deploy(store, '[schedule]\ncron = "* * * * *"\ninput = {n = 3}\n')
    clock = Clock()
    tick, events = ticker(store, clock)
    assert await tick.tick() == []  # 12:00:30: next due 12:01:00
    [view] = tick.book.of_tenant("acme")
    assert view.next_run_at == T0 + 30
    clock.now = T0 + 31
    [fired] = await tick.tick()
    assert fired.outcome == "started" and fired.due_at == T0 + 30
    [inv] = invocations(store)
    assert (inv.source, inv.schedule_id, inv.state) == (SOURCE_SCHEDULE, view.id, "queued")
    assert json.loads(inv.request_body or b"") == {"n": 3}
    assert inv.request_content_type == "application/json"
    # The same due time is never run twice, by this ticker or another one.
    other, _ = ticker(store, clock)
    assert await tick.tick() == [] and await other.tick() == []
    assert len(invocations(store)) == 1
    assert [e.kind for e in events.since()] == [EventKind.SCHEDULE_RAN]


async def test_a_run_still_going_makes_the_next_due_time_skip(store: Store) -> None:
    deploy(store, '[schedule]\ncron = "* * * * *"\n')
    clock = Clock()
    tick, events = ticker(store, clock)
    await tick.tick()
    clock.now = T0 + 31
    await tick.tick()
    clock.now = T0 + 91  # the first run is still queued
    [fired] = await tick.tick()
    assert fired.outcome == "skipped" and "still queued" in fired.reason
    assert len(invocations(store)) == 1
    skipped = events.since(kinds=[EventKind.SCHEDULE_SKIPPED])
    assert len(skipped) == 1 and dict(skipped[0].attrs)["due_at"] == str(T0 + 90)
    # Once it finished, the next due time runs.
    inv = invocations(store)[0]
    with store._session() as s, s.begin():
        s.get(models.Invocation, inv.id).state = "succeeded"  # type: ignore[union-attr]
    clock.now = T0 + 151
    [fired] = await tick.tick()
    assert fired.outcome == "started"


async def test_missed_due_times_are_skipped_not_piled_up(store: Store) -> None:
    deploy(store, '[schedule]\ncron = "* * * * *"\n')
    clock = Clock()
    tick, events = ticker(store, clock)
    await tick.tick()
    clock.now = T0 + 30 + 5 * 60 + 10  # down for five minutes: six due times passed
    [fired] = await tick.tick()
    assert fired.outcome == "started" and fired.due_at == T0 + 330
    assert fired.skipped_count == 5
    assert len(invocations(store)) == 1
    dues = [dict(e.attrs)["due_at"] for e in events.since(kinds=[EventKind.SCHEDULE_SKIPPED])]
    assert dues == [str(T0 + 30 + 60 * i) for i in range(5)]


async def test_a_due_time_found_past_the_grace_is_skipped(store: Store) -> None:
    deploy(store, '[schedule]\ncron = "0 * * * *"\n')
    clock = Clock()
    tick, events = ticker(store, clock)
    await tick.tick()
    clock.now = T0 + 3661  # 13:01:31, the 13:00 run found 91 s late
    [fired] = await tick.tick()
    assert fired.outcome == "skipped" and "grace" in fired.reason
    assert invocations(store) == []
    [event] = events.since()
    assert event.kind is EventKind.SCHEDULE_SKIPPED and event.function == "acme/tick"
    [view] = tick.book.of_tenant("acme")
    assert view.next_run_at == T0 + 7170  # 14:00


async def test_redeploy_changes_and_removes_schedules(store: Store) -> None:
    deploy(store, '[[schedule]]\ncron = "0 * * * *"\n[[schedule]]\ncron = "*/5 * * * *"\n')
    clock = Clock()
    tick, _ = ticker(store, clock)
    await tick.tick()
    assert [v.cron for v in tick.book.of_tenant("acme")] == ["0 * * * *", "*/5 * * * *"]
    deploy(store, '[schedule]\ncron = "30 * * * *"\nenabled = false\n')
    await tick.tick()
    [view] = tick.book.of_tenant("acme")
    assert view.cron == "30 * * * *" and view.next_run_at is None
    deploy(store, "")
    await tick.tick()
    assert tick.book.of_tenant("acme") == []


async def test_a_refused_input_is_recorded_not_retried(store: Store) -> None:
    deploy(store, '[schedule]\ncron = "* * * * *"\ninput = {n = "three"}\n')
    clock = Clock()
    tick, events = ticker(store, clock, SCHEMA)
    await tick.tick()
    clock.now = T0 + 31
    [fired] = await tick.tick()
    assert fired.outcome == "refused"
    [inv] = invocations(store)
    assert (inv.state, inv.result_status, inv.error_code) == ("failed", 422, "invalid_input")
    assert json.loads(inv.result_body or b"")["error"]["field"] == "n"
    assert [e.kind for e in events.since()] == [EventKind.SCHEDULE_REFUSED]
    # The next due time is another try, not a pile of retries of this one.
    assert await tick.tick() == []


@pytest.mark.parametrize(("given", "field"), [({}, "n"), ({"n": "x"}, "n")])
def test_check_input_names_the_field(given: dict[str, object], field: str) -> None:
    refusal = check_input(SCHEMA, json.dumps(given))
    assert refusal is not None and refusal.status == 422
    assert json.loads(refusal.body)["error"]["field"] == field
    assert check_input(SCHEMA, '{"n": 1}') is None
    assert check_input("", '{"n": "x"}') is None



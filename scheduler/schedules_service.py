"""A tenant's cron schedules as the Invocations service's ListSchedules answers them
(docs/schedules.md): each one's timing from the schedules table (schedules.py) with
its last due time's outcome, which for a run is the state its invocation is in now."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from thaw.core.errors import InvalidArgument
from thaw.proto import invocations_pb2
from thaw.scheduler import models
from thaw.scheduler.invocations import effective_state
from thaw.scheduler.schedules import ScheduleBook, ScheduleView
from thaw.scheduler.store import Store

# The outcome the schedules table records when a due time queued its run; the run's
# own state says more.
STARTED = "started"


def list_schedules(store: Store, clock: Callable[[], float], tenant: str, function: str
                   ) -> list[invocations_pb2.Schedule]:
    """The tenant's schedules (one function's when `function` is set), ordered by
    function and position."""
    if not tenant:
        raise InvalidArgument("listing schedules needs a tenant", field="tenant")
    views = ScheduleBook(store, clock).of_tenant(tenant, function)
    run_ids = [v.last_invocation_id for v in views
               if v.last_outcome == STARTED and v.last_invocation_id]
    now = clock()

    def tx(s: Session) -> dict[str, str]:
        rows = s.scalars(select(models.Invocation).where(
            models.Invocation.id.in_(run_ids), models.Invocation.tenant_id == tenant))
        return {row.id: effective_state(row, now).value for row in rows}
    states = store._tx(tx) if run_ids else {}
    return [schedule_proto(v, states) for v in views]


def schedule_proto(v: ScheduleView, run_states: dict[str, str]
                   ) -> invocations_pb2.Schedule:
    outcome = v.last_outcome
    if outcome == STARTED:
        # A run whose row was swept long after it expired reads as expired.
        outcome = run_states.get(v.last_invocation_id, "expired")
    return invocations_pb2.Schedule(
        id=v.id, function=v.function, position=v.position, cron=v.cron,
        timezone=v.timezone, enabled=v.enabled, input_json=v.input_json,
        next_run_at=v.next_run_at or 0.0, last_due_at=v.last_due_at or 0.0,
        last_run_at=v.last_run_at or 0.0, last_outcome=outcome,
        last_invocation_id=v.last_invocation_id)

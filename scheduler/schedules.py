"""Functions' cron schedules in the metadata DB (`[schedule]`, core/schedule_spec.py;
docs/schedules.md): kept in step with each function's serving version, and fired at
their due times as stored invocations that the gateways' runners claim like async
calls (scheduler/invocations.py). The loop that drives this is schedule_ticker.py.

A due time is handled once, whoever ticks: the tick that moves a schedule's
`next_run_at` on (a compare-and-set UPDATE) is the one that creates its invocation, in
the same transaction. Runs are never piled up: of the due times passed since the last
tick only the newest may run, and only within the grace; the others are skipped, as is
a due time whose previous run still runs or whose function is not ready.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from thaw.core.priority import PRIORITY_DEFAULT
from thaw.core.schedule_spec import Schedule, due_times, next_run
from thaw.scheduler import models
from thaw.scheduler.invocations import InvocationState, new_invocation_id
from thaw.scheduler.states import FunctionState
from thaw.scheduler.store import Store, spec_from_json

SOURCE_SCHEDULE = "schedule"
# Skipped due times counted at one tick, at most (a schedule idle for a year at one a
# minute is still one bounded walk); past it the count says "at least".
MAX_SKIPPED_COUNTED = 10_000
JSON_HEADERS = json.dumps({"Content-Type": "application/json"})


def schedule_id(tenant: str, function: str, position: int) -> str:
    """Stable across redeploys, so a schedule keeps its last run."""
    digest = hashlib.sha256(f"{tenant}/{function}/{position}".encode()).hexdigest()
    return f"sch_{digest[:24]}"


@dataclass(frozen=True)
class ScheduleView:
    id: str
    tenant: str
    function: str
    position: int
    cron: str
    timezone: str
    input_json: str
    enabled: bool
    next_run_at: float | None
    last_due_at: float | None
    last_run_at: float | None
    last_outcome: str
    last_invocation_id: str


def view_of(row: models.Schedule) -> ScheduleView:
    return ScheduleView(
        id=row.id, tenant=row.tenant_id, function=row.function_name, position=row.position,
        cron=row.cron, timezone=row.timezone, input_json=row.input_json,
        enabled=row.enabled, next_run_at=row.next_run_at, last_due_at=row.last_due_at,
        last_run_at=row.last_run_at, last_outcome=row.last_outcome,
        last_invocation_id=row.last_invocation_id or "")


@dataclass(frozen=True)
class Refusal:
    """The schedule's input is not what the function takes (its typed inputs)."""

    status: int
    body: bytes
    message: str


@dataclass(frozen=True)
class Firing:
    """What one tick did with one schedule's due times."""

    schedule: ScheduleView
    due_at: float
    """The newest due time passed: the one run (or skipped with `reason`)."""
    outcome: str
    """started | skipped | refused"""
    invocation_id: str = ""
    reason: str = ""
    skipped: tuple[float, ...] = ()
    """Older due times passed since the last tick, skipped (the first ones)."""
    skipped_count: int = 0
    """All of them, counted up to MAX_SKIPPED_COUNTED."""


class ScheduleBook:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._synced: dict[tuple[str, str], tuple[int, str]] = {}
        """(tenant, function) -> (version, state) this book last synced."""

    # -- kept in step with the functions

    def sync(self, now: float) -> None:
        """Each function's schedules as its serving version declares them: a deploy,
        rollback or delete changes them here at the next tick."""
        def tx(s: Session) -> dict[tuple[str, str], tuple[int, str]]:
            fn = models.Function
            live = {(t, n): (v, st) for t, n, v, st in s.execute(
                select(fn.tenant_id, fn.name, fn.version, fn.state)
                .where(fn.state != FunctionState.DELETED.value))}
            for (tenant, name), (version, state) in live.items():
                if self._synced.get((tenant, name)) == (version, state):
                    continue
                spec_json = s.scalar(select(fn.spec_json).where(fn.tenant_id == tenant,
                                                                fn.name == name))
                schedules = spec_from_json(spec_json).schedules if spec_json else ()
                self._sync_function(s, tenant, name, version, schedules, now)
            sched = models.Schedule
            kept = {(t, n) for t, n in s.execute(
                select(sched.tenant_id, sched.function_name).distinct())}
            for tenant, name in kept - set(live):
                s.execute(delete(sched).where(sched.tenant_id == tenant,
                                              sched.function_name == name))
            return live
        live = self.store._tx(tx)
        # Remembered only once the transaction committed.
        self._synced = live

    def _sync_function(self, s: Session, tenant: str, name: str, version: int,
                       schedules: tuple[Schedule, ...], now: float) -> None:
        sched = models.Schedule
        rows = {r.position: r for r in s.scalars(select(sched).where(
            sched.tenant_id == tenant, sched.function_name == name))}
        for position, spec in enumerate(schedules):
            row = rows.pop(position, None)
            if row is None:
                row = models.Schedule(id=schedule_id(tenant, name, position),
                                      tenant_id=tenant, function_name=name,
                                      position=position, last_outcome="")
                s.add(row)
            timing_changed = (row.cron, row.timezone, row.enabled) != (
                spec.cron, spec.timezone, spec.enabled)
            row.version, row.input_json = version, spec.input_json
            row.cron, row.timezone, row.enabled = spec.cron, spec.timezone, spec.enabled
            if timing_changed or row.next_run_at is None and spec.enabled:
                row.next_run_at = next_run(spec.cron, spec.timezone, now) if spec.enabled \
                    else None
            row.updated_at = now
        for row in rows.values():
            s.delete(row)

    # -- read

    def of_tenant(self, tenant: str, function: str = "") -> list[ScheduleView]:
        def tx(s: Session) -> list[ScheduleView]:
            q = select(models.Schedule).where(models.Schedule.tenant_id == tenant)
            if function:
                q = q.where(models.Schedule.function_name == function)
            q = q.order_by(models.Schedule.function_name, models.Schedule.position)
            return [view_of(r) for r in s.scalars(q)]
        return self.store._tx(tx)

    def due(self, now: float) -> list[ScheduleView]:
        def tx(s: Session) -> list[ScheduleView]:
            sched = models.Schedule
            return [view_of(r) for r in s.scalars(select(sched).where(
                sched.enabled.is_(True), sched.next_run_at <= now))]
        return self.store._tx(tx)

    # -- fire

    def fire(self, seen: ScheduleView, now: float, grace: float, ttl: float,
             refusal: Refusal | None = None) -> Firing | None:
        """Handle the due times of `seen` passed by `now`: claim them (None when
        another tick did), then run the newest (a queued invocation, or a failed one
        holding `refusal`) or skip it, and skip the older ones."""
        if seen.next_run_at is None or seen.next_run_at > now:
            return None
        first = seen.next_run_at
        later = due_times(seen.cron, seen.timezone, first, now, MAX_SKIPPED_COUNTED)
        dues = [first, *later]
        newest, older = dues[-1], dues[:-1]

        def tx(s: Session) -> Firing | None:
            sched = models.Schedule
            won = s.execute(update(sched).where(sched.id == seen.id,
                                                sched.next_run_at == first)
                            .values(next_run_at=next_run(seen.cron, seen.timezone, now),
                                    last_due_at=newest, updated_at=now)
                            .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
            if not won:
                return None
            row = s.get(sched, seen.id)
            assert row is not None
            reason = self._skip_reason(s, row, newest, now, grace)
            firing = Firing(schedule=view_of(row), due_at=newest, outcome="skipped",
                            reason=reason, skipped=tuple(older[:10]),
                            skipped_count=len(older))
            row.last_outcome = "skipped"
            if reason:
                return firing
            inv = self._invocation(s, row, newest, now, ttl, refusal)
            row.last_outcome = "refused" if refusal else "started"
            row.last_run_at = now
            row.last_invocation_id = inv.id
            return Firing(schedule=view_of(row), due_at=newest, outcome=row.last_outcome,
                          invocation_id=inv.id,
                          reason=refusal.message if refusal else "",
                          skipped=firing.skipped, skipped_count=firing.skipped_count)
        return self.store._tx(tx)

    @staticmethod
    def _skip_reason(s: Session, row: models.Schedule, due: float, now: float,
                     grace: float) -> str:
        fn = s.scalar(select(models.Function.state).where(
            models.Function.tenant_id == row.tenant_id,
            models.Function.name == row.function_name))
        if fn != FunctionState.READY.value:
            return f"the function is {fn or 'gone'}, not ready"
        if now - due > grace:
            return (f"missed by {now - due:.0f} s, past the grace of {grace:.0f} s "
                    "(the scheduler was not running)")
        if row.last_invocation_id:
            last = s.get(models.Invocation, row.last_invocation_id)
            if last is not None and last.state in (InvocationState.QUEUED.value,
                                                   InvocationState.RUNNING.value):
                return f"its previous run {last.id} is still {last.state}"
        return ""

    @staticmethod
    def _invocation(s: Session, row: models.Schedule, due: float, now: float, ttl: float,
                    refusal: Refusal | None) -> models.Invocation:
        priority = s.scalar(select(models.Function.priority).where(
            models.Function.tenant_id == row.tenant_id,
            models.Function.name == row.function_name))
        inv = models.Invocation(
            id=new_invocation_id(), tenant_id=row.tenant_id, function_name=row.function_name,
            state=InvocationState.QUEUED.value, priority=priority or PRIORITY_DEFAULT,
            path="", request_body=row.input_json.encode(),
            request_content_type="application/json", request_headers_json=JSON_HEADERS,
            timeout_seconds=0.0, webhook_url="", webhook_state="", idempotency_key=None,
            request_digest="", key_id="", created_at=now, source=SOURCE_SCHEDULE,
            schedule_id=row.id)
        if refusal is not None:
            # Recorded as the call's answer, never retried: the next due time tries
            # again with what the function then takes.
            inv.state = InvocationState.FAILED.value
            inv.result_status = refusal.status
            inv.result_content_type = "application/json"
            inv.result_body = refusal.body
            inv.result_bytes = len(refusal.body)
            inv.error_code = "invalid_input"
            inv.error_message = refusal.message
            inv.started_at = inv.finished_at = now
            inv.expires_at = now + ttl
        s.add(inv)
        return inv

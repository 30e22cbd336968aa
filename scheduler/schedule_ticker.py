"""The loop that runs functions' cron schedules (schedules.py holds them): every tick it
brings them in step with the serving versions, then fires those due, checking each
run's input against the function's typed inputs first, and records what it did as
events (schedule_ran, schedule_skipped, schedule_refused)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from thaw.scheduler.events import EventKind, EventLog
from thaw.scheduler.schedules import Firing, Refusal, ScheduleBook, ScheduleView

log = structlog.get_logger()

# A refused run's record is kept as long as the gateway keeps results by default
# (GatewayFields.result_ttl_seconds).
REFUSED_RESULT_TTL_SECONDS = 86_400.0
# Skipped due times recorded one event each; the rest of them in one more event.
SKIP_EVENTS = 10


def when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def check_input(schema_json: str, input_json: str) -> Refusal | None:
    """A refusal when the function declares typed inputs and the input breaks them."""
    if not schema_json:
        return None
    try:
        schema = json.loads(schema_json)
        validator = Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(json.loads(input_json)),
                        key=lambda e: list(e.absolute_path))
    except (ValueError, SchemaError):
        return None  # a schema the platform cannot read checks nothing, as at the gateway
    if not errors:
        return None
    first = errors[0]
    field = ".".join(str(p) for p in first.absolute_path)
    if not field and first.validator == "required" and isinstance(first.instance, dict):
        field = next((str(n) for n in first.validator_value if n not in first.instance), "")
    field = field or "input"
    message = f"the schedule's input does not fit the function's inputs: {first.message}"
    body = json.dumps({"error": {"code": "invalid_input", "message": message,
                                 "field": field}}).encode()
    return Refusal(status=422, body=body, message=message)


class ScheduleTicker:
    def __init__(self, book: ScheduleBook, events: EventLog,
                 input_schema: Callable[[str, str], Awaitable[str]], *,
                 grace_seconds: float, clock: Callable[[], float] = time.time,
                 clock_file: str = "") -> None:
        self.book = book
        self.events = events
        self.input_schema = input_schema
        self.grace = grace_seconds
        self.clock = clock
        self.clock_file = Path(clock_file) if clock_file else None

    async def now(self) -> float:
        """The clock schedules run by: the real one, plus the test clock file's offset."""
        if self.clock_file is None:
            return self.clock()
        try:
            offset = float(await asyncio.to_thread(self.clock_file.read_text) or 0)
        except (OSError, ValueError):
            offset = 0.0
        return self.clock() + offset

    async def tick(self) -> list[Firing]:
        now = await self.now()
        store = self.book.store
        await store.run(self.book.sync, now)
        fired = []
        for seen in await store.run(self.book.due, now):
            refusal = check_input(await self._schema(seen), seen.input_json)
            firing = await store.run(self.book.fire, seen, now, self.grace,
                                     REFUSED_RESULT_TTL_SECONDS, refusal)
            if firing is not None:
                self._record(firing)
                fired.append(firing)
        return fired

    async def _schema(self, seen: ScheduleView) -> str:
        try:
            return await self.input_schema(seen.tenant, seen.function)
        except Exception:  # noqa: BLE001 - the run goes on unchecked, as without a schema
            log.warning("input schema unreadable for a schedule", schedule=seen.id)
            return ""

    def _record(self, f: Firing) -> None:
        sched = f.schedule
        function = f"{sched.tenant}/{sched.function}"
        common = {"schedule": sched.id, "cron": sched.cron}
        for due in f.skipped[:SKIP_EVENTS]:
            self.events.emit(EventKind.SCHEDULE_SKIPPED,
                             f"due time {when(due)} skipped: a later one passed too",
                             function=function, due_at=due, **common)
        more = f.skipped_count - min(len(f.skipped), SKIP_EVENTS)
        if more > 0:
            self.events.emit(EventKind.SCHEDULE_SKIPPED,
                             f"{more} more due times before {when(f.due_at)} skipped",
                             function=function, due_at=f.due_at, count=more, **common)
        if f.outcome == "skipped":
            self.events.emit(EventKind.SCHEDULE_SKIPPED,
                             f"due time {when(f.due_at)} skipped: {f.reason}",
                             function=function, due_at=f.due_at, **common)
        elif f.outcome == "refused":
            self.events.emit(EventKind.SCHEDULE_REFUSED,
                             f"due time {when(f.due_at)} not run: {f.reason}",
                             function=function, due_at=f.due_at,
                             invocation=f.invocation_id, **common)
        else:
            self.events.emit(EventKind.SCHEDULE_RAN,
                             f"due time {when(f.due_at)}: invocation {f.invocation_id}",
                             function=function, due_at=f.due_at,
                             invocation=f.invocation_id, **common)

    async def run_forever(self, interval: float) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the next tick tries again
                log.exception("schedule tick failed")
            await asyncio.sleep(interval)

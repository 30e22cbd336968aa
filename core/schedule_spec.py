"""thaw.toml's `[schedule]` table (or `[[schedule]]` tables): the function runs on a
cron schedule, each run a stored invocation with the schedule's input as its JSON body
(scheduler/schedules.py runs them; docs/schedules.md).

Cron expressions have five fields (minute hour day-of-month month day-of-week) and are
read by cronsim, in the schedule's time zone (DST handled as cron does: a skipped
local time runs once at the next existing one, a repeated one once).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from thaw.core.errors import InvalidBundle

MAX_SCHEDULES = 8
MAX_CRON_LENGTH = 256
# A schedule's input is a call's body, kept in the function's record: small.
MAX_INPUT_BYTES = 64 * 1024
DEFAULT_TIMEZONE = "UTC"
CRON_FIELDS = 5


def check_cron(expression: str) -> str:
    """The expression, stripped, if it is a valid 5-field cron expression; else
    ValueError saying what is wrong."""
    text = " ".join(expression.split())
    if len(text.split(" ")) != CRON_FIELDS:
        raise ValueError(f"{expression!r} is not a cron expression: it needs 5 fields "
                         "(minute hour day-of-month month day-of-week)")
    try:
        CronSim(text, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"{expression!r} is not a cron expression: {exc}") from exc
    return text


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; ValueError when there is none by that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{name!r} is not a time zone (an IANA name like "
                         "'Europe/Paris' or 'UTC')") from exc


def due_times(cron: str, timezone: str, after: float, until: float, limit: int
              ) -> list[float]:
    """The due times (Unix seconds) in (after, until], oldest first, at most `limit`
    of them (the first ones)."""
    times: list[float] = []
    start = datetime.fromtimestamp(math.floor(after), tz=zone(timezone))
    for moment in CronSim(cron, start):
        due = moment.timestamp()
        if due <= after:
            continue
        if due > until or len(times) >= limit:
            break
        times.append(due)
    return times


def next_run(cron: str, timezone: str, after: float) -> float:
    """The first due time (Unix seconds) strictly after `after`."""
    start = datetime.fromtimestamp(math.floor(after), tz=zone(timezone))
    for moment in CronSim(cron, start):
        if moment.timestamp() > after:
            return moment.timestamp()
    raise ValueError(f"{cron!r} never runs")  # pragma: no cover - cronsim iterates forever


@dataclass(frozen=True)
class Schedule:
    cron: str
    """Five cron fields, in `timezone`."""
    input_json: str = "{}"
    """The body of each run: a JSON object, as text."""
    timezone: str = DEFAULT_TIMEZONE
    enabled: bool = True
    """False: kept in the spec, never run."""

    @property
    def input(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.input_json)
        return value

    def next_after(self, after: float) -> float:
        return next_run(self.cron, self.timezone, after)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        return cls(cron=str(data["cron"]), input_json=str(data.get("input_json", "{}")),
                   timezone=str(data.get("timezone", DEFAULT_TIMEZONE)),
                   enabled=bool(data.get("enabled", True)))


class ScheduleDoc(BaseModel):
    """A cron schedule: each due time runs the function as a stored invocation."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, title="schedule")

    cron: str = Field(max_length=MAX_CRON_LENGTH,
                      description='Five cron fields: minute hour day-of-month month '
                                  'day-of-week, e.g. "*/5 * * * *"')
    input: dict[str, Any] = Field(
        default_factory=dict,
        description="The JSON body of each run (checked against the function's typed "
                    "inputs when it runs)")
    timezone: str = Field(default=DEFAULT_TIMEZONE, max_length=64,
                          description="IANA time zone the cron fields are read in")
    enabled: bool = Field(default=True, description="false: kept, never run")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("input")
    @classmethod
    def _input(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must hold only JSON values (strings, numbers, booleans, "
                             f"arrays, tables): {exc}") from exc
        if len(text.encode()) > MAX_INPUT_BYTES:
            raise ValueError(f"is over {MAX_INPUT_BYTES} bytes as JSON")
        return value

    def spec(self) -> Schedule:
        return Schedule(cron=self.cron, input_json=json.dumps(self.input, sort_keys=True),
                        timezone=self.timezone, enabled=self.enabled)


def as_list(value: object) -> object:
    """`[schedule]` (one table) read as a list of one, like `[[schedule]]`."""
    return [value] if isinstance(value, dict) else value


def one_or_many(schema: dict[str, Any]) -> None:
    """The `schedule` key's JSON Schema: a table, or an array of tables."""
    array = {key: schema.pop(key) for key in list(schema) if key not in ("description",
                                                                           "title")}
    schema["anyOf"] = [array["items"], array]


def table_key(problem: InvalidBundle, doc: dict[str, Any]) -> InvalidBundle:
    """A refusal inside a single `[schedule]` table named as written
    (`schedule.cron`, not `schedule.0.cron`)."""
    field = problem.field or ""
    if not isinstance(doc.get("schedule"), dict) or not field.startswith("schedule.0"):
        return problem
    fixed = "schedule" + field[len("schedule.0"):]
    return InvalidBundle(problem.message.replace(field, fixed, 1), field=fixed)

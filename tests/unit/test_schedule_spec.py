"""[schedule] in thaw.toml: cron checked with the field named, due times computed in
the schedule's time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from thaw.core.errors import InvalidBundle
from thaw.core.schedule_spec import check_cron, due_times, next_run
from thaw.core.spec import FunctionSpec, parse_spec

HEAD = 'name = "tick"\nhandler = "app:Tick"\n'


def at(*parts: int, tz: str = "UTC") -> float:
    return datetime(*parts, tzinfo=ZoneInfo(tz)).timestamp()  # type: ignore[misc]


def test_one_table_is_one_schedule_with_its_input() -> None:
    spec = parse_spec(HEAD + '[schedule]\ncron = "*/5 * * * *"\ninput = {n = 3, who = "x"}\n')
    assert len(spec.schedules) == 1
    sched = spec.schedules[0]
    assert sched.cron == "*/5 * * * *"
    assert sched.input == {"n": 3, "who": "x"}
    assert sched.timezone == "UTC" and sched.enabled
    assert FunctionSpec.from_dict(spec.to_dict()) == spec


def test_several_schedules_in_file_order() -> None:
    spec = parse_spec(HEAD + '[[schedule]]\ncron = "0 * * * *"\n'
                             '[[schedule]]\ncron = "30 2 * * 1"\ntimezone = "Europe/Paris"\n'
                             'enabled = false\n')
    assert [s.cron for s in spec.schedules] == ["0 * * * *", "30 2 * * 1"]
    assert spec.schedules[1].timezone == "Europe/Paris"
    assert not spec.schedules[1].enabled
    assert parse_spec(HEAD).schedules == ()


@pytest.mark.parametrize(("body", "field", "said"), [
    ('[schedule]\ncron = "61 * * * *"\n', "schedule.cron", "not a cron expression"),
    ('[schedule]\ncron = "* * * *"\n', "schedule.cron", "5 fields"),
    ('[schedule]\ncron = "* * * * * *"\n', "schedule.cron", "5 fields"),
    ('[[schedule]]\ncron = "* * * * *"\n[[schedule]]\ncron = "nope"\n', "schedule.1.cron",
     "not a cron expression"),
    ('[schedule]\ncron = "* * * * *"\ntimezone = "Mars/Base"\n', "schedule.timezone",
     "time zone"),
    ('[schedule]\ncron = "* * * * *"\ninput = {d = 1979-05-27}\n', "schedule.input",
     "JSON values"),
    ('[schedule]\ncron = "* * * * *"\nevery = "5m"\n', "schedule.every", "unknown key"),
    ('[schedule]\ninput = {}\n', "schedule.cron", "required"),
])
def test_bad_schedule_names_its_field(body: str, field: str, said: str) -> None:
    with pytest.raises(InvalidBundle) as caught:
        parse_spec(HEAD + body)
    assert caught.value.field == field
    assert said in caught.value.message


def test_check_cron_normalises_spaces() -> None:
    assert check_cron("  */5   *  * * * ") == "*/5 * * * *"


def test_next_run_is_strictly_after() -> None:
    assert next_run("*/5 * * * *", "UTC", at(2026, 1, 1, 0, 3)) == at(2026, 1, 1, 0, 5)
    # On a due time exactly, the next one is the one after it.
    assert next_run("*/5 * * * *", "UTC", at(2026, 1, 1, 0, 5)) == at(2026, 1, 1, 0, 10)
    assert next_run("* * * * *", "UTC", at(2026, 1, 1, 0, 5) + 0.5) == at(2026, 1, 1, 0, 6)


def test_cron_fields_are_read_in_the_time_zone() -> None:
    # 09:00 in Paris is 08:00 UTC in winter, 07:00 UTC in summer.
    winter = next_run("0 9 * * *", "Europe/Paris", at(2026, 1, 10))
    summer = next_run("0 9 * * *", "Europe/Paris", at(2026, 7, 10))
    assert datetime.fromtimestamp(winter, UTC).hour == 8
    assert datetime.fromtimestamp(summer, UTC).hour == 7


def test_due_times_in_a_window_are_bounded() -> None:
    start = at(2026, 1, 1, 0, 0)
    assert due_times("* * * * *", "UTC", start, start + 180, 10) == [
        start + 60, start + 120, start + 180]
    assert due_times("* * * * *", "UTC", start, start + 3600, 2) == [start + 60, start + 120]
    assert due_times("0 0 1 1 *", "UTC", start, start + 3600, 10) == []

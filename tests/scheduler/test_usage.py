"""Metering at the scheduler (scheduler/usage.py): records in, hourly sums kept in the
same transaction, sums per function, day and hour out; on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from thaw.core.errors import InvalidArgument
from thaw.proto import usage_pb2
from thaw.scheduler.store import Store
from thaw.scheduler.usage import DAY, HOUR, GiB, UsageStore

# 2030-01-01T00:00:00Z, a Tuesday: hours and days start on round numbers.
T0 = 1_893_456_000


def rec(usage_id: str, ended_at: float, *, function: str = "f", tenant: str = "t",
        wall: float = 1.0, memory: int = GiB, share: float = 0.25, start: str = "warm",
        status: int = 200, outcome: str = "answered", bytes_in: int = 10,
        bytes_out: int = 20, queue: float = 0.0, restore: float = 0.0
        ) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        usage_id=usage_id, invocation_id="inv-" + usage_id, tenant=tenant,
        function=function, start=start, status=status, outcome=outcome,
        ended_at=ended_at, wall_seconds=wall, queue_seconds=queue,
        restore_seconds=restore, gpu_memory_bytes=memory, compute_share=share,
        bytes_in=bytes_in, bytes_out=bytes_out)


@pytest.fixture
def usage(store: Store) -> UsageStore:
    return UsageStore(store)


def test_hours_days_and_functions_add_up(usage: UsageStore) -> None:
    records = [
        # f: two in the first hour (one a restore that failed), one in the next hour.
        rec("a", T0 + 10, wall=2.0, memory=2 * GiB, bytes_in=100, bytes_out=1000),
        rec("b", T0 + HOUR - 0.001, wall=0.5, memory=2 * GiB, start="restore",
            status=500, restore=1.5, queue=0.25),
        rec("c", T0 + HOUR, wall=1.0, memory=2 * GiB),
        # g: the next day, cut off by its client, no GPU.
        rec("d", T0 + DAY + 5, function="g", wall=4.0, memory=0, share=0.0,
            outcome="aborted", start="fresh"),
        # another tenant's: never in t's sums.
        rec("e", T0 + 20, tenant="other", wall=100.0),
    ]
    assert usage.record(records) == (5, 0)

    by_hour = usage.query("t", T0, T0 + 2 * HOUR, "hour")
    assert [row.start for row in by_hour.rows] == [T0, T0 + HOUR]
    assert [row.key for row in by_hour.rows] == ["2030-01-01T00:00:00Z",
                                                 "2030-01-01T01:00:00Z"]
    first = by_hour.rows[0].sums
    assert (first.invocations, first.errors, first.cold_starts) == (2, 1, 1)
    assert first.wall_s == pytest.approx(2.5)
    assert first.gib_seconds == pytest.approx(2 * 2.0 + 2 * 0.5)
    assert first.compute_seconds == pytest.approx(0.25 * 2.5)
    assert (first.queue_s, first.restore_s) == (pytest.approx(0.25), pytest.approx(1.5))
    assert (first.bytes_in, first.bytes_out) == (110, 1020)
    assert by_hour.rows[1].sums.invocations == 1

    by_day = usage.query("t", T0, T0 + 2 * DAY, "day")
    assert [(row.key, row.sums.invocations) for row in by_day.rows] == [
        ("2030-01-01T00:00:00Z", 3), ("2030-01-02T00:00:00Z", 1)]
    assert by_day.rows[1].sums.errors == 1 and by_day.rows[1].sums.gib_seconds == 0.0

    by_function = usage.query("t", T0, T0 + 2 * DAY, "function")
    assert [(row.key, row.sums.invocations) for row in by_function.rows] == [("f", 3),
                                                                             ("g", 1)]
    assert by_function.rows[0].sums.gib_seconds == pytest.approx(2 * 3.5)
    assert by_function.rows[1].sums.wall_s == pytest.approx(4.0)
    for report in (by_day, by_function):
        assert report.totals.invocations == 4
        assert report.totals.wall_s == pytest.approx(7.5)
        assert report.totals.bytes_out == 1060

    only_g = usage.query("t", T0, T0 + 2 * DAY, "function", function="g")
    assert [row.key for row in only_g.rows] == ["g"]


def test_a_batch_sent_again_is_counted_once(usage: UsageStore) -> None:
    batch = [rec("a", T0 + 1), rec("b", T0 + 2)]
    assert usage.record(batch) == (2, 0)
    assert usage.record(batch) == (0, 2)
    # Partly new, with a duplicate inside the batch too.
    assert usage.record([rec("b", T0 + 2), rec("c", T0 + 3), rec("c", T0 + 3)]) == (1, 2)
    totals = usage.query("t", T0, T0 + HOUR, "function").totals
    assert totals.invocations == 3
    assert totals.wall_s == pytest.approx(3.0)


def test_a_range_counts_the_hours_it_overlaps(usage: UsageStore) -> None:
    usage.record([rec("a", T0 + 10), rec("b", T0 + 2 * HOUR + 10)])
    # From the middle of the first hour to the middle of the second: the first only.
    report = usage.query("t", T0 + HOUR / 2, T0 + HOUR + HOUR / 2, "hour")
    assert [row.start for row in report.rows] == [T0, T0 + HOUR]
    assert [row.sums.invocations for row in report.rows] == [1, 0]
    assert report.totals.invocations == 1
    assert usage.query("t", T0 + 3 * HOUR, T0 + 4 * HOUR, "function").rows == ()


@pytest.mark.parametrize(("from_time", "to_time", "group_by", "field"), [
    (T0, T0, "day", "to"),
    (T0 + 10, T0, "day", "to"),
    (-1.0, T0, "day", "from"),
    (T0, float("inf"), "day", "to"),
    (T0, T0 + 400 * DAY, "day", "from"),
    (T0, T0 + HOUR, "week", "group_by"),
])
def test_bad_queries_name_their_field(usage: UsageStore, from_time: float, to_time: float,
                                      group_by: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        usage.query("t", from_time, to_time, group_by)
    assert caught.value.field == field


def test_bad_records_are_refused_whole(usage: UsageStore) -> None:
    with pytest.raises(InvalidArgument):
        usage.record([rec("a", T0), rec("b", T0, wall=-1.0)])
    with pytest.raises(InvalidArgument):
        usage.record([rec("", T0)])
    assert usage.query("t", T0, T0 + HOUR, "function").totals.invocations == 0

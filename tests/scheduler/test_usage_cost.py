"""Stored costs (scheduler/usage.py): each record's cost is kept as it came and summed
exactly, as integers, per function, day and hour; on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from thaw.proto import usage_pb2
from thaw.scheduler import models
from thaw.scheduler.store import Store
from thaw.scheduler.usage import DAY, HOUR, UsageStore

T0 = 1_893_456_000  # 2030-01-01T00:00:00Z


def rec(usage_id: str, ended_at: float, cost: int, function: str = "f"
        ) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        usage_id=usage_id, invocation_id="inv-" + usage_id, tenant="t", function=function,
        start="warm", status=200, outcome="answered", ended_at=ended_at,
        wall_seconds=1.0, cost_nanos=cost)


@pytest.fixture
def usage(store: Store) -> UsageStore:
    return UsageStore(store)


def test_costs_are_stored_per_call_and_summed_exactly(usage: UsageStore) -> None:
    big = 9 * 10**15  # 9 million currency units in nanos: past a double's exact range
    records = [rec("a", T0 + 10, big + 1), rec("b", T0 + HOUR + 1, 2),
               rec("c", T0 + DAY + 5, 7, function="g")]
    assert usage.record(records) == (3, 0)
    # Sent again (a lost answer): not counted twice.
    assert usage.record(records[:1]) == (0, 1)

    by_function = usage.query("t", T0, T0 + 2 * DAY, "function")
    assert [(r.key, r.sums.cost_nanos) for r in by_function.rows] == [("f", big + 3),
                                                                        ("g", 7)]
    assert by_function.totals.cost_nanos == big + 10
    by_day = usage.query("t", T0, T0 + 2 * DAY, "day")
    assert [r.sums.cost_nanos for r in by_day.rows] == [big + 3, 7]
    by_hour = usage.query("t", T0, T0 + 2 * HOUR, "hour")
    assert [r.sums.cost_nanos for r in by_hour.rows] == [big + 1, 2]
    assert by_hour.rows[0].sums.to_proto().cost_nanos == big + 1

    def stored(s: object) -> dict[str, int]:
        rows = s.execute(select(models.Usage.usage_id, models.Usage.cost_nanos))  # type: ignore[attr-defined]
        return {r.usage_id: r.cost_nanos for r in rows}
    assert usage.store._tx(stored) == {"a": big + 1, "b": 2, "c": 7}

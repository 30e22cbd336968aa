"""Metering at the scheduler: the gateway's usage records in, sums per function and
period out (proto/usage.proto).

A record arrives priced: its cost (integer nano-units, core/prices.py) was computed by
the gateway that metered it, at that gateway's prices, and is stored as it came, so a
price change never rewrites the cost of calls already metered.

Each record is stored once (keyed by the gateway-made usage_id, so a batch the gateway
sends again after a lost answer is not counted twice) and, in the same transaction,
added to its (tenant, function, UTC hour) row of usage_hourly. Queries read only the
hourly rows: their resolution is one hour.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import grpc
from sqlalchemy import Select, SQLColumnExpression, Table, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from thaw.core.errors import InvalidArgument
from thaw.core.grpcutil import servicer_method
from thaw.proto import usage_pb2, usage_pb2_grpc
from thaw.scheduler import models
from thaw.scheduler.store import Store

HOUR = 3600
DAY = 86_400
GiB = 1024**3
GROUPINGS = ("function", "day", "hour")
# A query spans at most this much (with group_by=hour: 8 784 rows at most).
MAX_RANGE_SECONDS = 366 * DAY
# Bound of one RecordUsage batch; the gateway sends at most this many (gateway/usage.py
# RECORDS_PER_BATCH must stay at or below it).
MAX_BATCH_RECORDS = 5000
# Ids looked up per IN (...) clause (SQLite's default limit of bound parameters is 999).
IDS_PER_QUERY = 500
OUTCOMES = ("answered", "aborted", "broken")
COLD_STARTS = ("restore", "fresh")


@dataclass
class Sums:
    """What a group of invocations used."""

    invocations: int = 0
    errors: int = 0
    cold_starts: int = 0
    wall_s: float = 0.0
    queue_s: float = 0.0
    restore_s: float = 0.0
    gib_seconds: float = 0.0
    compute_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    cost_nanos: int = 0
    """Integer nano-units of the currency: summed exactly (core/prices.py)."""

    def add(self, other: Sums) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_proto(self, key: str = "", start: float = 0.0) -> usage_pb2.UsageRow:
        return usage_pb2.UsageRow(
            key=key, start=start, invocations=self.invocations, errors=self.errors,
            cold_starts=self.cold_starts, wall_seconds=self.wall_s,
            queue_seconds=self.queue_s, restore_seconds=self.restore_s,
            gib_seconds=self.gib_seconds, compute_seconds=self.compute_seconds,
            bytes_in=self.bytes_in, bytes_out=self.bytes_out, cost_nanos=self.cost_nanos)


SUM_COLUMNS = tuple(f.name for f in fields(Sums))


@dataclass(frozen=True)
class UsageRow:
    key: str
    """The function's name, or the period's start in ISO 8601 (UTC)."""
    start: float
    """The period's start (unix seconds); 0 for a function's row."""
    sums: Sums


@dataclass(frozen=True)
class UsageReport:
    rows: tuple[UsageRow, ...]
    totals: Sums


def hour_of(unix: float) -> int:
    return int(unix // HOUR) * HOUR


def iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record_row(r: usage_pb2.UsageRecord) -> dict[str, Any]:
    """A record as a usage_records row; refuses what no gateway would send."""
    if not r.usage_id or not r.tenant or not r.function:
        raise InvalidArgument("a usage record needs usage_id, tenant and function",
                              field="records")
    seconds = (r.ended_at, r.wall_seconds, r.queue_seconds, r.restore_seconds,
               r.compute_share)
    if not all(math.isfinite(x) and x >= 0 for x in seconds) or r.compute_share > 1:
        raise InvalidArgument(f"usage record {r.usage_id}: times must be finite and "
                              "not negative, compute_share within [0, 1]", field="records")
    outcome = r.outcome if r.outcome in OUTCOMES else "answered"
    return {
        "usage_id": r.usage_id[:64], "invocation_id": r.invocation_id[:128],
        "tenant": r.tenant[:64], "function": r.function[:63], "version": r.version[:32],
        "key_id": r.key_id[:64], "start": r.start[:16] or "warm", "status": r.status,
        "outcome": outcome, "ended_at": r.ended_at, "wall_s": r.wall_seconds,
        "queue_s": r.queue_seconds, "restore_s": r.restore_seconds,
        "gpu_memory_bytes": r.gpu_memory_bytes, "compute_share": r.compute_share,
        "gib_seconds": r.gpu_memory_bytes / GiB * r.wall_seconds,
        "compute_seconds": r.compute_share * r.wall_seconds,
        "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "cost_nanos": r.cost_nanos,
    }


def _sums_of(row: dict[str, Any]) -> Sums:
    failed = row["outcome"] != "answered" or row["status"] >= 400
    return Sums(invocations=1, errors=int(failed),
                cold_starts=int(row["start"] in COLD_STARTS), wall_s=row["wall_s"],
                queue_s=row["queue_s"], restore_s=row["restore_s"],
                gib_seconds=row["gib_seconds"], compute_seconds=row["compute_seconds"],
                bytes_in=row["bytes_in"], bytes_out=row["bytes_out"],
                cost_nanos=row["cost_nanos"])


def _sums_of_row(r: Any) -> Sums:
    # PostgreSQL sums BIGINT as NUMERIC: back to int and float here.
    sums = Sums()
    for f in fields(Sums):
        value = getattr(r, f.name) or 0
        setattr(sums, f.name, int(value) if f.type == "int" else float(value))
    return sums


def _batched(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class UsageStore:
    """usage_records and usage_hourly, on the scheduler's Store (its DB and thread pool)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, records: Sequence[usage_pb2.UsageRecord]) -> tuple[int, int]:
        """Store the records not stored yet and add them to their hours, in one
        transaction. Returns (new, duplicates)."""
        if len(records) > MAX_BATCH_RECORDS:
            raise InvalidArgument(f"at most {MAX_BATCH_RECORDS} records per batch",
                                  field="records")
        rows: dict[str, dict[str, Any]] = {}
        for r in records:
            row = _record_row(r)
            rows.setdefault(row["usage_id"], row)

        def tx(s: Session) -> tuple[int, int]:
            stored: set[str] = set()
            for ids in _batched(list(rows), IDS_PER_QUERY):
                stored.update(s.scalars(select(models.Usage.usage_id)
                                        .where(models.Usage.usage_id.in_(ids))))
            new = [row for usage_id, row in rows.items() if usage_id not in stored]
            if new:
                s.execute(insert(models.Usage), new)
                self._add_to_hours(s, new)
            return len(new), len(records) - len(new)
        try:
            return self.store._tx(tx)
        except IntegrityError:
            # Another transaction stored some of these ids between our look-up and our
            # insert (the same batch sent twice at once): again, they are found now.
            return self.store._tx(tx)

    @staticmethod
    def _add_to_hours(s: Session, rows: list[dict[str, Any]]) -> None:
        hours: dict[tuple[str, str, int], Sums] = {}
        for row in rows:
            key = (row["tenant"], row["function"], hour_of(row["ended_at"]))
            hours.setdefault(key, Sums()).add(_sums_of(row))
        values = [{"tenant": t, "function": f, "hour_start": h,
                   **{c: getattr(sums, c) for c in SUM_COLUMNS}}
                  for (t, f, h), sums in sorted(hours.items())]
        table = cast(Table, models.UsageHour.__table__)
        # INSERT ... ON CONFLICT DO UPDATE: the same statement on both back ends, atomic
        # against another gateway's batch for the same hour.
        dialect = s.get_bind().dialect.name
        if dialect == "postgresql":
            stmt: Any = postgresql.insert(table).values(values)
        elif dialect == "sqlite":
            stmt = sqlite.insert(table).values(values)
        else:  # pragma: no cover - the project supports these two
            raise InvalidArgument(f"metering needs SQLite or PostgreSQL, not {dialect}")
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant", "function", "hour_start"],
            set_={c: table.c[c] + stmt.excluded[c] for c in SUM_COLUMNS})
        s.execute(stmt)

    def query(self, tenant: str, from_time: float, to_time: float, group_by: str,
              function: str = "") -> UsageReport:
        """Sums per function, day or hour (UTC) of the hours that overlap
        [from_time, to_time). Days and hours without use are rows of zeros."""
        check_range(from_time, to_time)
        if group_by not in GROUPINGS:
            raise InvalidArgument(f"group_by must be one of {', '.join(GROUPINGS)}, "
                                  f"got {group_by!r}", field="group_by")
        h = models.UsageHour
        key: SQLColumnExpression[Any]
        if group_by == "function":
            key = h.function
        elif group_by == "hour":
            key = h.hour_start
        else:
            key = h.hour_start - h.hour_start % DAY
        stmt: Select[Any] = (
            select(key.label("k"), *(func.sum(getattr(h, c)).label(c) for c in SUM_COLUMNS))
            .where(h.tenant == tenant, h.hour_start > from_time - HOUR,
                   h.hour_start < to_time)
            .group_by(key).order_by(key))
        if function:
            stmt = stmt.where(h.function == function)

        def tx(s: Session) -> list[tuple[Any, Sums]]:
            return [(r.k, _sums_of_row(r)) for r in s.execute(stmt)]
        found = self.store._tx(tx)
        totals = Sums()
        for _, sums in found:
            totals.add(sums)
        if group_by == "function":
            rows = tuple(UsageRow(str(k), 0.0, sums) for k, sums in found)
        else:
            rows = _periods(dict((int(k), sums) for k, sums in found), from_time, to_time,
                            DAY if group_by == "day" else HOUR)
        return UsageReport(rows, totals)


def _periods(found: dict[int, Sums], from_time: float, to_time: float,
             step: int) -> tuple[UsageRow, ...]:
    """Every period from the one holding from_time to the one holding to_time's last
    instant, in order, zeros where nothing ran (a chart's x axis without gaps)."""
    start = int(from_time // step) * step
    rows = []
    while start < to_time:
        rows.append(UsageRow(iso(start), float(start), found.get(start, Sums())))
        start += step
    return tuple(rows)


def check_range(from_time: float, to_time: float) -> None:
    for name, value in (("from", from_time), ("to", to_time)):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{name} must be a time after 1970", field=name)
    if to_time <= from_time:
        raise InvalidArgument("to must be after from", field="to")
    if to_time - from_time > MAX_RANGE_SECONDS:
        raise InvalidArgument(f"from and to may be at most {MAX_RANGE_SECONDS // DAY} "
                              "days apart", field="from")


class MeteringService(usage_pb2_grpc.MeteringServicer):
    def __init__(self, usage: UsageStore) -> None:
        self.usage = usage

    @servicer_method
    async def RecordUsage(self, request: usage_pb2.RecordUsageRequest,
                          context: grpc.aio.ServicerContext
                          ) -> usage_pb2.RecordUsageResponse:
        new, duplicates = await self.usage.store.run(self.usage.record,
                                                     list(request.records))
        return usage_pb2.RecordUsageResponse(recorded=new, duplicates=duplicates)

    @servicer_method
    async def QueryUsage(self, request: usage_pb2.QueryUsageRequest,
                         context: grpc.aio.ServicerContext) -> usage_pb2.QueryUsageResponse:
        if not request.tenant:
            raise InvalidArgument("tenant is required", field="tenant")
        report = await self.usage.store.run(
            self.usage.query, request.tenant, request.from_time, request.to_time,
            request.group_by or "function", request.function)
        return usage_pb2.QueryUsageResponse(
            rows=[row.sums.to_proto(row.key, row.start) for row in report.rows],
            totals=report.totals.to_proto("total"))

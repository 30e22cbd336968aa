"""Metering: what each invocation used, and `GET /v1/usage` (JSON or CSV).

Measured here because the gateway sees every invocation end: the dispatcher tells the
meter of each exchange once it is settled (answered, cut off by the client or its
deadline, or broken), and the meter only appends a record to a list. A background
flusher prices the records (the function's slice size and compute share, cached per
function) and sends them to the scheduler's Metering service in batches, every
FLUSH_SECONDS or as soon as FLUSH_RECORDS are waiting. While the scheduler is away the
records wait in memory (at most MAX_PENDING, the oldest dropped past that) and are sent
again; each carries its own id, so a batch that arrived but whose answer was lost is
not counted twice. On shutdown the gateway sends what is left.

What a record holds (one per exchange with an instance; a call refused before it
reached one used nothing and is not metered):
- wall seconds: from the request leaving for the instance to the end of the answer
  (what the instance's slice was held for this call; the function's timeout counts
  from the same point);
- queue seconds (waiting for an instance) and restore seconds (the cold start: the
  lease's stages other than the queue), both before the wall time;
- GiB-seconds = the function's slice memory (resources.gpu_memory) x wall seconds;
- compute seconds = its compute share (resources.gpu_compute / 100; a GPU function
  that sets none has the whole device's share, 1) x wall seconds;
- bytes in (the request body) and out (the answer bytes relayed);
- cost: the call priced at this gateway's prices when it is priced, in integer
  nano-units (core/prices.py); stored with the record, so later price changes leave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import io
import itertools
import math
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import structlog
from aiohttp import web
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from thaw.core.errors import InvalidArgument, NotFound, ThawError, Unavailable
from thaw.core.grpcutil import call
from thaw.core.prices import FREE, Prices, cost_nanos, money, prices_of
from thaw.gateway.auth import require, require_operator
from thaw.gateway.caller import principal_of
from thaw.gateway.dispatch import Exchange, Settlement
from thaw.gateway.fnconfig import config_of
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY
from thaw.proto import usage_pb2, usage_pb2_grpc

log = structlog.get_logger()

# A batch leaves this often, or sooner once this many records wait. Few large batches:
# each flush costs the scheduler a burst of inserts on a core the invocation path
# shares, and every 1 s (500 records) it showed as +1.5 ms in the p99 of
# `thaw bench overhead`; every 5 s it is lost in the noise. GET /v1/usage sends what
# is waiting first, so a tenant never sees stale figures from this replica.
FLUSH_SECONDS = 5.0
FLUSH_RECORDS = 20000
# Records per RecordUsage call; at most scheduler/usage.py MAX_BATCH_RECORDS.
RECORDS_PER_BATCH = 5000
# Records turned into messages between two yields to the event loop (~0.2 ms of work).
PRICE_SLICE_RECORDS = 32
# Records kept while the scheduler is unreachable (a few hundred bytes each); past
# this the oldest are dropped, and the drop is logged.
MAX_PENDING = 200_000
# After a failed flush the next try waits this long (doubling up to the maximum).
RETRY_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
# Shutdown waits this long for the last flush.
CLOSE_FLUSH_SECONDS = 5.0
# A function's slice size and version are looked up again after this long.
SIZES_TTL_SECONDS = 60.0
RPC_TIMEOUT_SECONDS = 30.0
DEFAULT_RANGE_SECONDS = 86_400.0
# 9999-12-31T23:59:59Z: the last moment datetime can show.
MAX_TIME = 253_402_300_799.0
GROUPINGS = ("function", "day", "hour")
METRICS = ("invocations", "errors", "cold_starts", "wall_seconds", "queue_seconds",
           "restore_seconds", "gib_seconds", "compute_seconds", "bytes_in", "bytes_out")
CSV_TYPE = "text/csv"


class UsageRecord(NamedTuple):
    """One settled exchange, as measured; priced (slice size, share) before sending.

    A NamedTuple, not a frozen dataclass, because one is built on every call: about
    0.4 us against 3 us."""

    usage_id: str
    invocation_id: str
    tenant: str
    function: str
    key_id: str
    start: str
    status: int
    outcome: str
    ended_at: float
    wall_seconds: float
    queue_seconds: float
    restore_seconds: float
    bytes_in: int
    bytes_out: int
    version: str = ""
    gpu_memory_bytes: int = 0
    compute_share: float = 0.0
    cost_nanos: int = 0

    def to_proto(self) -> usage_pb2.UsageRecord:
        return usage_pb2.UsageRecord(
            usage_id=self.usage_id, invocation_id=self.invocation_id, tenant=self.tenant,
            function=self.function, version=self.version, key_id=self.key_id,
            start=self.start, status=self.status, outcome=self.outcome,
            ended_at=self.ended_at, wall_seconds=self.wall_seconds,
            queue_seconds=self.queue_seconds, restore_seconds=self.restore_seconds,
            gpu_memory_bytes=self.gpu_memory_bytes, compute_share=self.compute_share,
            bytes_in=self.bytes_in, bytes_out=self.bytes_out, cost_nanos=self.cost_nanos)


@dataclass(frozen=True)
class FunctionSize:
    """What a function's instance holds, from its thaw.toml [resources]."""

    version: str
    gpu_memory_bytes: int
    compute_share: float
    memory_bytes: int = 0
    """`resources.memory`, the instance's host-memory limit; 0: none (not priced)."""


GONE = FunctionSize("", 0, 0.0)
"""A function deleted before its calls were priced."""


def measure(ex: Exchange, how: Settlement, usage_id: str) -> UsageRecord:
    """The record of a settled exchange (cheap: this runs on the invocation's path)."""
    queue = restore = 0.0
    for stage, seconds in ex.stages:
        if stage == "queue":
            queue += seconds
        else:
            restore += seconds
    call_ = ex.call
    return UsageRecord(
        usage_id=usage_id, invocation_id=call_.request_id, tenant=call_.tenant,
        function=call_.name, key_id=call_.key_id, start=ex.start, status=ex.status,
        outcome=how.value, ended_at=time.time(),
        wall_seconds=max(time.perf_counter() - ex.sent, 0.0), queue_seconds=queue,
        restore_seconds=restore, bytes_in=len(call_.body), bytes_out=ex.bytes_out)


def size_of(config_json: str, version: str) -> FunctionSize:
    config = config_of(config_json)
    memory, percent = config.gpu_memory, config.gpu_compute
    share = percent / 100 if percent else (1.0 if memory else 0.0)
    resources = config.document.get("resources") if isinstance(config.document, dict) else None
    try:
        host = int((resources or {}).get("memory") or 0)
    except (TypeError, ValueError, AttributeError):
        host = 0
    return FunctionSize(version, memory, min(share, 1.0), max(host, 0))


def price_record(record: UsageRecord, size: FunctionSize, prices: Prices) -> UsageRecord:
    """The record with its function's size and its cost at `prices`."""
    return record._replace(
        version=size.version, gpu_memory_bytes=size.gpu_memory_bytes,
        compute_share=size.compute_share,
        cost_nanos=cost_nanos(prices, record.wall_seconds, size.gpu_memory_bytes,
                              size.memory_bytes))


Sender = Callable[[list[usage_pb2.UsageRecord]], Awaitable[None]]
Sizer = Callable[[str, str], Awaitable[FunctionSize]]


class UsageMeter:
    """The records waiting to be sent, and the flusher that sends them.

    `send` delivers one batch (raises ThawError if it did not arrive); `size` looks a
    function up (raises NotFound once it is deleted). Both are injected so the meter is
    tested without a scheduler."""

    def __init__(self, send: Sender, size: Sizer,
                 clock: Callable[[], float] = time.monotonic,
                 prices: Prices = FREE) -> None:
        self._send = send
        self._size = size
        self.prices = prices
        self._clock = clock
        self._pending: deque[UsageRecord] = deque()
        self._sizes: dict[tuple[str, str], tuple[float, FunctionSize]] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.dropped = 0
        self.sent = 0
        # Record ids: unique per gateway process (random prefix), cheap per call.
        self._id_prefix = uuid.uuid4().hex[:16] + "-"
        self._ids = itertools.count()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def on_settled(self, ex: Exchange, how: Settlement) -> None:
        self.add(measure(ex, how, f"{self._id_prefix}{next(self._ids):x}"))

    def add(self, record: UsageRecord) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(record)
        if len(self._pending) >= FLUSH_RECORDS:
            self._wake.set()

    async def flush(self) -> int:
        """Send everything waiting now; returns how many were sent. Raises ThawError
        when a batch could not be sent (it waits for the next try)."""
        sent = 0
        async with self._lock:
            while self._pending:
                batch = [self._pending.popleft()
                         for _ in range(min(RECORDS_PER_BATCH, len(self._pending)))]
                try:
                    priced = await self._priced_batch(batch)
                    await self._send(priced)
                except BaseException:
                    self._pending.extendleft(reversed(batch))
                    while len(self._pending) > MAX_PENDING:
                        self._pending.popleft()
                        self.dropped += 1
                    raise
                sent += len(batch)
                self.sent += len(batch)
        return sent

    async def _priced_batch(self, batch: list[UsageRecord]) -> list[usage_pb2.UsageRecord]:
        """The batch as messages, priced. Built in slices with a yield to the loop in
        between: a batch built in one go held the gateway's loop for milliseconds,
        and the calls in flight then showed it in their p99 (`thaw bench overhead`)."""
        sizes = {key: await self._size_cached(*key)
                 for key in {(r.tenant, r.function) for r in batch}}
        priced: list[usage_pb2.UsageRecord] = []
        for start in range(0, len(batch), PRICE_SLICE_RECORDS):
            for r in batch[start:start + PRICE_SLICE_RECORDS]:
                size = sizes[(r.tenant, r.function)]
                priced.append(price_record(r, size, self.prices).to_proto())
            await asyncio.sleep(0)
        return priced

    async def size_of(self, tenant: str, function: str) -> FunctionSize:
        """A function's size, from the cache the flusher keeps (a look-up at most once
        per SIZES_TTL_SECONDS per function)."""
        return await self._size_cached(tenant, function)

    async def _size_cached(self, tenant: str, function: str) -> FunctionSize:
        key = (tenant, function)
        cached = self._sizes.get(key)
        now = self._clock()
        if cached is not None and cached[0] >= now:
            return cached[1]
        try:
            size = await self._size(tenant, function)
        except NotFound:
            size = GONE
        self._sizes[key] = (now + SIZES_TTL_SECONDS, size)
        return size

    async def run_forever(self) -> None:
        while True:
            await self._flush_due()
            # Until it is sent, backing off while the scheduler is away; each try
            # after a pause also waits for the next flush to be due.
            await AsyncRetrying(
                retry=retry_if_exception_type(ThawError),
                wait=wait_exponential(multiplier=RETRY_SECONDS, max=RETRY_MAX_SECONDS),
                before_sleep=self._not_sent, sleep=self._pause)(self.flush)

    async def _flush_due(self) -> None:
        """Until FLUSH_SECONDS passed or enough records wait (`_wake`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
        self._wake.clear()

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._flush_due()

    def _not_sent(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning("usage records not sent; retrying", pending=self.pending,
                    dropped=self.dropped,
                    error=exc.message if isinstance(exc, ThawError) else str(exc),
                    retry_in=state.upcoming_sleep)

    async def close(self, timeout: float = CLOSE_FLUSH_SECONDS) -> None:
        """The last flush, bounded: what cannot be sent in time is logged as lost."""
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
        except (ThawError, TimeoutError) as exc:
            log.error("usage records lost at shutdown", records=self.pending,
                      error=str(exc))


class MeteringClient:
    """The scheduler's Metering service over the gateway's scheduler channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = usage_pb2_grpc.MeteringStub(channel)

    async def record(self, records: list[usage_pb2.UsageRecord]) -> None:
        await call(self._stub.RecordUsage(usage_pb2.RecordUsageRequest(records=records),
                                          timeout=RPC_TIMEOUT_SECONDS))

    async def query(self, tenant: str, from_time: float, to_time: float, group_by: str,
                    function: str = "") -> usage_pb2.QueryUsageResponse:
        return await call(self._stub.QueryUsage(usage_pb2.QueryUsageRequest(
            tenant=tenant, from_time=from_time, to_time=to_time, group_by=group_by,
            function=function), timeout=RPC_TIMEOUT_SECONDS))


@dataclass
class Metering:
    meter: UsageMeter
    client: MeteringClient


METERING_KEY = web.AppKey("metering", Metering)


# ---- GET /v1/usage -------------------------------------------------------------------

def parse_time(raw: str, field: str) -> float:
    """Unix seconds, or ISO 8601 (a date, or a date and time; UTC unless it says)."""
    try:
        value = float(raw)
    except ValueError:
        try:
            moment = datetime.datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidArgument(f"{field} must be ISO 8601 (2030-01-31 or "
                                  f"2030-01-31T12:00:00Z) or unix seconds, got {raw!r}",
                                  field=field) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        value = moment.timestamp()
    if not math.isfinite(value) or not 0 <= value <= MAX_TIME:
        raise InvalidArgument(f"{field} must be a time between 1970 and 9999, got {raw!r}",
                              field=field)
    return value


def _row_json(row: usage_pb2.UsageRow) -> dict[str, Any]:
    return {
        "invocations": row.invocations, "errors": row.errors,
        "cold_starts": row.cold_starts, "wall_seconds": round(row.wall_seconds, 6),
        "queue_seconds": round(row.queue_seconds, 6),
        "restore_seconds": round(row.restore_seconds, 6),
        "gib_seconds": round(row.gib_seconds, 6),
        "compute_seconds": round(row.compute_seconds, 6),
        "bytes_in": row.bytes_in, "bytes_out": row.bytes_out,
        "cost": money(row.cost_nanos), "cost_nanos": row.cost_nanos,
    }


def usage_json(reply: usage_pb2.QueryUsageResponse, tenant: str, from_time: float,
               to_time: float, group_by: str, function: str,
               prices: Prices = FREE) -> dict[str, Any]:
    """The document /v1/usage answers: rows in order (time, or function name), each
    with `key` (the function, or the period's start in ISO 8601), `start` (the period's
    start in unix seconds; null per function) and one number per metric; days and
    hours without use are rows of zeros, so a chart's x axis has no gaps. Each row's
    `cost` is exact (a decimal string; `cost_nanos` the same in nano-units), the sum of
    the stored costs of its calls; `priced` says whether this gateway prices calls now."""
    by_time = group_by != "function"
    return {
        "tenant": tenant, "from": _iso(from_time), "to": _iso(to_time),
        "group_by": group_by, "function": function or None, "metrics": list(METRICS),
        "currency": prices.currency, "priced": not prices.free,
        "rows": [{"key": row.key, "start": row.start if by_time else None,
                  **_row_json(row)} for row in reply.rows],
        "totals": _row_json(reply.totals),
    }


def usage_csv(doc: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["function" if doc["group_by"] == "function" else "period_start",
                     *METRICS, "cost"])
    for row in doc["rows"]:
        writer.writerow([row["key"], *(row[m] for m in METRICS), row["cost"]])
    return out.getvalue()


def _iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat().replace(
        "+00:00", "Z")


def wants_csv(request: web.Request) -> bool:
    fmt = request.query.get("format", "")
    if fmt not in ("", "json", "csv"):
        raise InvalidArgument(f"format must be json or csv, got {fmt!r}", field="format")
    if fmt:
        return fmt == "csv"
    accept = request.headers.get("Accept", "")
    return CSV_TYPE in accept and "application/json" not in accept


async def query_usage(request: web.Request, tenant: str, from_time: float, to_time: float,
                      group_by: str, function: str = "") -> dict[str, Any]:
    """The /v1/usage document for a tenant (the dashboard uses this too). Records this
    replica still holds are sent first, so the answer includes every call it answered."""
    metering = request.app.get(METERING_KEY)
    if metering is None:
        raise Unavailable("metering is off: this gateway has no scheduler channel")
    try:
        await metering.meter.flush()
    except ThawError as exc:
        log.warning("usage query without this replica's latest records", error=exc.message)
    reply = await metering.client.query(tenant, from_time, to_time, group_by, function)
    return usage_json(reply, tenant, from_time, to_time, group_by, function,
                      metering.meter.prices)


async def usage_view(request: web.Request) -> web.Response:
    p = await principal_of(request)
    require(p, "deploy")
    q = request.query
    tenant = q.get("tenant", p.tenant)
    if tenant != p.tenant:
        require_operator(p, request.app[CONFIG_KEY])
    group_by = q.get("group_by", "function")
    if group_by not in GROUPINGS:
        raise InvalidArgument(f"group_by must be one of {', '.join(GROUPINGS)}, got "
                              f"{group_by!r}", field="group_by")
    as_csv = wants_csv(request)
    now = time.time()
    to_time = parse_time(q["to"], "to") if "to" in q else now
    from_time = (parse_time(q["from"], "from") if "from" in q
                 else to_time - DEFAULT_RANGE_SECONDS)
    doc = await query_usage(request, tenant, from_time, to_time, group_by,
                            q.get("function", ""))
    if as_csv:
        # The tenant is the caller's text (an operator may name any): only tame
        # characters go into a header.
        name = f"usage-{re.sub(r'[^A-Za-z0-9._-]', '_', tenant)}-{group_by}.csv"
        return web.Response(text=usage_csv(doc), content_type=CSV_TYPE, charset="utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return web.json_response(doc)


# ---- wiring ---------------------------------------------------------------------------

async def _metering(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY_KEY]
    channel = getattr(gw.scheduler, "channel", None)
    if channel is None:  # a test's stand-in scheduler: nothing to meter into
        yield
        return
    client = MeteringClient(channel)

    async def size(tenant: str, name: str) -> FunctionSize:
        fn = await gw.scheduler.get_function(tenant, name)
        return size_of(fn.config_json, fn.version)

    meter = UsageMeter(client.record, size, prices=prices_of(app[CONFIG_KEY]))
    app[METERING_KEY] = Metering(meter, client)
    gw.dispatcher.on_settled = meter.on_settled
    flusher = asyncio.get_running_loop().create_task(meter.run_forever())
    yield
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    await meter.close()
    gw.dispatcher.on_settled = None


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/usage", usage_view)
    app.cleanup_ctx.append(_metering)


_METRIC_SCHEMAS: dict[str, Any] = {
    m: {"type": "integer", "minimum": 0} if m in ("invocations", "errors", "cold_starts",
                                                  "bytes_in", "bytes_out")
    else {"type": "number", "minimum": 0} for m in METRICS}
_METRIC_SCHEMAS["cost"] = {"type": "string", "pattern": r"^[0-9]+\.[0-9]{9}$",
                           "description": "exact, in the document's currency"}
_METRIC_SCHEMAS["cost_nanos"] = {"type": "integer", "minimum": 0}
_COST_FIELDS = ("cost", "cost_nanos")
_TIME_PARAM = {"type": "string", "description": "ISO 8601 or unix seconds"}
OPENAPI_PATHS: dict[str, Any] = {"/v1/usage": {"get": {
    "summary": "Usage of your functions: invocations, wall, queue and restore seconds, "
               "GiB-seconds of slice memory, compute seconds, bytes in and out, cost",
    "description": (
        "Sums per function, UTC day or UTC hour over the hours that overlap [from, to) "
        "(resolution: one hour; default: the last 24 hours). Needs the deploy scope; "
        "the platform operator may ask for another tenant with `tenant`. "
        "`format=csv` or `Accept: text/csv` answers CSV (one line per row)."),
    "parameters": [
        {"name": "from", "in": "query", "required": False, "schema": _TIME_PARAM},
        {"name": "to", "in": "query", "required": False, "schema": _TIME_PARAM},
        {"name": "group_by", "in": "query", "required": False,
         "schema": {"type": "string", "enum": list(GROUPINGS), "default": "function"}},
        {"name": "function", "in": "query", "required": False,
         "schema": {"type": "string"}},
        {"name": "tenant", "in": "query", "required": False,
         "schema": {"type": "string"}},
        {"name": "format", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["json", "csv"]}},
    ],
    "responses": {
        "200": {"description": "Rows in order and their totals.", "content": {
            "application/json": {"schema": {
                "type": "object",
                "required": ["tenant", "from", "to", "group_by", "metrics", "rows",
                             "totals"],
                "properties": {
                    "tenant": {"type": "string"},
                    "from": {"type": "string"}, "to": {"type": "string"},
                    "group_by": {"type": "string", "enum": list(GROUPINGS)},
                    "function": {"type": "string", "nullable": True},
                    "metrics": {"type": "array", "items": {"type": "string"}},
                    "currency": {"type": "string"},
                    "priced": {"type": "boolean"},
                    "rows": {"type": "array", "items": {
                        "type": "object",
                        "required": ["key", "start", *METRICS, *_COST_FIELDS],
                        "properties": {"key": {"type": "string"},
                                       "start": {"type": "number", "nullable": True},
                                       **_METRIC_SCHEMAS}}},
                    "totals": {"type": "object", "required": [*METRICS, *_COST_FIELDS],
                               "properties": _METRIC_SCHEMAS},
                }}},
            CSV_TYPE: {"schema": {"type": "string"}}}},
        **{status: {"description": text, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}
           for status, text in (
               ("400", "A bad from, to, group_by or format; `field` names it."),
               ("401", "No API key, or an unknown one."),
               ("403", "The key lacks the deploy scope, or asks for another tenant."),
               ("503", "The scheduler is unreachable."))},
    },
}}}

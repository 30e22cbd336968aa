"""Cost in the gateway's metering (gateway/usage.py, core/prices.py) without a
platform: each record is priced at the meter's prices with its function's size, the
usage document and CSV carry exact costs, and a function's host-memory limit is read."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal

from thaw.core.prices import Prices
from thaw.gateway.usage import FunctionSize, UsageMeter, UsageRecord, size_of, usage_csv, usage_json
from thaw.proto import usage_pb2

GiB = 1024**3
PRICES = Prices(per_call=Decimal("0.001"), cpu_second=Decimal("0.00002"),
                gpu_gib_second=Decimal("0.0001"), memory_gib_second=Decimal("0.000001"),
                currency="EUR")


def record(i: int, wall: float, function: str = "f") -> UsageRecord:
    return UsageRecord(usage_id=f"u{i}", invocation_id=f"req{i}", tenant="t",
                       function=function, key_id="k", start="warm", status=200,
                       outcome="answered", ended_at=1000.0 + i, wall_seconds=wall,
                       queue_seconds=0.0, restore_seconds=0.0, bytes_in=1, bytes_out=2)


async def test_records_carry_their_cost_at_the_meters_prices() -> None:
    sent: list[usage_pb2.UsageRecord] = []

    async def send(batch: list[usage_pb2.UsageRecord]) -> None:
        sent.extend(batch)

    async def size(tenant: str, name: str) -> FunctionSize:
        if name == "cpu":
            return FunctionSize("1", 0, 0.0)
        return FunctionSize("2", 2 * GiB, 0.5, memory_bytes=GiB // 2)

    meter = UsageMeter(send, size, prices=PRICES)
    meter.add(record(0, 1.5))
    meter.add(record(1, 0.25, function="cpu"))
    await meter.flush()
    gpu, cpu = sent
    # 0.001 + 1.5 * (0.00002 + 2 * 0.0001 + 0.5 * 0.000001)
    assert gpu.cost_nanos == 1_000_000 + 30_000 + 300_000 + 750
    assert cpu.cost_nanos == 1_000_000 + 5_000
    free = UsageMeter(send, size)
    free.add(record(2, 9.0))
    await free.flush()
    assert sent[-1].cost_nanos == 0


def test_size_reads_the_host_memory_limit() -> None:
    config = json.dumps({"resources": {"gpu_memory": GiB, "memory": 3 * GiB}})
    assert size_of(config, "4") == FunctionSize("4", GiB, 1.0, memory_bytes=3 * GiB)
    assert size_of(json.dumps({"resources": {"memory": "junk"}}), "1").memory_bytes == 0
    assert size_of("", "1").memory_bytes == 0


def test_the_document_and_csv_carry_exact_costs() -> None:
    reply = usage_pb2.QueryUsageResponse(
        rows=[usage_pb2.UsageRow(key="a", invocations=2, cost_nanos=1_500_000_001),
              usage_pb2.UsageRow(key="b", invocations=1, cost_nanos=3)],
        totals=usage_pb2.UsageRow(key="total", invocations=3, cost_nanos=1_500_000_004))
    doc = usage_json(reply, "t", 0.0, 3600.0, "function", "", PRICES)
    assert (doc["currency"], doc["priced"]) == ("EUR", True)
    assert [(r["key"], r["cost"], r["cost_nanos"]) for r in doc["rows"]] == [
        ("a", "1.500000001", 1_500_000_001), ("b", "0.000000003", 3)]
    assert doc["totals"]["cost"] == "1.500000004"
    rows = list(csv.DictReader(io.StringIO(usage_csv(doc))))
    assert [r["cost"] for r in rows] == ["1.500000001", "0.000000003"]
    unpriced = usage_json(reply, "t", 0.0, 3600.0, "function", "")
    assert unpriced["priced"] is False and unpriced["totals"]["cost_nanos"] == 1_500_000_004

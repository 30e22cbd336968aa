"""The gateway's usage meter (gateway/usage.py) with a fake scheduler: records wait in
memory until a batch arrives, are priced once per function, survive an unreachable
scheduler, and are bounded."""

from __future__ import annotations

import pytest

from thaw.core.errors import NotFound, Unavailable
from thaw.gateway import usage
from thaw.gateway.usage import FunctionSize, UsageMeter, UsageRecord, parse_time, size_of
from thaw.proto import usage_pb2

GiB = 1024**3


def record(i: int, function: str = "f") -> UsageRecord:
    return UsageRecord(usage_id=f"u{i}", invocation_id=f"req{i}", tenant="t",
                       function=function, key_id="k", start="warm", status=200,
                       outcome="answered", ended_at=1000.0 + i, wall_seconds=1.0,
                       queue_seconds=0.0, restore_seconds=0.0, bytes_in=1, bytes_out=2)


class FakeScheduler:
    def __init__(self) -> None:
        self.batches: list[list[usage_pb2.UsageRecord]] = []
        self.lookups: list[str] = []
        self.down = False
        self.clock = 0.0

    async def send(self, batch: list[usage_pb2.UsageRecord]) -> None:
        if self.down:
            raise Unavailable("scheduler unreachable")
        self.batches.append(batch)

    async def size(self, tenant: str, name: str) -> FunctionSize:
        self.lookups.append(name)
        if name == "deleted":
            raise NotFound(f"function {tenant}/{name} not found")
        return FunctionSize("3", 2 * GiB, 0.25)

    @property
    def sent_ids(self) -> list[str]:
        return [r.usage_id for batch in self.batches for r in batch]


@pytest.fixture
def fake() -> FakeScheduler:
    return FakeScheduler()


@pytest.fixture
def meter(fake: FakeScheduler) -> UsageMeter:
    return UsageMeter(fake.send, fake.size, clock=lambda: fake.clock)


async def test_records_are_priced_once_per_function_and_sent(meter: UsageMeter,
                                                             fake: FakeScheduler) -> None:
    for i in range(3):
        meter.add(record(i))
    meter.add(record(3, function="deleted"))
    assert meter.pending == 4 and fake.batches == []  # adding sends nothing
    assert await meter.flush() == 4
    assert fake.sent_ids == ["u0", "u1", "u2", "u3"]
    first, gone = fake.batches[0][0], fake.batches[0][3]
    assert (first.version, first.gpu_memory_bytes, first.compute_share) == ("3", 2 * GiB,
                                                                            0.25)
    assert (gone.gpu_memory_bytes, gone.compute_share) == (0, 0.0)
    assert sorted(fake.lookups) == ["deleted", "f"]
    meter.add(record(4))
    await meter.flush()
    assert sorted(fake.lookups) == ["deleted", "f"]  # cached
    fake.clock += usage.SIZES_TTL_SECONDS + 1
    meter.add(record(5))
    await meter.flush()
    assert fake.lookups.count("f") == 2  # looked up again after the TTL
    assert meter.pending == 0 and meter.sent == 6


async def test_an_unreachable_scheduler_loses_nothing(meter: UsageMeter,
                                                      fake: FakeScheduler) -> None:
    fake.down = True
    meter.add(record(0))
    meter.add(record(1))
    with pytest.raises(Unavailable):
        await meter.flush()
    meter.add(record(2))
    assert meter.pending == 3
    fake.down = False
    assert await meter.flush() == 3
    assert fake.sent_ids == ["u0", "u1", "u2"]  # in order, each once


async def test_batches_are_bounded(meter: UsageMeter, fake: FakeScheduler,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage, "RECORDS_PER_BATCH", 2)
    for i in range(5):
        meter.add(record(i))
    await meter.flush()
    assert [len(b) for b in fake.batches] == [2, 2, 1]


async def test_pending_records_are_bounded(meter: UsageMeter, fake: FakeScheduler,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage, "MAX_PENDING", 3)
    for i in range(5):
        meter.add(record(i))
    assert meter.pending == 3 and meter.dropped == 2
    await meter.flush()
    assert fake.sent_ids == ["u2", "u3", "u4"]  # the oldest went first


async def test_close_sends_what_is_left(meter: UsageMeter, fake: FakeScheduler) -> None:
    meter.add(record(0))
    await meter.close()
    assert fake.sent_ids == ["u0"]
    fake.down = True
    meter.add(record(1))
    await meter.close(timeout=1.0)  # logged as lost, no exception
    assert meter.pending == 1


def test_slice_size_and_compute_share_from_the_spec() -> None:
    spec = '{"resources": {"gpu_memory": 1073741824, "gpu_compute": 30}}'
    assert size_of(spec, "2") == FunctionSize("2", GiB, 0.3)
    # A GPU function without a compute limit has the whole device's share.
    assert size_of('{"resources": {"gpu_memory": 1024}}', "1").compute_share == 1.0
    assert size_of('{"resources": {}}', "1") == FunctionSize("1", 0, 0.0)


@pytest.mark.parametrize(("raw", "expected"), [
    ("1893456000", 1893456000.0),
    ("1893456000.5", 1893456000.5),
    ("2030-01-01", 1893456000.0),
    ("2030-01-01T01:00:00Z", 1893459600.0),
    ("2030-01-01T02:00:00+01:00", 1893459600.0),
])
def test_times_are_unix_seconds_or_iso_8601(raw: str, expected: float) -> None:
    assert parse_time(raw, "from") == expected


@pytest.mark.parametrize("raw", ["", "soon", "-5", "nan", "inf", "1e300", "1960-01-01"])
def test_bad_times_name_their_field(raw: str) -> None:
    with pytest.raises(usage.InvalidArgument) as caught:
        parse_time(raw, "to")
    assert caught.value.field == "to"

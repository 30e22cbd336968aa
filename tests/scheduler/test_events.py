"""The scheduler's event log: ListEvents reads it, subscribers follow it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.tls import aio_channel, platform_identity
from thaw.proto import scheduler_pb2
from thaw.scheduler.events import EventKind, EventLog
from thaw.scheduler.service import _kinds, event_message


def test_since_filters_and_limits() -> None:
    log = EventLog(capacity=10, clock=lambda: 42.0)
    log.emit(EventKind.NODE_REGISTERED, "n1 up", node_id="n1", devices=2)
    log.emit(EventKind.PRESSURE, "d0 pressure", node_id="n1", level="pressure")
    log.emit(EventKind.NODE_LOST, "n1 lost", node_id="n1")
    assert [e.seq for e in log.since()] == [1, 2, 3]
    assert [e.seq for e in log.since(1)] == [2, 3]
    assert [e.seq for e in log.since(0, limit=2)] == [1, 2]
    assert [e.kind for e in log.since(kinds=["pressure"])] == [EventKind.PRESSURE]
    first = log.since()[0]
    assert (first.time, first.attrs) == (42.0, (("devices", "2"),))
    message = event_message(first)
    assert (message.kind, message.attrs["devices"], message.node_id) == (
        "node_registered", "2", "n1")


def test_the_log_is_bounded() -> None:
    log = EventLog(capacity=3)
    for n in range(5):
        log.emit(EventKind.INSTANCE_STARTED, f"#{n}")
    assert [e.seq for e in log.since()] == [3, 4, 5] and log.last_seq == 5
    assert [e.seq for e in log.since(4)] == [5]


async def test_subscribers_get_new_events_and_learn_what_they_missed() -> None:
    log = EventLog(capacity=3)
    log.emit(EventKind.NODE_REGISTERED, "old")
    received: list[str] = []

    async def follow() -> None:
        async for event in log.subscribe(kinds=[EventKind.NODE_LOST, EventKind.EVENTS_LOST]):
            received.append(event.message)
            if len(received) == 2:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    log.emit(EventKind.NODE_REGISTERED, "ignored kind")
    log.emit(EventKind.NODE_LOST, "n1 lost")
    log.emit(EventKind.NODE_LOST, "n2 lost")
    await asyncio.wait_for(task, 2)
    assert received == ["n1 lost", "n2 lost"]

    # A subscriber that starts behind what the log still keeps is told so.
    behind = log.subscribe(after_seq=0)
    first = await asyncio.wait_for(behind.__anext__(), 2)
    assert first.kind is EventKind.EVENTS_LOST and "dropped" in first.message
    assert (await asyncio.wait_for(behind.__anext__(), 2)).seq == log.since()[0].seq
    await behind.aclose()


def test_unknown_kinds_are_an_invalid_argument() -> None:
    from thaw.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="known: pressure"):
        _kinds(["nope"])
    assert _kinds(["pressure", "node_lost"]) == [EventKind.PRESSURE, EventKind.NODE_LOST]


async def test_list_events_and_events_over_grpc(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from thaw.core.config import SchedulerConfig
    from thaw.proto import scheduler_pb2_grpc
    from thaw.scheduler.server import SchedulerServer

    server = SchedulerServer(SchedulerConfig(home=tmp_path, scheduler_listen="127.0.0.1:0"))
    platform_identity(tmp_path, "scheduler")  # the certificates `thaw up` would make
    port = await server.start()
    channel = aio_channel(f"127.0.0.1:{port}", tmp_path, "scheduler")
    try:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        assert server.control is not None
        server.control.events.emit(EventKind.NODE_LOST, "n1 lost", node_id="n1")
        reply = await stub.ListEvents(scheduler_pb2.ListEventsRequest(), timeout=5)
        assert [e.message for e in reply.events] == ["n1 lost"] and reply.last_seq == 1
        stream = stub.Events(scheduler_pb2.ListEventsRequest(after_seq=reply.last_seq,
                                                             kinds=["pressure"]), timeout=5)
        server.control.events.emit(EventKind.NODE_LOST, "not followed")
        server.control.events.emit(EventKind.PRESSURE, "d0 critical", node_id="n1")
        event = await asyncio.wait_for(stream.read(), 5)
        assert (event.kind, event.message, event.seq) == ("pressure", "d0 critical", 3)
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListEvents(scheduler_pb2.ListEventsRequest(kinds=["bogus"]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
        await server.stop()

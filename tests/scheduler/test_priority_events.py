"""The events feed tells an operator's priority change from the gateway's own
bookkeeping: a raise is `priority_changed` by the operator; a call that stopped waiting
sending its Acquire to the back is `acquire_demoted` by the system, which the
dashboard's feed leaves out."""

from __future__ import annotations

import pytest

from tests.scheduler.conftest import Cluster
from tests.scheduler.test_priority import Recorder, saturated
from thaw.core.priority import PRIORITY_MIN
from thaw.gateway.dashboard import feed_events
from thaw.proto import scheduler_pb2
from thaw.scheduler.events import Actor, EventKind, is_bookkeeping
from thaw.scheduler.policy import PolicyConfig


@pytest.mark.parametrize("policy", [PolicyConfig(priority_aging_rate=0)])
async def test_bookkeeping_is_not_recorded_as_a_priority_change(cluster: Cluster) -> None:
    held = await saturated(cluster, "feed")
    rec = Recorder(cluster, "feed")
    for label in ("a", "b"):
        await rec.enqueue(label, 50)
    cluster.control.set_priority("a", PRIORITY_MIN, bookkeeping=True)
    cluster.control.set_priority("b", 80)
    events = cluster.control.events.since(
        kinds=[EventKind.PRIORITY_CHANGED, EventKind.ACQUIRE_DEMOTED])
    assert [(e.kind, dict(e.attrs)["invocation"], dict(e.attrs)["actor"])
            for e in events] == [(EventKind.ACQUIRE_DEMOTED, "a", Actor.SYSTEM.value),
                                 (EventKind.PRIORITY_CHANGED, "b", Actor.OPERATOR.value)]
    assert [is_bookkeeping(e.attrs) for e in events] == [True, False]
    assert "priority" not in events[0].message.split(":")[0]
    await cluster.control.release(held.lease_id, False, "")
    await rec.done()
    assert rec.order == ["b", "a"]  # the bookkeeping still reordered the queue

    # The dashboard's feed (the scheduler's events as the gateway receives them).
    wire = [scheduler_pb2.Event(seq=e.seq, time=e.time, kind=e.kind.value,
                                message=e.message, function=e.function, attrs=dict(e.attrs))
            for e in events]
    feed = feed_events(wire)
    assert [(f["kind"], f["actor"]) for f in feed] == [("priority_changed", "operator")]

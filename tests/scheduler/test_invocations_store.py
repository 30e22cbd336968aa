"""The invocations table (scheduler/invocations.py) on SQLite and PostgreSQL, with a
fake clock: idempotency keys, claims and their leases, completion, cancel, expiry."""

from __future__ import annotations

import pytest

from tests.scheduler.conftest import FakeClock
from thaw.core.errors import NotFound
from thaw.proto import invocations_pb2
from thaw.scheduler.invocations import (
    TOMBSTONE_SECONDS,
    Completion,
    InvalidTransition,
    InvocationState,
    InvocationStore,
    check_transition,
)

TTL = 100.0
CLAIM = 30.0


def record(tenant: str = "t1", key: str = "", priority: int = 50, body: bytes = b"{}",
           digest: str = "d1") -> invocations_pb2.Invocation:
    return invocations_pb2.Invocation(tenant=tenant, function="fn", priority=priority,
                                      body=body, idempotency_key=key, request_digest=digest)


def ok(body: bytes = b'{"x": 1}') -> Completion:
    return Completion(InvocationState.SUCCEEDED, 200, "application/json", body)


def test_one_key_one_invocation_per_tenant(invocations: InvocationStore) -> None:
    first, created = invocations.create(record(key="k"), "", 0)
    again, created_again = invocations.create(record(key="k", digest="other"), "", 0)
    other_tenant, created_other = invocations.create(record(tenant="t2", key="k"), "", 0)
    assert created and not created_again and created_other
    assert again.id == first.id and again.request_digest == "d1"
    assert other_tenant.id != first.id
    # No key: never deduplicated.
    a, _ = invocations.create(record(), "", 0)
    b, _ = invocations.create(record(), "", 0)
    assert a.id != b.id


def test_claims_go_by_priority_and_a_lapsed_claim_is_taken_again(
        invocations: InvocationStore, clock: FakeClock) -> None:
    low, _ = invocations.create(record(priority=10), "", 0)
    high, _ = invocations.create(record(priority=90), "", 0)
    claimed = invocations.claim("gw-a", 1, CLAIM)
    assert [c.id for c in claimed] == [high.id]
    assert claimed[0].state == "running" and claimed[0].body == b"{}"
    assert [c.id for c in invocations.claim("gw-b", 5, CLAIM)] == [low.id]
    assert invocations.claim("gw-b", 5, CLAIM) == []
    # gw-a renews; gw-b dies: only gw-b's claim lapses.
    clock.now += CLAIM / 2
    assert invocations.renew("gw-a", [high.id], CLAIM) == []
    clock.now += CLAIM / 2 + 1
    retaken = invocations.claim("gw-c", 5, CLAIM)
    assert [c.id for c in retaken] == [low.id]
    # gw-b learns it must stop.
    assert invocations.renew("gw-b", [low.id], CLAIM) == [low.id]


def test_complete_then_expire_frees_the_key(invocations: InvocationStore,
                                            clock: FakeClock) -> None:
    inv, _ = invocations.create(record(key="k"), "gw-a", CLAIM)
    assert inv.state == "running" and inv.claimed_by == "gw-a"
    done = invocations.complete(inv.id, "gw-a", ok(), TTL)
    assert done.state == "succeeded" and done.expires_at == clock.now + TTL
    got = invocations.get("t1", inv.id, with_bodies=True)
    assert got.result_body == b'{"x": 1}' and got.result_status == 200
    # A second completion (a replica whose claim had lapsed) changes nothing.
    invocations.complete(inv.id, "gw-b", ok(b"late"), TTL)
    assert invocations.get("t1", inv.id, True).result_body == b'{"x": 1}'
    clock.now += TTL + 1
    assert invocations.get("t1", inv.id, True).state == "expired"
    assert invocations.get("t1", inv.id, True).result_body == b""
    fresh, created = invocations.create(record(key="k"), "", 0)
    assert created and fresh.id != inv.id
    assert invocations.sweep() == (0, 0)  # the key's reuse expired it already
    clock.now += TOMBSTONE_SECONDS
    assert invocations.sweep()[1] == 1
    with pytest.raises(NotFound):
        invocations.get("t1", inv.id, False)


def test_sweep_expires_finished_ones(invocations: InvocationStore, clock: FakeClock) -> None:
    inv, _ = invocations.create(record(), "gw-a", CLAIM)
    invocations.complete(inv.id, "gw-a", ok(), TTL)
    clock.now += TTL + 1
    assert invocations.sweep() == (1, 0)
    assert invocations.get("t1", inv.id, False).state == "expired"


def test_cancel_queued_and_running(invocations: InvocationStore) -> None:
    queued, _ = invocations.create(record(), "", 0)
    assert invocations.cancel("t1", queued.id, TTL).state == "cancelled"
    assert invocations.claim("gw-a", 5, CLAIM) == []
    running, _ = invocations.create(record(), "gw-a", CLAIM)
    assert invocations.cancel("t1", running.id, TTL).state == "cancelled"
    assert invocations.renew("gw-a", [running.id], CLAIM) == [running.id]
    # The cut call's late result is not stored over the cancellation.
    assert invocations.complete(running.id, "gw-a", ok(), TTL).state == "cancelled"
    done, _ = invocations.create(record(), "gw-a", CLAIM)
    invocations.complete(done.id, "gw-a", ok(), TTL)
    assert invocations.cancel("t1", done.id, TTL).state == "succeeded"


def test_release_hands_work_back(invocations: InvocationStore) -> None:
    inv, _ = invocations.create(record(), "gw-a", CLAIM)
    invocations.release("gw-a", [inv.id])
    assert invocations.get("t1", inv.id, False).state == "queued"
    assert [c.id for c in invocations.claim("gw-b", 5, CLAIM)] == [inv.id]


def test_another_tenant_sees_nothing(invocations: InvocationStore) -> None:
    inv, _ = invocations.create(record(), "", 0)
    with pytest.raises(NotFound):
        invocations.get("t2", inv.id, True)
    with pytest.raises(NotFound):
        invocations.cancel("t2", inv.id, TTL)
    assert invocations.list_recent("t2", 10) == []
    assert [i.id for i in invocations.list_recent("t1", 10)] == [inv.id]
    assert invocations.list_recent("t1", 10, state="succeeded") == []


def test_transitions_are_checked() -> None:
    check_transition(InvocationState.QUEUED, InvocationState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition(InvocationState.SUCCEEDED, InvocationState.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition(InvocationState.QUEUED, InvocationState.SUCCEEDED)

"""Webhook delivery claims in the invocations table (scheduler/invocations.py), on
SQLite and PostgreSQL with a fake clock: the replica that finished an invocation holds
its webhook; a lapsed claim goes to another replica once the next attempt is due, with
the attempts made so far; a replica that lost the claim cannot record over the new
holder."""

from __future__ import annotations

from tests.scheduler.conftest import FakeClock
from thaw.proto import invocations_pb2
from thaw.scheduler.invocations import Completion, InvocationState, InvocationStore

TTL = 100.0
CLAIM = 30.0


def finished_with_webhook(invocations: InvocationStore, gateway: str = "gw-a",
                          claim: float = CLAIM) -> str:
    inv, _ = invocations.create(invocations_pb2.Invocation(
        tenant="t1", function="fn", body=b"{}", webhook_url="http://127.0.0.1:9/hook"),
        gateway, CLAIM)
    done = invocations.complete(inv.id, gateway, Completion(
        InvocationState.SUCCEEDED, 200, "application/json", b'{"x": 1}'), TTL,
        webhook_claim_seconds=claim)
    assert done.webhook_state == "pending"
    return inv.id


def test_the_finishing_replica_holds_the_webhook_until_its_claim_lapses(
        invocations: InvocationStore, clock: FakeClock) -> None:
    invocation_id = finished_with_webhook(invocations)
    assert invocations.claim_webhooks("gw-b", 10, CLAIM) == []
    held = invocations.record_webhook(invocation_id, "pending", 1, "503", gateway_id="gw-a",
                                      retry_in=5.0, claim_seconds=CLAIM)
    assert (held.webhook_claimed_by, held.webhook_attempts) == ("gw-a", 1)
    assert held.webhook_next_at == clock.now + 5.0
    # gw-a renews while it waits out the backoff; gw-b gets nothing.
    clock.now += 20
    assert invocations.renew_webhooks("gw-a", [invocation_id], CLAIM) == []
    clock.now += 20
    assert invocations.claim_webhooks("gw-b", 10, CLAIM) == []
    # gw-a dies: once its claim lapsed, gw-b takes it over with the attempts made and
    # the result (for the payload).
    clock.now += CLAIM + 1
    taken = invocations.claim_webhooks("gw-b", 10, CLAIM)
    assert [t.id for t in taken] == [invocation_id]
    assert taken[0].webhook_attempts == 1 and taken[0].webhook_error == "503"
    assert taken[0].result_body == b'{"x": 1}' and taken[0].webhook_claimed_by == "gw-b"
    # gw-a, back from a pause, has lost it: its renewals and records are refused.
    assert invocations.renew_webhooks("gw-a", [invocation_id], CLAIM) == [invocation_id]
    late = invocations.record_webhook(invocation_id, "delivered", 2, "", gateway_id="gw-a")
    assert (late.webhook_state, late.webhook_claimed_by) == ("pending", "gw-b")
    done = invocations.record_webhook(invocation_id, "delivered", 2, "", gateway_id="gw-b")
    assert done.webhook_state == "delivered" and done.webhook_attempts == 2
    assert not done.webhook_claimed_by
    clock.now += 3 * CLAIM
    assert invocations.claim_webhooks("gw-c", 10, CLAIM) == []


def test_a_lapsed_webhook_waits_for_its_backoff(invocations: InvocationStore,
                                                clock: FakeClock) -> None:
    invocation_id = finished_with_webhook(invocations, claim=2.0)
    invocations.record_webhook(invocation_id, "pending", 2, "timeout", gateway_id="gw-a",
                               retry_in=60.0, claim_seconds=2.0)
    clock.now += 10  # the claim lapsed, the next attempt is not due yet
    assert invocations.claim_webhooks("gw-b", 10, CLAIM) == []
    clock.now += 51
    assert [t.webhook_attempts for t in invocations.claim_webhooks("gw-b", 10, CLAIM)] == [2]


def test_released_and_unclaimed_webhooks_go_to_any_replica(
        invocations: InvocationStore, clock: FakeClock) -> None:
    released = finished_with_webhook(invocations)
    invocations.release_webhooks("gw-a", [released])
    unclaimed = finished_with_webhook(invocations, claim=0.0)
    taken = {t.id for t in invocations.claim_webhooks("gw-b", 10, CLAIM)}
    assert taken == {released, unclaimed}
    # Claimed once: a second replica asking at the same moment gets neither.
    assert invocations.claim_webhooks("gw-c", 10, CLAIM) == []


def test_a_webhook_is_given_up_when_its_invocation_expires(
        invocations: InvocationStore, clock: FakeClock) -> None:
    invocation_id = finished_with_webhook(invocations, claim=1.0)
    clock.now += TTL + 1
    assert invocations.claim_webhooks("gw-b", 10, CLAIM) == []
    row = invocations.get("t1", invocation_id, False)
    assert row.webhook_state == "failed" and "expired" in row.webhook_error

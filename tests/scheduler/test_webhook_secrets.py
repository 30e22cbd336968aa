"""Each tenant's webhook signing secret (scheduler/webhook_secrets.py) and the last
delivery attempt's status (scheduler/invocations.py), on SQLite and PostgreSQL with a
fake clock."""

from __future__ import annotations

import base64

import pytest

from tests.scheduler.conftest import FakeClock
from thaw.core.errors import InvalidArgument
from thaw.proto import invocations_pb2
from thaw.scheduler.invocations import Completion, InvocationState, InvocationStore
from thaw.scheduler.store import Store
from thaw.scheduler.webhook_secrets import PREVIOUS_SECRET_SECONDS, WebhookSecrets


def test_a_secret_is_made_once_and_rotated_with_a_grace_period(
        store: Store, clock: FakeClock) -> None:
    secrets = WebhookSecrets(store, clock)
    first = secrets.get("acme")
    assert first.secret.startswith("whsec_")
    assert len(base64.b64decode(first.secret.removeprefix("whsec_"))) == 32
    assert secrets.get("acme").secret == first.secret  # made once
    assert not first.previous_secret and first.previous_until == 0.0
    assert secrets.get("other").secret != first.secret  # per tenant
    clock.now += 10
    rotated = secrets.get("acme", rotate=True)
    assert rotated.secret != first.secret
    assert rotated.previous_secret == first.secret
    assert rotated.previous_until == clock.now + PREVIOUS_SECRET_SECONDS
    assert secrets.get("acme").previous_secret == first.secret
    # Past the grace period only the new one signs.
    clock.now += PREVIOUS_SECRET_SECONDS + 1
    later = secrets.get("acme")
    assert later.secret == rotated.secret and not later.previous_secret
    with pytest.raises(InvalidArgument):
        secrets.get("Not A Tenant")


def test_the_last_attempts_status_and_time_are_kept(invocations: InvocationStore,
                                                    clock: FakeClock) -> None:
    inv, _ = invocations.create(invocations_pb2.Invocation(
        tenant="t1", function="fn", webhook_url="https://hooks.example/in"), "gw-a", 30)
    invocations.complete(inv.id, "gw-a", Completion(
        InvocationState.SUCCEEDED, 200, "application/json", b"{}"), 100,
        webhook_claim_seconds=30)
    first = invocations.record_webhook(inv.id, "pending", 1, "the receiver answered 503",
                                       gateway_id="gw-a", retry_in=2, last_status=503)
    assert (first.webhook_last_status, first.webhook_last_at) == (503, clock.now)
    clock.now += 2
    done = invocations.record_webhook(inv.id, "delivered", 2, "", gateway_id="gw-a",
                                      last_status=200)
    assert (done.webhook_last_status, done.webhook_last_at) == (200, clock.now)
    assert invocations.get("t1", inv.id, False).webhook_last_status == 200

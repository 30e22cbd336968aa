"""Each tenant's webhook signing secret (Standard Webhooks, `whsec_<base64>`), kept in
the metadata DB so every gateway replica signs with the same one.

The secret is made the first time it is asked for (by `thaw webhook secret`, or by
the first delivery: every delivery is signed). Rotating makes a new one; the previous
one keeps signing beside it for PREVIOUS_SECRET_SECONDS, so a receiver can move to
the new secret without refusing deliveries meanwhile. It is stored as it is (the
gateway needs it to sign), readable only through the scheduler's mutual-TLS gRPC.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from thaw.proto import invocations_pb2
from thaw.scheduler import models
from thaw.scheduler.store import Store
from thaw.scheduler.tenancy import check_tenant_id

# Kept in sync with gateway/stored/signing.py (the format the gateway signs with).
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
# After a rotation the previous secret signs too for this long (a day).
PREVIOUS_SECRET_SECONDS = 86_400.0


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _message(row: models.WebhookSecret, now: float) -> invocations_pb2.WebhookSecret:
    live_previous = bool(row.previous_secret and row.previous_until
                         and row.previous_until > now)
    return invocations_pb2.WebhookSecret(
        tenant=row.tenant_id, secret=row.secret, created_at=row.created_at,
        previous_secret=(row.previous_secret or "") if live_previous else "",
        previous_until=(row.previous_until or 0.0) if live_previous else 0.0)


class WebhookSecrets:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def get(self, tenant: str, rotate: bool = False) -> invocations_pb2.WebhookSecret:
        """The tenant's secret, made if it has none; with `rotate`, a new one (the old
        one signs beside it for PREVIOUS_SECRET_SECONDS)."""
        check_tenant_id(tenant)
        now = self.clock()

        def tx(s: Session) -> invocations_pb2.WebhookSecret:
            row = s.get(models.WebhookSecret, tenant)
            if row is None:
                row = models.WebhookSecret(tenant_id=tenant, secret=new_secret(),
                                           created_at=now)
                s.add(row)
            elif rotate:
                row.previous_secret = row.secret
                row.previous_until = now + PREVIOUS_SECRET_SECONDS
                row.secret = new_secret()
                row.created_at = now
            s.flush()
            return _message(row, now)
        try:
            return self.store._tx(tx)
        except IntegrityError:
            # Another replica's first delivery made it at the same moment: use that one.
            return self.store._tx(tx)

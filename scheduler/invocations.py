"""Invocations in the metadata DB (the `Invocations` gRPC service over them is
invocations_service.py).

A gateway replica writes an invocation here when its answer must outlive the request
(`Prefer: respond-async`, a sync call past the wait limit, an Idempotency-Key), so
any replica can answer `GET /v1/invocations/{id}` and a replica that dies leaves its
work to the others: a claim is a lease (claim_until) its replica renews while the
call runs; a lapsed claim puts the invocation back in the queue.

Lifecycle (one place checks it: `check_transition`):

    queued ──claim──▶ running ──complete──▶ succeeded | failed ──TTL──▶ expired
      │                 │ ▲ release / claim lapsed
      └────cancel───────┴─┴──────▶ cancelled ──TTL──▶ expired

An expired invocation keeps its row (without bodies or idempotency key) for a while,
so a GET can say "expired" (410) rather than "not found".

A finished invocation's webhook is delivered under a claim of its own
(webhook_claimed_by / webhook_claim_until), renewed by the delivering replica like the
invocation's: when that replica dies, ClaimWebhooks hands the delivery to another one
once the claim lapsed and the next attempt is due (webhook_next_at, the backoff), and
it goes on counting from the attempts recorded. Delivery is at least once: a replica
that dies between the receiver's answer and its record leaves that attempt to redo.

    "" ──complete──▶ pending ──record──▶ delivered | failed
                       │ ▲ record (attempt failed; retry_in)
                       └─┘
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from thaw.core.errors import InvalidArgument, NotFound
from thaw.core.priority import PRIORITY_DEFAULT
from thaw.proto import invocations_pb2
from thaw.scheduler import models
from thaw.scheduler.store import Store

log = structlog.get_logger()

# An expired invocation's row (no bodies) is kept this long after it expired, so GET
# answers 410 "expired" instead of 404; then it is deleted.
TOMBSTONE_SECONDS = 7 * 86_400.0
# Most invocations one List or Claim returns.
MAX_LIST = 1000
MAX_CLAIM = 256
# Fields a client may set, with their bounds (the gateway checks them first; these
# keep the DB sane whoever calls).
MAX_IDEMPOTENCY_KEY = 255
MAX_WEBHOOK_URL = 2048
WEBHOOK_STATES = ("pending", "delivered", "failed")
# Who made an invocation: a client's call, or a cron schedule (scheduler/schedules.py).
SOURCE_CALL = "call"
SOURCE_SCHEDULE = "schedule"
SOURCES = (SOURCE_CALL, SOURCE_SCHEDULE)


class InvocationState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset((InvocationState.SUCCEEDED, InvocationState.FAILED,
                      InvocationState.CANCELLED, InvocationState.EXPIRED))
TRANSITIONS: dict[InvocationState, frozenset[InvocationState]] = {
    InvocationState.QUEUED: frozenset((InvocationState.RUNNING, InvocationState.CANCELLED)),
    InvocationState.RUNNING: frozenset((InvocationState.QUEUED, InvocationState.RUNNING,
                                        InvocationState.SUCCEEDED, InvocationState.FAILED,
                                        InvocationState.CANCELLED)),
    InvocationState.SUCCEEDED: frozenset((InvocationState.EXPIRED,)),
    InvocationState.FAILED: frozenset((InvocationState.EXPIRED,)),
    InvocationState.CANCELLED: frozenset((InvocationState.EXPIRED,)),
    InvocationState.EXPIRED: frozenset(),
}


class InvalidTransition(InvalidArgument):
    """An invocation cannot go from its state to the one asked for."""

    code = "invalid_transition"


def check_transition(current: InvocationState, new: InvocationState) -> None:
    """InvalidTransition (logged) unless TRANSITIONS has the edge current -> new."""
    if new not in TRANSITIONS[current]:
        log.warning("illegal state move refused", lifecycle="InvocationState",
                    current=current.value, target=new.value)
        raise InvalidTransition(f"an invocation cannot go from {current.value} to "
                                f"{new.value}", field="state")


def move_invocation(row: models.Invocation, new: InvocationState) -> None:
    """Move a stored invocation to `new`, checked: the one place a row's state is set
    in Python. (The claim and the hand-back are compare-and-set UPDATEs, guarded in
    SQL by the state they expect.)"""
    check_transition(InvocationState(row.state), new)
    row.state = new.value


def new_invocation_id() -> str:
    return f"inv_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Completion:
    state: InvocationState
    result_status: int
    result_content_type: str
    result_body: bytes
    error_code: str = ""
    error_message: str = ""
    start: str = ""


def to_proto(row: models.Invocation, with_bodies: bool, now: float
             ) -> invocations_pb2.Invocation:
    state = effective_state(row, now)
    expired = state is InvocationState.EXPIRED
    return invocations_pb2.Invocation(
        id=row.id, tenant=row.tenant_id, function=row.function_name, state=state.value,
        priority=row.priority, path=row.path,
        body=(row.request_body or b"") if with_bodies and not expired else b"",
        content_type=row.request_content_type, headers_json=row.request_headers_json,
        timeout_seconds=row.timeout_seconds, result_status=row.result_status,
        result_content_type=row.result_content_type,
        result_body=(row.result_body or b"") if with_bodies and not expired else b"",
        result_bytes=row.result_bytes, error_code=row.error_code,
        error_message=row.error_message, webhook_url=row.webhook_url,
        webhook_state=row.webhook_state, webhook_attempts=row.webhook_attempts,
        webhook_error=row.webhook_error, idempotency_key=row.idempotency_key or "",
        request_digest=row.request_digest, key_id=row.key_id,
        claimed_by=row.claimed_by or "", claim_until=row.claim_until or 0.0,
        created_at=row.created_at, started_at=row.started_at or 0.0,
        finished_at=row.finished_at or 0.0, expires_at=row.expires_at or 0.0,
        start=row.start_kind, webhook_claimed_by=row.webhook_claimed_by or "",
        webhook_claim_until=row.webhook_claim_until or 0.0,
        webhook_next_at=row.webhook_next_at or 0.0,
        webhook_last_status=row.webhook_last_status or 0,
        webhook_last_at=row.webhook_last_at or 0.0,
        source=row.source or SOURCE_CALL, schedule_id=row.schedule_id or "")


def effective_state(row: models.Invocation, now: float) -> InvocationState:
    """Expired as soon as its TTL passed, whether or not a sweep has run since."""
    state = InvocationState(row.state)
    if state.finished and row.expires_at is not None and row.expires_at <= now:
        return InvocationState.EXPIRED
    return state


class InvocationStore:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def _get(self, s: Session, tenant: str, invocation_id: str) -> models.Invocation:
        row = s.get(models.Invocation, invocation_id)
        if row is None or row.tenant_id != tenant:
            # Another tenant's invocation is "not found", never theirs to see.
            raise NotFound(f"invocation {invocation_id} not found", field="id")
        return row

    def create(self, inv: invocations_pb2.Invocation, claimed_by: str, claim_seconds: float
               ) -> tuple[invocations_pb2.Invocation, bool]:
        """The new invocation (True), or the live one already holding its key (False)."""
        if not inv.tenant or not inv.function:
            raise InvalidArgument("an invocation needs a tenant and a function",
                                  field="function")
        if len(inv.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"the idempotency key is longer than "
                                  f"{MAX_IDEMPOTENCY_KEY} characters", field="Idempotency-Key")
        if len(inv.webhook_url) > MAX_WEBHOOK_URL:
            raise InvalidArgument(f"the webhook URL is longer than {MAX_WEBHOOK_URL} "
                                  "characters", field="webhook")
        key = inv.idempotency_key or None
        if key is not None:
            existing = self._by_key(inv.tenant, key)
            if existing is not None:
                return existing, False
        now = self.clock()
        running = bool(claimed_by)

        def tx(s: Session) -> invocations_pb2.Invocation:
            row = models.Invocation(
                id=inv.id or new_invocation_id(), tenant_id=inv.tenant,
                function_name=inv.function,
                state=(InvocationState.RUNNING if running else InvocationState.QUEUED).value,
                priority=inv.priority or PRIORITY_DEFAULT, path=inv.path, request_body=inv.body,
                request_content_type=inv.content_type,
                request_headers_json=inv.headers_json or "{}",
                timeout_seconds=inv.timeout_seconds, webhook_url=inv.webhook_url,
                webhook_state="", idempotency_key=key,
                request_digest=inv.request_digest, key_id=inv.key_id,
                claimed_by=claimed_by or None,
                claim_until=now + claim_seconds if running else None,
                created_at=now, started_at=now if running else None)
            s.add(row)
            s.flush()
            return to_proto(row, False, now)

        try:
            return self.store._tx(tx), True
        except IntegrityError:
            # Another request with the same key won the race (on any replica).
            if key is not None:
                existing = self._by_key(inv.tenant, key)
                if existing is not None:
                    return existing, False
            raise InvalidArgument(f"invocation id {inv.id} is taken", field="id") from None

    def _by_key(self, tenant: str, key: str) -> invocations_pb2.Invocation | None:
        def tx(s: Session) -> invocations_pb2.Invocation | None:
            row = s.scalar(select(models.Invocation).where(
                models.Invocation.tenant_id == tenant,
                models.Invocation.idempotency_key == key))
            if row is None:
                return None
            now = self.clock()
            if effective_state(row, now) is InvocationState.EXPIRED:
                # Past its TTL the key is free again.
                self._expire(row)
                s.flush()
                return None
            return to_proto(row, False, now)
        return self.store._tx(tx)

    def get(self, tenant: str, invocation_id: str, with_bodies: bool
            ) -> invocations_pb2.Invocation:
        def tx(s: Session) -> invocations_pb2.Invocation:
            return to_proto(self._get(s, tenant, invocation_id), with_bodies, self.clock())
        return self.store._tx(tx)

    def list_recent(self, tenant: str, limit: int, state: str = "", function: str = "",
                    key_id: str = "", source: str = ""
                    ) -> list[invocations_pb2.Invocation]:
        """Newest first; `key_id`: only those that API key made ("" = any key's);
        `source`: only a client's calls or only a schedule's runs ("" = both)."""
        if source and source not in SOURCES:
            raise InvalidArgument(f"source must be one of {', '.join(SOURCES)}",
                                  field="source")
        if state:
            try:
                InvocationState(state)
            except ValueError:
                raise InvalidArgument(
                    f"state must be one of {', '.join(s.value for s in InvocationState)}",
                    field="state") from None
        limit = max(1, min(limit or 100, MAX_LIST))

        def tx(s: Session) -> list[invocations_pb2.Invocation]:
            q = select(models.Invocation).where(models.Invocation.tenant_id == tenant)
            if function:
                q = q.where(models.Invocation.function_name == function)
            if key_id:
                q = q.where(models.Invocation.key_id == key_id)
            if source == SOURCE_SCHEDULE:
                q = q.where(models.Invocation.source == SOURCE_SCHEDULE)
            elif source:
                q = q.where(models.Invocation.source != SOURCE_SCHEDULE)
            q = q.order_by(models.Invocation.created_at.desc()).limit(limit)
            now = self.clock()
            rows = [to_proto(r, False, now) for r in s.scalars(q)]
            return [r for r in rows if not state or r.state == state]
        return self.store._tx(tx)

    def claim(self, gateway_id: str, limit: int, claim_seconds: float
              ) -> list[invocations_pb2.Invocation]:
        """Queued work and work whose replica stopped renewing its claim, highest
        priority first, then oldest."""
        if not gateway_id:
            raise InvalidArgument("claim needs the gateway's id", field="gateway_id")
        limit = max(1, min(limit, MAX_CLAIM))
        now = self.clock()

        def tx(s: Session) -> list[invocations_pb2.Invocation]:
            inv = models.Invocation
            q = (select(inv).where(or_(
                inv.state == InvocationState.QUEUED.value,
                (inv.state == InvocationState.RUNNING.value) & (inv.claim_until < now)))
                .order_by(inv.priority.desc(), inv.created_at).limit(limit))
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            claimed = []
            for row in s.scalars(q):
                # Guarded update: of two replicas claiming at once, one gets the row.
                won = s.execute(update(inv).where(
                    inv.id == row.id, inv.state == row.state,
                    or_(inv.claim_until.is_(None), inv.claim_until == row.claim_until))
                    .values(state=InvocationState.RUNNING.value, claimed_by=gateway_id,
                            claim_until=now + claim_seconds, started_at=now)
                    .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
                if won:
                    s.refresh(row)
                    claimed.append(to_proto(row, True, now))
            return claimed
        return self.store._tx(tx)

    def renew(self, gateway_id: str, ids: list[str], claim_seconds: float) -> list[str]:
        """Extend this replica's claims; returns the ids it should stop running."""
        now = self.clock()

        def tx(s: Session) -> list[str]:
            stop = []
            for invocation_id in ids:
                row = s.get(models.Invocation, invocation_id)
                if (row is None or row.state != InvocationState.RUNNING.value
                        or row.claimed_by != gateway_id):
                    stop.append(invocation_id)
                    continue
                row.claim_until = now + claim_seconds
            return stop
        return self.store._tx(tx)

    def complete(self, invocation_id: str, gateway_id: str, done: Completion,
                 ttl_seconds: float, webhook_claim_seconds: float = 0.0
                 ) -> invocations_pb2.Invocation:
        """Store the result; an invocation already finished (cancelled meanwhile, or
        completed by another replica after a lapsed claim) keeps what it has. Its
        webhook becomes pending, claimed by `gateway_id` when webhook_claim_seconds > 0
        (it delivers at once), else left to ClaimWebhooks."""
        if not done.state.finished or done.state is InvocationState.EXPIRED:
            raise InvalidArgument("complete needs state succeeded or failed", field="state")
        now = self.clock()

        def tx(s: Session) -> invocations_pb2.Invocation:
            row = s.get(models.Invocation, invocation_id)
            if row is None:
                raise NotFound(f"invocation {invocation_id} not found", field="id")
            if InvocationState(row.state) is not InvocationState.RUNNING:
                return to_proto(row, False, now)
            move_invocation(row, done.state)
            row.result_status = done.result_status
            row.result_content_type = done.result_content_type
            row.result_body = done.result_body
            row.result_bytes = len(done.result_body)
            row.error_code = done.error_code
            row.error_message = done.error_message
            row.start_kind = done.start
            row.claim_until = None
            row.finished_at = now
            row.expires_at = now + ttl_seconds
            if row.webhook_url:
                row.webhook_state = "pending"
                if webhook_claim_seconds > 0:
                    row.webhook_claimed_by = gateway_id
                    row.webhook_claim_until = now + webhook_claim_seconds
            return to_proto(row, False, now)
        return self.store._tx(tx)

    def release(self, gateway_id: str, ids: list[str]) -> None:
        """Back to the queue: this replica stops without finishing them."""
        def tx(s: Session) -> None:
            inv = models.Invocation
            s.execute(update(inv).where(
                inv.id.in_(ids), inv.claimed_by == gateway_id,
                inv.state == InvocationState.RUNNING.value)
                .values(state=InvocationState.QUEUED.value, claimed_by=None,
                        claim_until=None)
                .execution_options(synchronize_session=False))
        if ids:
            self.store._tx(tx)

    def cancel(self, tenant: str, invocation_id: str, ttl_seconds: float
               ) -> invocations_pb2.Invocation:
        """Queued or running → cancelled (a running call's replica learns it when it
        renews its claim, or at once when it is the one asked); finished ones stay."""
        now = self.clock()

        def tx(s: Session) -> invocations_pb2.Invocation:
            row = self._get(s, tenant, invocation_id)
            state = effective_state(row, now)
            if not state.finished:
                move_invocation(row, InvocationState.CANCELLED)
                row.error_code = "cancelled"
                row.error_message = "cancelled by the client"
                row.claim_until = None
                row.finished_at = now
                row.expires_at = now + ttl_seconds
            return to_proto(row, False, now)
        return self.store._tx(tx)

    def record_webhook(self, invocation_id: str, state: str, attempts: int, error: str,
                       gateway_id: str = "", retry_in: float = 0.0,
                       claim_seconds: float = 0.0, last_status: int = 0
                       ) -> invocations_pb2.Invocation:
        """A delivery attempt's outcome. With `gateway_id`, only while that replica
        holds the claim (else the row is returned as it is: its webhook_claimed_by
        tells the caller it lost it). Pending: the next attempt is due `retry_in`
        seconds from now and the claim is extended by `claim_seconds`; delivered or
        failed: the claim ends. `last_status`: the receiver's answer (0 = none)."""
        if state not in WEBHOOK_STATES:
            raise InvalidArgument("webhook state must be pending, delivered or failed",
                                  field="state")
        if attempts < 0 or retry_in < 0 or claim_seconds < 0:
            raise InvalidArgument("attempts, retry_in_seconds and claim_seconds must be "
                                  ">= 0", field="attempts")
        now = self.clock()

        def tx(s: Session) -> invocations_pb2.Invocation:
            row = s.get(models.Invocation, invocation_id)
            if row is None:
                raise NotFound(f"invocation {invocation_id} not found", field="id")
            if gateway_id and (row.webhook_claimed_by != gateway_id
                               or row.webhook_state != "pending"):
                return to_proto(row, False, now)
            row.webhook_state = state
            row.webhook_attempts = attempts
            row.webhook_error = error
            if attempts:
                row.webhook_last_status = last_status
                row.webhook_last_at = now
            if state == "pending":
                row.webhook_next_at = now + retry_in if retry_in else None
                if claim_seconds:
                    row.webhook_claim_until = now + claim_seconds
            else:
                row.webhook_claimed_by = None
                row.webhook_claim_until = None
                row.webhook_next_at = None
            return to_proto(row, False, now)
        return self.store._tx(tx)

    def claim_webhooks(self, gateway_id: str, limit: int, claim_seconds: float
                       ) -> list[invocations_pb2.Invocation]:
        """Pending webhooks that nobody holds (or whose holder stopped renewing) and
        whose next attempt is due, oldest first; with bodies, for the payload. Those of
        invocations past their TTL are given up (failed) instead."""
        if not gateway_id:
            raise InvalidArgument("claim needs the gateway's id", field="gateway_id")
        limit = max(1, min(limit, MAX_CLAIM))
        now = self.clock()

        def tx(s: Session) -> list[invocations_pb2.Invocation]:
            inv = models.Invocation
            q = (select(inv).where(
                inv.webhook_state == "pending",
                or_(inv.webhook_claim_until.is_(None), inv.webhook_claim_until < now),
                or_(inv.webhook_next_at.is_(None), inv.webhook_next_at <= now))
                .order_by(inv.finished_at).limit(limit))
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            claimed = []
            for row in s.scalars(q):
                if effective_state(row, now) is InvocationState.EXPIRED:
                    self._give_up_webhook(row)
                    continue
                # Guarded update: of two replicas claiming at once, one gets the row.
                lapsed = (inv.webhook_claim_until.is_(None) if row.webhook_claim_until is None
                          else inv.webhook_claim_until == row.webhook_claim_until)
                won = s.execute(update(inv).where(
                    inv.id == row.id, inv.webhook_state == "pending", lapsed,
                    inv.webhook_attempts == row.webhook_attempts)
                    .values(webhook_claimed_by=gateway_id,
                            webhook_claim_until=now + claim_seconds)
                    .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
                if won:
                    s.refresh(row)
                    claimed.append(to_proto(row, True, now))
            return claimed
        return self.store._tx(tx)

    def renew_webhooks(self, gateway_id: str, ids: list[str], claim_seconds: float
                       ) -> list[str]:
        """Extend this replica's webhook claims; returns the ids it no longer holds."""
        now = self.clock()

        def tx(s: Session) -> list[str]:
            stop = []
            for invocation_id in ids:
                row = s.get(models.Invocation, invocation_id)
                if (row is None or row.webhook_state != "pending"
                        or row.webhook_claimed_by != gateway_id):
                    stop.append(invocation_id)
                    continue
                row.webhook_claim_until = now + claim_seconds
            return stop
        return self.store._tx(tx) if ids else []

    def release_webhooks(self, gateway_id: str, ids: list[str]) -> None:
        """This replica stops delivering them: any replica may take them when due."""
        def tx(s: Session) -> None:
            inv = models.Invocation
            s.execute(update(inv).where(
                inv.id.in_(ids), inv.webhook_claimed_by == gateway_id,
                inv.webhook_state == "pending")
                .values(webhook_claimed_by=None, webhook_claim_until=None)
                .execution_options(synchronize_session=False))
        if ids:
            self.store._tx(tx)

    @staticmethod
    def _give_up_webhook(row: models.Invocation) -> None:
        if row.webhook_state == "pending":
            row.webhook_state = "failed"
            row.webhook_error = ("the invocation expired (result_ttl_seconds) before its "
                                 "webhook was delivered")
            row.webhook_claimed_by = None
            row.webhook_claim_until = None
            row.webhook_next_at = None

    def sweep(self) -> tuple[int, int]:
        """Expire finished invocations past their TTL (drop bodies, free the key);
        delete the rows of those expired long ago. Returns (expired, deleted)."""
        now = self.clock()

        def tx(s: Session) -> tuple[int, int]:
            inv = models.Invocation
            rows = s.scalars(select(inv).where(
                inv.state.in_([st.value for st in FINISHED if st is not
                               InvocationState.EXPIRED]),
                inv.expires_at <= now)).all()
            for row in rows:
                self._expire(row)
            deleted = s.execute(delete(inv).where(
                inv.state == InvocationState.EXPIRED.value,
                inv.expires_at <= now - TOMBSTONE_SECONDS)
                .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
            return len(rows), deleted
        return self.store._tx(tx)

    @classmethod
    def _expire(cls, row: models.Invocation) -> None:
        cls._give_up_webhook(row)
        if InvocationState(row.state) is not InvocationState.EXPIRED:
            move_invocation(row, InvocationState.EXPIRED)
        row.request_body = None
        row.result_body = None
        row.idempotency_key = None

"""The metadata DB (SQLAlchemy 2.0). Schema changes go through Alembic migrations
in scheduler/migrations; the scheduler upgrades the DB on start."""

from __future__ import annotations

import time

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from thaw.core.priority import PRIORITY_DEFAULT, PRIORITY_MAX


class Base(DeclarativeBase):
    pass


def _now() -> float:
    return time.time()


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    # Quotas: None = no limit.
    max_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """Total slice memory of the tenant's live instances."""
    max_instances: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Live instances of all the tenant's functions together."""


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    scopes: Mapped[str] = mapped_column(String(200))  # comma-separated
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    """Indexed: every gateway asks each second for the keys revoked lately."""
    priority_default: Mapped[int] = mapped_column(Integer, default=PRIORITY_DEFAULT)
    """Priority (1-100) of this key's invocations when neither the request nor the
    function says otherwise."""
    priority_max: Mapped[int] = mapped_column(Integer, default=PRIORITY_MAX)
    """Highest priority this key may ask for with the X-Thaw-Priority header."""


class Function(Base):
    __tablename__ = "functions"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    start_mode: Mapped[str] = mapped_column(String(16), default="fresh")
    handler: Mapped[str] = mapped_column(String(200))
    bundle_digest: Mapped[str] = mapped_column(String(64))
    spec_json: Mapped[str] = mapped_column(Text)
    snapshot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    """Invocable without an API key (management stays with the tenant)."""
    priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Default priority (1-100) of its invocations; None = the key's default."""
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    updated_at: Mapped[float] = mapped_column(Float, default=_now, onupdate=_now)


class Snapshot(Base):
    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    node_id: Mapped[str] = mapped_column(String(200), default="")
    manifest: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=_now)


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    control_address: Mapped[str] = mapped_column(String(200))
    data_url: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    devices_json: Mapped[str] = mapped_column(Text, default="[]")
    registered_at: Mapped[float] = mapped_column(Float, default=_now)
    last_heartbeat: Mapped[float] = mapped_column(Float, default=_now)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id"), index=True)
    node_id: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    start_kind: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[float] = mapped_column(Float, default=_now)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    end_reason: Mapped[str] = mapped_column(Text, default="")


# ---- audit log (tenancy) ----------------------------------------------------------

class AuditRecord(Base):
    """One management action. Append-only: the code has no update or delete of it."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float, default=_now, index=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    """The tenant acted upon (for the operator acting on another tenant, that one:
    so that tenant's admins see it)."""
    key_id: Mapped[str] = mapped_column(String(64), default="")
    """Who: the key's id (never the key); empty when no valid key was sent."""
    actor_tenant: Mapped[str] = mapped_column(String(64), default="", index=True)
    """The acting key's tenant; "" = `tenant` (rows before migration 0007 too)."""
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(400), default="")
    source: Mapped[str] = mapped_column(String(200), default="")
    """From where: the client's address (X-Forwarded-For's first entry, else the peer)."""
    outcome: Mapped[str] = mapped_column(String(16))
    """ok | denied | failed"""
    status: Mapped[int] = mapped_column(Integer, default=0)
    detail_json: Mapped[str] = mapped_column(Text, default="{}")


# ---- invocations (async calls, sync calls past the wait limit, Idempotency-Key) -------

class Invocation(Base):
    __tablename__ = "invocations"
    # Decides which of several concurrent requests with one key (on any replica) runs
    # the function; NULL keys (no header, or an expired invocation's) never collide.
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),
                      Index("ix_invocations_webhook_state", "webhook_state"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    function_name: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(16), index=True)
    """queued | running | succeeded | failed | cancelled | expired"""
    priority: Mapped[int] = mapped_column(Integer, default=PRIORITY_DEFAULT)
    path: Mapped[str] = mapped_column(Text, default="")
    request_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    request_content_type: Mapped[str] = mapped_column(String(200), default="")
    request_headers_json: Mapped[str] = mapped_column(Text, default="{}")
    timeout_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    result_status: Mapped[int] = mapped_column(Integer, default=0)
    result_content_type: Mapped[str] = mapped_column(String(200), default="")
    result_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    result_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    start_kind: Mapped[str] = mapped_column(String(16), default="")
    error_code: Mapped[str] = mapped_column(String(64), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")
    webhook_url: Mapped[str] = mapped_column(Text, default="")
    webhook_state: Mapped[str] = mapped_column(String(16), default="")
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_error: Mapped[str] = mapped_column(Text, default="")
    webhook_claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The replica delivering the webhook (a claim it renews, like claimed_by)."""
    webhook_claim_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    webhook_next_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    """When the next delivery attempt is due (the backoff), for whoever takes it over."""
    webhook_last_status: Mapped[int] = mapped_column(Integer, default=0)
    """The receiver's HTTP status at the last attempt; 0 = no answer (or none yet)."""
    webhook_last_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_digest: Mapped[str] = mapped_column(String(64), default="")
    key_id: Mapped[str] = mapped_column(String(64), default="")
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claim_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=_now, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    source: Mapped[str] = mapped_column(String(16), default="")
    """Empty for a caller's request; "schedule" when a schedule made it at its due time."""
    schedule_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class Schedule(Base):
    """One of a function's cron schedules (`[schedule]`, scheduler/schedules.py): the
    serving version's, with when it is next due and how its last due time went."""

    __tablename__ = "schedules"
    __table_args__ = (UniqueConstraint("tenant_id", "function_name", "position"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    function_name: Mapped[str] = mapped_column(String(63))
    position: Mapped[int] = mapped_column(Integer)
    """Its place among the function's [[schedule]] tables."""
    version: Mapped[int] = mapped_column(Integer)
    cron: Mapped[str] = mapped_column(String(256))
    timezone: Mapped[str] = mapped_column(String(64))
    input_json: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean)
    next_run_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    """The first due time not handled yet; the compare-and-set claim of a tick."""
    last_due_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_run_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_outcome: Mapped[str] = mapped_column(String(16), default="")
    """started | skipped | refused (its input), for the last due time handled."""
    last_invocation_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[float] = mapped_column(Float, default=_now, onupdate=_now)


class WebhookSecret(Base):
    """A tenant's webhook signing secret (Standard Webhooks `whsec_<base64>`): the
    gateway signs every delivery with it (scheduler/webhook_secrets.py)."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    previous_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """The secret before the last rotation: it still signs until previous_until."""
    previous_until: Mapped[float | None] = mapped_column(Float, nullable=True)


# ---- usage (metering) -----------------------------------------------------------------

class Usage(Base):
    """What one invocation used, as the gateway measured it (scheduler/usage.py)."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_tenant_ended", "tenant", "ended_at"),)

    usage_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """Made by the gateway per record: a batch sent twice is stored once."""
    invocation_id: Mapped[str] = mapped_column(String(128), index=True)
    tenant: Mapped[str] = mapped_column(String(64))
    function: Mapped[str] = mapped_column(String(63))
    version: Mapped[str] = mapped_column(String(32), default="")
    key_id: Mapped[str] = mapped_column(String(64), default="")
    start: Mapped[str] = mapped_column(String(16))
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    ended_at: Mapped[float] = mapped_column(Float)
    wall_s: Mapped[float] = mapped_column(Float)
    queue_s: Mapped[float] = mapped_column(Float)
    restore_s: Mapped[float] = mapped_column(Float)
    gpu_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    compute_share: Mapped[float] = mapped_column(Float)
    gib_seconds: Mapped[float] = mapped_column(Float)
    compute_seconds: Mapped[float] = mapped_column(Float)
    bytes_in: Mapped[int] = mapped_column(BigInteger)
    bytes_out: Mapped[int] = mapped_column(BigInteger)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """The call's cost at the metering gateway's prices (nano-units; core/prices.py)."""


class UsageHour(Base):
    """Sums of usage_records per tenant, function and UTC hour, kept in the same
    transaction as the records."""

    __tablename__ = "usage_hourly"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    function: Mapped[str] = mapped_column(String(63), primary_key=True)
    hour_start: Mapped[int] = mapped_column(BigInteger, primary_key=True, index=True)
    """Unix seconds, a multiple of 3600."""
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    cold_starts: Mapped[int] = mapped_column(BigInteger, default=0)
    wall_s: Mapped[float] = mapped_column(Float, default=0.0)
    queue_s: Mapped[float] = mapped_column(Float, default=0.0)
    restore_s: Mapped[float] = mapped_column(Float, default=0.0)
    gib_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


# ---- function versions (every deploy is an immutable version) -----------------------

class FunctionVersion(Base):
    """One deploy of a function: its bundle, parsed thaw.toml and snapshot. The
    functions row mirrors the active (serving) one; the others are kept for rollback."""

    __tablename__ = "function_versions"
    __table_args__ = (UniqueConstraint("function_id", "version"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    bundle_digest: Mapped[str] = mapped_column(String(64))
    handler: Mapped[str] = mapped_column(String(200))
    spec_json: Mapped[str] = mapped_column(Text)
    start_mode: Mapped[str] = mapped_column(String(16), default="restore")
    state: Mapped[str] = mapped_column(String(16))
    """building | ready | failed (scheduler/states.py VersionState)"""
    reason: Mapped[str] = mapped_column(Text, default="")
    snapshot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    snapshot_collected: Mapped[bool] = mapped_column(Boolean, default=False)
    """Its snapshot fell out of retention and nodes dropped its chunks: a rollback to
    it rebuilds the snapshot from the bundle."""
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    activated_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    """When it last became the serving version (deploy or rollback)."""
    input_schema: Mapped[str] = mapped_column(Text, default="", server_default="")
    """The JSON Schema its build read from the handler's signature ("" for none): kept
    here so that a version running fresh (no snapshot manifest) has one too."""


class Budget(Base):
    """Requests and tokens per minute and per day (gateway/budgets.py counts them) of
    one key, or of a whole tenant when key_id is "". 0 = no budget."""
    __tablename__ = "budgets"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rpm: Mapped[int] = mapped_column(BigInteger, default=0)
    rpd: Mapped[int] = mapped_column(BigInteger, default=0)
    tpm: Mapped[int] = mapped_column(BigInteger, default=0)
    tpd: Mapped[int] = mapped_column(BigInteger, default=0)


class BudgetUsage(Base):
    """What the gateways counted against a day budget (rpd, tpd) in one UTC day,
    all replicas together, so that a day survives a gateway's restart."""
    __tablename__ = "budget_usage"

    counter: Mapped[str] = mapped_column(String(200), primary_key=True)
    """"key:<id>" or "tenant:<name>"."""
    budget: Mapped[str] = mapped_column(String(8), primary_key=True)
    day: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    """The UTC day: unix seconds // 86400."""
    count: Mapped[int] = mapped_column(BigInteger, default=0)

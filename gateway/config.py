"""The gateway's settings: GatewayConfig (thaw.core.config) plus the protection knobs.

The extra fields live here, in a subclass, until they move into GatewayConfig itself;
the sources are the same (THAW_<FIELD> env, the [gateway] table of $THAW_CONFIG, the
default), so nothing changes for an operator when they do.

Every limit below is held in one gateway process's memory: with several gateway
replicas behind a load balancer each replica enforces it on its own share of the
traffic (a key limited to 600 requests a minute can make up to 600 per replica).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator

from thaw.core.config import GatewayConfig
from thaw.gateway.alert_settings import AlertSettings


class GatewaySettings(GatewayConfig, AlertSettings):
    _table: ClassVar[str] = "gateway"

    rate_limit_rpm: float = Field(0.0, ge=0)
    """Requests per minute per API key, per replica (token bucket); 0 = no limit."""
    rate_limit_burst: int = Field(0, ge=0)
    """Requests a key may make at once before the per-minute rate applies; 0 = rpm."""
    queue_high_water: int = Field(200, ge=1)
    """Requests of one function waiting for an instance (per replica) at which new
    ones are shed with 429."""
    queue_low_water: int = Field(100, ge=0)
    """Once shedding, new requests are admitted again only when the queue is this short."""
    breaker_failures: int = Field(5, ge=1)
    """Consecutive infrastructure failures (crash, hang, node unreachable) that open a
    function's or a node's circuit."""
    breaker_cooldown: float = Field(5.0, gt=0)
    """Seconds a circuit stays open before one probe request is let through."""
    lease_linger: float = Field(0.2, ge=0, le=10)
    """Seconds an idle instance lease is kept for the next call of the same function
    before it is released to the scheduler; 0 = acquire and release for every call."""
    lease_max_age: float = Field(2.0, gt=0, le=60)
    """Seconds after which a lease goes back to the scheduler even under steady
    traffic (fairness to other replicas, retiring old versions)."""
    priority_aging_rate: float = Field(1.0, ge=0, le=100)
    """Starvation guard for calls waiting in this replica: priority levels gained per
    second waited; same env (THAW_PRIORITY_AGING_RATE) as the scheduler's policy."""
    fast_lane: bool = True
    """Plain function calls (a key, a body of at most 1 MiB by Content-Length, no Prefer,
    Idempotency-Key or webhook) are served by the lean HTTP/1.1 server of
    gateway/lane.py, the rest by aiohttp, on the same port; false = aiohttp serves
    everything (the same answers, about 0.15 ms slower a call)."""
    sync_wait_seconds: float = Field(60.0, gt=0, le=3600)
    """Longest a sync (non-streaming) call holds its request; past it the client gets
    303 to the invocation's result URL (202 with `Prefer: respond-async`)."""
    result_ttl_seconds: float = Field(86_400.0, gt=0, le=90 * 86_400)
    """How long a stored invocation result (async, past the wait limit, or under an
    Idempotency-Key) is kept; then GET answers 410 and the key may be used again."""
    async_concurrency: int = Field(32, ge=1, le=10_000)
    """Queued invocations this replica runs at once."""
    invocation_claim_seconds: float = Field(30.0, ge=1, le=3600)
    """An invocation a replica runs is claimed for this long and renewed while it runs;
    if the replica dies another picks it up once the claim lapses."""
    webhook_attempts: int = Field(5, ge=1, le=20)
    """Deliveries tried per webhook (exponential backoff between them)."""
    webhook_backoff_seconds: float = Field(1.0, gt=0, le=600)
    """Wait before the second webhook delivery; it doubles for each one after."""
    operator_tenant: str = Field("dev", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    """The tenant whose admin keys are the platform operator's (nodes, events, all
    tenants, quotas); the dev key of `thaw up` is in "dev"."""
    trust_forwarded_for: bool = False
    """Take the client's address from X-Forwarded-For (behind a trusted proxy) for
    rate limits of anonymous calls; the audit log records both either way."""

    @field_validator("queue_low_water")
    @classmethod
    def _below_high_water(cls, value: int, info: ValidationInfo) -> int:
        high = info.data.get("queue_high_water")
        if high is not None and value >= high:
            raise ValueError(f"must be below queue_high_water ({high})")
        return value

    @classmethod
    def of(cls, config: GatewayConfig) -> GatewaySettings:
        """Upgrade a plain GatewayConfig (as `thaw gateway` loads it): its resolved
        values win, the extra fields come from their own sources."""
        if isinstance(config, cls):
            return config
        return cls.load(**config.model_dump())  # type: ignore[no-any-return]

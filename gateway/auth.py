"""API keys: `Authorization: Bearer <key>`, checked by the scheduler (which stores
only SHA-256 digests) and cached here briefly, so the hot path makes no RPC. A key
revoked anywhere leaves this cache within about a second: `follow_revocations` asks
the scheduler each second for the keys revoked since its last answer (one cheap RPC
per replica, not one per call); the cache's TTL bounds it when the scheduler is away.

Who may do what:
- a key's scopes: `invoke`, `deploy`, `admin` (admin implies the other two), always
  within the key's own tenant;
- `admin` in a tenant manages that tenant's keys and settings (require);
- the platform operator is an `admin` key of the operator tenant
  (GatewaySettings.operator_tenant, "dev" by default: the tenant of the key `thaw up`
  creates); only it sees nodes, events, all tenants (require_operator).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog
from cachetools import TTLCache

from thaw.core.config import GatewayConfig
from thaw.core.errors import PermissionDenied, ThawError, Unauthenticated
from thaw.gateway.login_guard import FailedLogins
from thaw.gateway.scheduler_client import SchedulerClient
from thaw.proto import scheduler_pb2

log = structlog.get_logger()

# A key revoked at the scheduler stops working within this many seconds even when the
# revocation feed is down (must cover scheduler/tenancy.py's
# REVOCATION_FIRST_WINDOW_SECONDS: a first poll reaches back that far).
AUTH_CACHE_SECONDS = 10.0
# How often each replica asks for the keys revoked since (one RPC per replica).
REVOCATION_POLL_SECONDS = 1.0
AUTH_CACHE_KEYS = 10_000
# Must equal GatewaySettings.operator_tenant's default and the scheduler's DEV_TENANT.
DEFAULT_OPERATOR_TENANT = "dev"


class Authenticator:
    def __init__(self, scheduler: SchedulerClient,
                 failed_logins: FailedLogins | None = None) -> None:
        self.scheduler = scheduler
        self.failed_logins = failed_logins or FailedLogins(0, 1.0)
        # Keyed by digest: the keys themselves are never kept.
        self._cache: TTLCache[str, scheduler_pb2.Principal] = TTLCache(
            maxsize=AUTH_CACHE_KEYS, ttl=AUTH_CACHE_SECONDS)
        # Digests the scheduler did not know: asked again only after this TTL, so a
        # client repeating a bad key costs no lookup per request.
        self._unknown: TTLCache[str, str] = TTLCache(
            maxsize=AUTH_CACHE_KEYS, ttl=AUTH_CACHE_SECONDS)

    async def principal(self, authorization: str, address: str = ""
                        ) -> scheduler_pb2.Principal:
        """The key's principal. `address` (the client's): where a bad key counts as a
        failed login, and where too many of them refuse keys not already cached
        (gateway/login_guard.py); a key in the cache answers without either."""
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = self._cache.get(digest)
        if found is None:
            self.failed_logins.check(address)
            refused = self._unknown.get(digest)
            if refused is not None:
                self.failed_logins.failed(address)
                raise Unauthenticated(refused)
            try:
                found = await self.scheduler.authenticate(digest)
            except Unauthenticated as exc:
                self._unknown[digest] = exc.message
                self.failed_logins.failed(address)
                raise
            self._cache[digest] = found
        if found.expires_at and found.expires_at < time.time():
            # Expired while cached: not a moment longer than its expiry.
            self._cache.pop(digest, None)
            self.failed_logins.failed(address)
            raise Unauthenticated("API key expired")
        return found

    def forget_key(self, key_id: str) -> None:
        """A key was revoked through this replica: it stops working here at once
        (other replicas within about REVOCATION_POLL_SECONDS)."""
        self.forget_keys((key_id,))

    def forget_keys(self, key_ids: Iterable[str]) -> None:
        gone = set(key_ids)
        if not gone:
            return
        for digest, p in list(self._cache.items()):
            if p.key_id in gone:
                self._cache.pop(digest, None)

    async def follow_revocations(
            self, revoked_since: Callable[[float], Awaitable[tuple[list[str], float]]],
            sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Forever: drop the keys revoked since the last answer from the cache.
        `revoked_since(cursor)` -> (key ids, next cursor); cursor 0 = first call. An id
        may come more than once (the answers overlap): that also drops a key a lookup
        in flight during its revocation put back."""
        cursor = 0.0
        failing = False
        while True:
            try:
                key_ids, cursor = await revoked_since(cursor)
            except ThawError as exc:
                if not failing:  # once per outage, not each second
                    log.warning("revocation feed unavailable; revoked keys leave the "
                                "auth cache within its TTL", error=exc.message,
                                ttl_seconds=AUTH_CACHE_SECONDS)
                failing = True
            else:
                failing = False
                self.forget_keys(key_ids)
            await sleep(REVOCATION_POLL_SECONDS)


def require(p: scheduler_pb2.Principal, scope: str) -> None:
    """The key has `scope` (or `admin`) in its own tenant. `admin` here means the
    tenant's admin (its keys, its settings), not the platform operator: routes that
    concern the whole platform use require_operator."""
    if scope not in p.scopes and "admin" not in p.scopes:
        raise PermissionDenied(f"this API key lacks the '{scope}' scope")


def is_operator(p: scheduler_pb2.Principal, config: GatewayConfig) -> bool:
    operator_tenant = getattr(config, "operator_tenant", DEFAULT_OPERATOR_TENANT)
    return "admin" in p.scopes and p.tenant == operator_tenant


def require_operator(p: scheduler_pb2.Principal, config: GatewayConfig) -> None:
    """The platform operator only: an `admin` key of the operator tenant
    (GatewaySettings.operator_tenant). Use it for every route that shows or changes
    what is not one tenant's own: nodes (list, cordon, drain), the event log, all
    tenants, quotas, other tenants' keys, the whole audit log. An admin key of any
    other tenant gets 403 here."""
    if not is_operator(p, config):
        raise PermissionDenied("only the platform operator (an admin key of the "
                               "operator tenant) may do this")

"""API keys: `Authorization: Bearer <key>`, checked by the scheduler (which stores
only SHA-256 digests) and cached here briefly, so the hot path makes no RPC."""

from __future__ import annotations

import hashlib

from cachetools import TTLCache

from thaw.core.errors import PermissionDenied, Unauthenticated
from thaw.gateway.scheduler_client import SchedulerClient
from thaw.proto import scheduler_pb2

# A key revoked at the scheduler stops working within this many seconds.
AUTH_CACHE_SECONDS = 10.0
AUTH_CACHE_KEYS = 10_000


class Authenticator:
    def __init__(self, scheduler: SchedulerClient) -> None:
        self.scheduler = scheduler
        # Keyed by digest: the keys themselves are never kept.
        self._cache: TTLCache[str, scheduler_pb2.Principal] = TTLCache(
            maxsize=AUTH_CACHE_KEYS, ttl=AUTH_CACHE_SECONDS)

    async def principal(self, authorization: str) -> scheduler_pb2.Principal:
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = self._cache.get(digest)
        if found is None:
            found = await self.scheduler.authenticate(digest)
            self._cache[digest] = found
        return found


def require(p: scheduler_pb2.Principal, scope: str) -> None:
    if scope not in p.scopes and "admin" not in p.scopes:
        raise PermissionDenied(f"this API key lacks the '{scope}' scope")

"""Requests per minute per API key, in this replica's memory (see gateway/config.py),
and each key's and tenant's own budgets (gateway/budgets.py) through `admit`.

aiolimiter's leaky bucket is a token bucket turned upside down: capacity `burst`,
draining at rpm/60 per second. Its acquire() waits for capacity; the gateway never
waits on a client's behalf, so it checks has_capacity() first and answers 429.
"""

from __future__ import annotations

import math

from aiolimiter import AsyncLimiter
from cachetools import LRUCache

from thaw.gateway.budgets import BudgetBook
from thaw.gateway.errors import RateLimited
from thaw.proto import scheduler_pb2

# Keys tracked at once; the least recently seen beyond this start with a full bucket
# again, which errs on the side of the caller.
MAX_TRACKED_KEYS = 100_000


class KeyRateLimiter:
    def __init__(self, rpm: float, burst: int = 0) -> None:
        self.rpm = rpm
        self.burst = burst or max(1, math.ceil(rpm))
        self._buckets: LRUCache[str, AsyncLimiter] = LRUCache(MAX_TRACKED_KEYS)
        self.budgets = BudgetBook()

    async def admit(self, p: scheduler_pb2.Principal) -> None:
        """The platform-wide per-minute rate, then the key's and its tenant's request
        budgets; raises RateLimited (BudgetExceeded for a budget)."""
        await self.check(p.key_id or p.tenant)
        self.budgets.admit(p)

    @property
    def enabled(self) -> bool:
        return self.rpm > 0

    async def check(self, key_id: str) -> None:
        """Take one token for this key or raise RateLimited."""
        if not self.enabled:
            return
        bucket = self._buckets.get(key_id)
        if bucket is None:
            # time_period such that the bucket drains at exactly rpm / 60 per second.
            bucket = AsyncLimiter(self.burst, self.burst * 60.0 / self.rpm)
            self._buckets[key_id] = bucket
        if not bucket.has_capacity():
            # The bucket is full to within one token, so one token's drip time is
            # enough for the next request to fit: an upper bound, not a guess.
            raise RateLimited(
                f"this API key is limited to {self.rpm:g} requests per minute "
                f"(bursts of {self.burst})", retry_after=60.0 / self.rpm)
        # Returns at once: the capacity was just checked and nothing awaited since.
        await bucket.acquire()

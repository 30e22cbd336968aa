"""Failed logins per client address, in this replica's memory.

A request with a bad, unknown or expired API key is a failed login. An address with
`limit` of them within the last `window` seconds gets 429 (Retry-After: until its
oldest failure leaves the window) for every key the auth cache does not already know,
before any lookup at the scheduler: a guesser costs the platform a dictionary lookup
per attempt, not a DB query. Keys that authenticated recently are in the cache and
answer as before, so the address's good callers are not slowed (auth.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from cachetools import LRUCache

from thaw.gateway.errors import TooManyFailedLogins

# Addresses tracked at once; the least recently failing beyond this are forgotten
# (which errs on the side of the caller, as KeyRateLimiter does).
MAX_TRACKED_ADDRESSES = 100_000


class FailedLogins:
    """`limit` failures per address within `window` seconds; limit 0 = no limit."""

    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        # Per address: the times of its failures within the window, oldest first
        # (at most `limit` kept: older ones cannot matter).
        self._failures: LRUCache[str, deque[float]] = LRUCache(MAX_TRACKED_ADDRESSES)

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def check(self, address: str) -> None:
        """Raise TooManyFailedLogins when `address` is over its limit."""
        if not self.enabled or not address:
            return
        now = self._clock()
        times = self._recent(address, now)
        if times is not None and len(times) >= self.limit:
            raise TooManyFailedLogins(
                f"too many requests with a bad or unknown API key from this address "
                f"({self.limit} within {self.window:g}s); try again later",
                retry_after=times[0] + self.window - now, field="Authorization")

    def failed(self, address: str) -> None:
        """One more failed login from `address`."""
        if not self.enabled or not address:
            return
        now = self._clock()
        times = self._recent(address, now)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.limit)
        times.append(now)

"""Per-function queue bound with hysteresis: requests waiting in this replica for an
instance of one function. Past the high-water mark new requests are shed with 429
until the queue has drained to the low-water mark, so a function at its limit is not
flapping between admitting and shedding on every request.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from thaw.gateway.errors import Overloaded

# What a shed caller is told: roughly the time a queue at its high-water mark takes
# to move when instances are starting (a restore is well under this).
SHED_RETRY_SECONDS = 2.0


class QueueState(str, enum.Enum):
    ADMITTING = "admitting"
    SHEDDING = "shedding"


class FunctionQueues:
    def __init__(self, high_water: int, low_water: int,
                 on_depth: Callable[[str, int], None] | None = None) -> None:
        if not 0 <= low_water < high_water:
            raise ValueError("need 0 <= low_water < high_water")
        self.high_water = high_water
        self.low_water = low_water
        self._on_depth = on_depth
        self.depth: dict[str, int] = {}
        self.shedding: set[str] = set()

    def state(self, function: str) -> QueueState:
        return QueueState.SHEDDING if function in self.shedding else QueueState.ADMITTING

    def _set_depth(self, function: str, depth: int) -> None:
        if depth:
            self.depth[function] = depth
        else:
            self.depth.pop(function, None)
        if function in self.shedding and depth <= self.low_water:
            self.shedding.discard(function)
        elif depth >= self.high_water:
            self.shedding.add(function)
        if self._on_depth is not None:
            self._on_depth(function, depth)

    @contextmanager
    def waiting(self, function: str) -> Iterator[None]:
        """Hold a place in the function's queue while waiting for an instance."""
        depth = self.depth.get(function, 0)
        if function in self.shedding or depth >= self.high_water:
            self.shedding.add(function)
            raise Overloaded(
                f"{function} has {depth} requests waiting for an instance in this gateway "
                f"(limit {self.high_water}); retry later", retry_after=SHED_RETRY_SECONDS)
        self._set_depth(function, depth + 1)
        try:
            yield
        finally:
            self._set_depth(function, self.depth.get(function, 1) - 1)

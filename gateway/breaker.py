"""Circuit breakers: a function whose instances keep crashing, or a node that cannot be
reached, fails fast with 503 instead of costing every caller a restore or a timeout.

A small explicit state machine rather than pybreaker/aiobreaker: pybreaker's async
path needs tornado, aiobreaker is unmaintained since 2021, and both count exceptions
raised by a wrapped call, whereas here an outcome is an HTTP status seen later while
the answer streams; both also read the wall clock, which a property test cannot drive.

CLOSED --failure x threshold--> OPEN --cooldown--> HALF_OPEN --probe ok--> CLOSED
                                  ^------------------ probe failed ------------'
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from thaw.gateway.errors import CircuitOpen

# Calls let through at once while half-open; their outcome decides open or closed.
HALF_OPEN_PROBES = 1
# What a refused caller is told while a probe's outcome is pending.
PROBE_PENDING_RETRY_SECONDS = 1.0


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    """A failure below the threshold."""
    TRIP = "trip"
    """The failure that reaches the threshold."""
    COOLDOWN_ELAPSED = "cooldown_elapsed"


# The one table of legal moves; anything else is a bug and raises.
TRANSITIONS: dict[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (BreakerState.CLOSED, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerEvent.FAILURE): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.COOLDOWN_ELAPSED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.TRIP): BreakerState.OPEN,
}


@dataclass(frozen=True)
class Permit:
    """A call the breaker let through; its outcome must be reported exactly once
    (success, failure, or neither when the call proved nothing)."""

    epoch: int
    probe: bool


class CircuitBreaker:
    def __init__(self, name: str, failure_threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probes_in_flight = 0
        # Bumped on every change of state: outcomes of calls let through under an
        # older state (a slow call that started before the circuit opened) are stale.
        self.epoch = 0

    def _fire(self, event: BreakerEvent) -> None:
        target = TRANSITIONS.get((self.state, event))
        if target is None:
            raise RuntimeError(f"breaker {self.name}: no move from {self.state.value} "
                               f"on {event.value}")
        if target is not self.state:
            self.state = target
            self.epoch += 1
            self.probes_in_flight = 0
            if target is BreakerState.OPEN:
                self.opened_at = self._clock()
            if target is BreakerState.CLOSED:
                self.failures = 0

    def allow(self) -> Permit:
        """Let a call through or raise CircuitOpen with how long to wait."""
        if self.state is BreakerState.OPEN:
            # min(): float rounding of a large clock must not promise more than cooldown.
            remaining = min(self.cooldown, self.opened_at + self.cooldown - self._clock())
            if remaining > 0:
                raise CircuitOpen(
                    f"{self.name} failed {self.failure_threshold} times in a row; "
                    f"calls fail fast for {self.cooldown:g}s", retry_after=remaining)
            self._fire(BreakerEvent.COOLDOWN_ELAPSED)
        if self.state is BreakerState.HALF_OPEN:
            if self.probes_in_flight >= HALF_OPEN_PROBES:
                raise CircuitOpen(f"{self.name} is being probed after failures; retry soon",
                                  retry_after=PROBE_PENDING_RETRY_SECONDS)
            self.probes_in_flight += 1
            return Permit(self.epoch, probe=True)
        return Permit(self.epoch, probe=False)

    def _current(self, permit: Permit) -> bool:
        return self.state is BreakerState.CLOSED or permit.epoch == self.epoch

    def record_success(self, permit: Permit) -> None:
        if not self._current(permit):
            return
        if self.state is BreakerState.CLOSED:
            self.failures = 0
            self._fire(BreakerEvent.SUCCESS)
        elif self.state is BreakerState.HALF_OPEN and permit.probe:
            self._fire(BreakerEvent.SUCCESS)

    def record_failure(self, permit: Permit) -> None:
        if not self._current(permit):
            return
        if self.state is BreakerState.CLOSED:
            self.failures += 1
            self._fire(BreakerEvent.TRIP if self.failures >= self.failure_threshold
                       else BreakerEvent.FAILURE)
        elif self.state is BreakerState.HALF_OPEN and permit.probe:
            self._fire(BreakerEvent.TRIP)

    def record_nothing(self, permit: Permit) -> None:
        """The call ended without a verdict (the client gave up, it was a 4xx): a
        probe slot is freed for the next caller."""
        if permit.probe and self.state is BreakerState.HALF_OPEN and permit.epoch == self.epoch:
            self.probes_in_flight -= 1


class Breakers:
    """One breaker per name (a function, a node), created on the first failure and
    dropped once closed again, so names callers make up cost no memory."""

    def __init__(self, kind: str, failure_threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str, BreakerState], None] | None = None) -> None:
        self.kind = kind
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._by_name: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker | None:
        return self._by_name.get(name)

    def allow(self, name: str) -> Permit | None:
        """None: no breaker yet, the call goes through and only a failure counts."""
        breaker = self._by_name.get(name)
        if breaker is None:
            return None
        before = breaker.state
        try:
            return breaker.allow()
        finally:
            self._changed(breaker, before)

    def record(self, name: str, permit: Permit | None, ok: bool | None) -> None:
        """ok: True success, False failure, None no verdict."""
        breaker = self._by_name.get(name)
        if breaker is None:
            if ok is not False:
                return
            breaker = CircuitBreaker(f"{self.kind} {name}", self.failure_threshold,
                                     self.cooldown, self._clock)
            self._by_name[name] = breaker
        before = breaker.state
        if permit is None:
            permit = Permit(breaker.epoch, probe=False)
        if ok is True:
            breaker.record_success(permit)
        elif ok is False:
            breaker.record_failure(permit)
        else:
            breaker.record_nothing(permit)
        self._changed(breaker, before)
        if breaker.state is BreakerState.CLOSED and breaker.failures == 0:
            del self._by_name[name]

    def _changed(self, breaker: CircuitBreaker, before: BreakerState) -> None:
        if breaker.state is not before and self._on_change is not None:
            self._on_change(self.kind, breaker.name.partition(" ")[2], breaker.state)

"""The circuit breaker's state machine, property-based (STYLE.md: a state-machine test
per lifecycle), plus the per-name table that creates and drops breakers."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from thaw.gateway.breaker import (
    HALF_OPEN_PROBES,
    TRANSITIONS,
    Breakers,
    BreakerState,
    CircuitBreaker,
    Permit,
)
from thaw.gateway.errors import CircuitOpen

THRESHOLD = 3
COOLDOWN = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reachable(state: BreakerState) -> set[BreakerState]:
    return {state} | {to for (frm, _event), to in TRANSITIONS.items() if frm is state}


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.breaker = CircuitBreaker("fn t/x", THRESHOLD, COOLDOWN, self.clock)
        self.permits: list[Permit] = []
        self.consecutive_failures = 0  # reported under CLOSED with current permits

    def _step(self, action: str, permit: Permit | None = None) -> None:
        before = self.breaker.state
        was_current = permit is not None and (before is BreakerState.CLOSED
                                              or permit.epoch == self.breaker.epoch)
        if action == "success":
            assert permit is not None
            self.breaker.record_success(permit)
            if before is BreakerState.CLOSED:
                self.consecutive_failures = 0
            if before is BreakerState.HALF_OPEN and permit.probe and was_current:
                assert self.breaker.state is BreakerState.CLOSED
        elif action == "failure":
            assert permit is not None
            self.breaker.record_failure(permit)
            if before is BreakerState.CLOSED:
                self.consecutive_failures += 1
                if self.consecutive_failures >= THRESHOLD:
                    assert self.breaker.state is BreakerState.OPEN
                    self.consecutive_failures = 0
            if before is BreakerState.HALF_OPEN and permit.probe and was_current:
                assert self.breaker.state is BreakerState.OPEN
        elif action == "nothing":
            assert permit is not None
            self.breaker.record_nothing(permit)
            assert self.breaker.state is before  # no verdict moves nothing
        assert self.breaker.state in reachable(before), (before, self.breaker.state)
        if self.breaker.state is BreakerState.CLOSED and before is not BreakerState.CLOSED:
            self.consecutive_failures = 0

    @rule()
    def call(self) -> None:
        before = self.breaker.state
        open_until = self.breaker.opened_at + COOLDOWN
        probes = self.breaker.probes_in_flight
        try:
            permit = self.breaker.allow()
        except CircuitOpen as exc:
            assert 0 < exc.retry_after <= COOLDOWN
            if before is BreakerState.OPEN:
                assert self.clock.now < open_until
            else:
                assert before is BreakerState.HALF_OPEN and probes >= HALF_OPEN_PROBES
            return
        if before is BreakerState.OPEN:
            assert self.clock.now >= open_until  # it let a call through only after cooling
        if self.breaker.state is BreakerState.HALF_OPEN:
            assert permit.probe
        assert self.breaker.state in reachable(before)
        self.permits.append(permit)

    @precondition(lambda self: self.permits)
    @rule(index=st.integers(min_value=0), outcome=st.sampled_from(["success", "failure",
                                                                   "nothing"]))
    def finish(self, index: int, outcome: str) -> None:
        permit = self.permits.pop(index % len(self.permits))
        self._step(outcome, permit)

    @rule(seconds=st.floats(min_value=0, max_value=2 * COOLDOWN))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def bounded(self) -> None:
        b = self.breaker
        assert b.probes_in_flight <= HALF_OPEN_PROBES
        if b.state is BreakerState.CLOSED:
            assert b.failures < THRESHOLD
        else:
            assert b.probes_in_flight >= 0


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=200, stateful_step_count=40,
                                       deadline=None)


def test_opens_after_threshold_then_probes_then_closes() -> None:
    clock = FakeClock()
    b = CircuitBreaker("node n1", 2, COOLDOWN, clock)
    for _ in range(2):
        b.record_failure(b.allow())
    assert b.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as refused:
        b.allow()
    assert refused.value.retry_after == pytest.approx(COOLDOWN)
    clock.now += COOLDOWN
    probe = b.allow()
    assert b.state is BreakerState.HALF_OPEN and probe.probe
    with pytest.raises(CircuitOpen):
        b.allow()  # one probe at a time
    b.record_success(probe)
    assert b.state is BreakerState.CLOSED and b.failures == 0


def test_a_stale_outcome_does_not_decide_the_probe() -> None:
    clock = FakeClock()
    b = CircuitBreaker("fn t/x", 1, COOLDOWN, clock)
    slow = b.allow()  # a call that started while closed
    b.record_failure(b.allow())
    assert b.state is BreakerState.OPEN
    clock.now += COOLDOWN
    probe = b.allow()
    b.record_success(slow)  # finishes late: says nothing about the function now
    assert b.state is BreakerState.HALF_OPEN
    b.record_failure(probe)
    assert b.state is BreakerState.OPEN


def test_breakers_exist_only_while_something_failed() -> None:
    changes: list[tuple[str, str, BreakerState]] = []
    board = Breakers("function", 2, COOLDOWN, FakeClock(),
                     on_change=lambda kind, name, state: changes.append((kind, name, state)))
    assert board.allow("t/a") is None
    board.record("t/a", None, True)
    assert board.get("t/a") is None  # successes of healthy functions cost nothing
    board.record("t/a", None, False)
    assert board.get("t/a") is not None
    board.record("t/a", board.allow("t/a"), False)
    assert changes == [("function", "t/a", BreakerState.OPEN)]
    with pytest.raises(CircuitOpen):
        board.allow("t/a")

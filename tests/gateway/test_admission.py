"""Units of load protection: the per-function queue bound with hysteresis (property-
based) and the per-key rate limiter."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thaw.gateway.admission import FunctionQueues, QueueState
from thaw.gateway.errors import Overloaded, RateLimited
from thaw.gateway.ratelimit import KeyRateLimiter


@settings(max_examples=300, deadline=None)
@given(high=st.integers(2, 8), gap=st.integers(1, 7),
       steps=st.lists(st.booleans(), max_size=60))
def test_queue_sheds_between_the_water_marks(high: int, gap: int, steps: list[bool]) -> None:
    low = max(0, high - gap)
    depths: list[int] = []
    queues = FunctionQueues(high, low, on_depth=lambda _fn, depth: depths.append(depth))
    held: list[contextlib.ExitStack] = []
    shedding = False
    for arrive in steps:
        if arrive:
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(queues.waiting("t/f"))
            except Overloaded as exc:
                assert exc.retry_after > 0
                # Refused only at the high mark, or on the way down to the low one.
                assert len(held) >= high or (shedding and len(held) > low)
                shedding = True
                continue
            assert not shedding or len(held) <= low
            held.append(stack)
        elif held:
            held.pop().close()
        depth = len(held)
        if depth >= high:
            shedding = True
        elif depth <= low:
            shedding = False
        assert queues.depth.get("t/f", 0) == depth <= high
        assert queues.state("t/f") is (QueueState.SHEDDING if shedding else QueueState.ADMITTING)
    assert all(0 <= d <= high for d in depths)


def test_water_marks_are_checked() -> None:
    with pytest.raises(ValueError):
        FunctionQueues(4, 4)


async def test_rate_limit_is_a_token_bucket_per_key() -> None:
    limiter = KeyRateLimiter(rpm=60, burst=3)
    for _ in range(3):
        await limiter.check("key-a")
    with pytest.raises(RateLimited) as refused:
        await limiter.check("key-a")
    # One token drips in a second at 60 per minute: the bound told to the client.
    assert 0 < refused.value.retry_after <= 1.0
    await limiter.check("key-b")  # another key has its own bucket


async def test_no_rate_limit_by_default() -> None:
    limiter = KeyRateLimiter(rpm=0)
    for _ in range(1000):
        await limiter.check("key")

"""Background passes on a node: they wait for a quiet node, then run on a thread of
their own at background priority (platform/background.py)."""

from __future__ import annotations

import os
import threading

import pytest

from thaw.platform.background import BACKGROUND_NICE, in_background, when_quiet


class Clock:
    """Time that moves only when the test says: each busy() check is one poll."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_it_waits_until_the_node_has_been_idle_for_the_settle_time() -> None:
    clock = Clock()
    # Busy at 0.0-0.2 (an instance starting), idle at 0.3, busy again at 0.4 (its call
    # arrived), idle from 0.5 on.
    busy_at = {0.0, 0.1, 0.2, 0.4}
    checks: list[float] = []

    def busy() -> bool:
        checks.append(clock.now)
        now = round(clock.now, 1)
        clock.now = now + 0.1
        return now in busy_at

    waited = await when_quiet(busy, limit=30.0, settle=1.0, poll=0.0, clock=clock)
    # Idle from 0.5: quiet once 1.0 passed since the last busy check at 0.4.
    assert waited == pytest.approx(1.5)
    assert not any(round(t, 1) > 1.4 for t in checks)


async def test_it_gives_up_waiting_at_its_limit() -> None:
    clock = Clock()

    def busy() -> bool:
        clock.now += 0.1
        return True

    waited = await when_quiet(busy, limit=2.0, settle=1.0, poll=0.0, clock=clock)
    assert 2.0 <= waited < 2.2


def test_background_work_runs_at_low_priority_in_its_threads_only() -> None:
    caller = os.getpriority(os.PRIO_PROCESS, 0)

    def work(x: int) -> tuple[int, int, int]:
        inner: list[int] = []
        thread = threading.Thread(target=lambda: inner.append(
            os.getpriority(os.PRIO_PROCESS, 0)))
        thread.start()
        thread.join()
        return x * 2, os.getpriority(os.PRIO_PROCESS, 0), inner[0]

    doubled, nice, child = in_background(work, 21)
    assert doubled == 42
    assert nice == child == BACKGROUND_NICE  # threads it starts inherit it
    assert os.getpriority(os.PRIO_PROCESS, 0) == caller


def test_background_work_raises_what_it_raised() -> None:
    def fails() -> None:
        raise ValueError("no room")

    with pytest.raises(ValueError, match="no room"):
        in_background(fails)


def test_a_node_is_busy_while_a_call_is_in_flight_or_an_instance_is_not_serving() -> None:
    from types import SimpleNamespace

    from thaw.platform.instances import InstanceState, any_busy

    serving = SimpleNamespace(inflight=0, state=InstanceState.READY)
    assert not any_busy([serving]) and not any_busy([])
    assert any_busy([serving, SimpleNamespace(inflight=1, state=InstanceState.READY)])
    assert any_busy([serving, SimpleNamespace(inflight=0, state=InstanceState.RESTORING)])

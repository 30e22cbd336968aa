"""The priority wait queue (core/priority.py) with an injected clock: priority order,
FIFO within a level, aging overtakes, a raise reorders."""

from __future__ import annotations

import pytest

from thaw.core.priority import PriorityWaitQueue, valid_priority


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain(q: PriorityWaitQueue[str]) -> list[str]:
    out = []
    while (w := q.pop()) is not None:
        out.append(w.item)
    return out


def test_higher_priority_first_fifo_within_a_level() -> None:
    clock = Clock()
    q: PriorityWaitQueue[str] = PriorityWaitQueue(aging_rate=0.0, clock=clock)
    for item, prio in [("a50", 50), ("b10", 10), ("c90", 90), ("d50", 50), ("e90", 90),
                       ("f10", 10)]:
        q.push(item, prio)
        clock.now += 0.001
    assert [w.item for w in q] == ["c90", "e90", "a50", "d50", "b10", "f10"]
    assert len(q) == 6
    assert drain(q) == ["c90", "e90", "a50", "d50", "b10", "f10"]
    assert not q and q.head() is None


def test_equal_priorities_at_the_same_instant_keep_arrival_order() -> None:
    q: PriorityWaitQueue[int] = PriorityWaitQueue(aging_rate=1.0, clock=Clock())
    for i in range(20):
        q.push(i, 30)
    assert [w.item for w in q] == list(range(20))


def test_aging_lets_a_long_waiter_overtake_newer_higher_priority_ones() -> None:
    clock = Clock()
    q: PriorityWaitQueue[str] = PriorityWaitQueue(aging_rate=1.0, clock=clock)
    old = q.push("old-low", 10)
    clock.now += 30.0
    q.push("new-high", 35)  # 10 + 30 s of aging = 40 > 35
    q.push("new-higher", 45)  # 45 > 40
    assert [w.item for w in q] == ["new-higher", "old-low", "new-high"]
    assert q.effective(old) == pytest.approx(40.0)
    clock.now += 100.0  # every waiter ages alike: the order holds
    assert [w.item for w in q] == ["new-higher", "old-low", "new-high"]


def test_without_aging_a_low_priority_waits_behind_any_newer_higher_one() -> None:
    clock = Clock()
    q: PriorityWaitQueue[str] = PriorityWaitQueue(aging_rate=0.0, clock=clock)
    q.push("old-low", 10)
    clock.now += 3600.0
    q.push("new", 11)
    assert q.head() is not None and q.head().item == "new"  # type: ignore[union-attr]


def test_a_raise_moves_a_queued_waiter_ahead_and_keeps_its_wait() -> None:
    clock = Clock()
    q: PriorityWaitQueue[str] = PriorityWaitQueue(aging_rate=0.0, clock=clock)
    q.push("a", 50, key="inv-a")
    clock.now += 1
    q.push("b", 50, key="inv-b")
    clock.now += 1
    c = q.push("c", 50, key="inv-c")
    assert q.rank(c) == 2
    found = q.find("inv-c")
    assert found is c
    q.set_priority(c, 80)
    assert [w.item for w in q] == ["c", "a", "b"]
    assert q.rank(c) == 0
    # Lowered back to the level of the others, it is behind them again (arrived last).
    q.set_priority(c, 50)
    assert [w.item for w in q] == ["a", "b", "c"]
    # An equal-priority raise among others keeps arrival order within the new level.
    a = q.find("inv-a")
    assert a is not None
    q.set_priority(a, 70)
    q.set_priority(c, 70)
    assert drain(q) == ["a", "c", "b"]
    assert q.find("inv-a") is None  # served: no longer found


def test_removed_waiters_are_skipped_and_not_found() -> None:
    q: PriorityWaitQueue[str] = PriorityWaitQueue(clock=Clock())
    a = q.push("a", 90, key="a")
    q.push("b", 50)
    assert q.remove(a)
    assert not q.remove(a)
    assert q.find("a") is None
    assert len(q) == 1 and q.head() is not None and q.head().item == "b"  # type: ignore[union-attr]
    q.set_priority(a, 100)  # a raise of a waiter no longer queued does nothing
    assert [w.item for w in q] == ["b"]


def test_stale_heap_slots_are_swept() -> None:
    q: PriorityWaitQueue[int] = PriorityWaitQueue(clock=Clock())
    keep = q.push(-1, 1)
    for i in range(1000):
        w = q.push(i, 100)
        q.set_priority(w, 99)
        q.remove(w)
    assert len(q) == 1 and q.head() is keep
    assert len(q._heap) < 200


def test_valid_priority() -> None:
    assert valid_priority(1) and valid_priority(100)
    assert not valid_priority(0) and not valid_priority(101)
    assert not valid_priority(True) and not valid_priority("5") and not valid_priority(5.0)

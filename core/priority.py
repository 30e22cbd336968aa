"""Invocation priority: the order in which waiting requests are served.

A waiting request has a priority from 1 to 100. The one served next is the one with
the highest *effective* priority, `priority + aging_rate * seconds_waited`, and among
equals the one that arrived first. Aging is the starvation guard: a request of low
priority that has waited long enough goes ahead of newer ones of higher priority.

Every waiter ages at the same rate, so the order of two waiters never changes with
time: `p1 + r*(now - t1) > p2 + r*(now - t2)` exactly when `p1 - r*t1 > p2 - r*t2`.
The queue therefore keeps a heap on that time-free key; a raise (an operator moving a
queued invocation ahead) pushes the entry again and leaves the old heap slot stale.

Pure and synchronous: the clock is injected, and waking waiters is up to the caller
(the scheduler's FunctionPool, the gateway's LeasePool).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

PRIORITY_MIN = 1
PRIORITY_MAX = 100
# What an invocation gets when neither the request, the function nor the key says
# (keep in sync with api_keys.priority_default's column default in models.py).
PRIORITY_DEFAULT = 50

# Stale heap slots (removed or raised waiters) beyond twice the live ones plus this
# are swept out, so a queue whose waiters mostly give up does not grow without bound.
COMPACT_SLACK = 64

T = TypeVar("T")


def valid_priority(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and PRIORITY_MIN <= value <= PRIORITY_MAX)


@dataclass(eq=False)
class Waiter(Generic[T]):
    """One queued request. `item` is the caller's (a future, an id, ...)."""

    item: T
    priority: int
    enqueued: float
    key: str = ""
    """The invocation id, for raises; "" when the caller has none."""
    seq: int = 0
    queued: bool = True
    _generation: int = field(default=0, repr=False)


class PriorityWaitQueue(Generic[T]):
    """Waiting requests in serving order: highest effective priority first, FIFO
    among equals, aging `aging_rate` priority levels per second waited."""

    def __init__(self, aging_rate: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if aging_rate < 0:
            raise ValueError("aging_rate must be >= 0")
        self.aging_rate = aging_rate
        self._clock = clock
        self._heap: list[tuple[float, int, int, Waiter[T]]] = []
        self._seq = itertools.count()
        self._by_key: dict[str, Waiter[T]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def push(self, item: T, priority: int = PRIORITY_DEFAULT, key: str = "") -> Waiter[T]:
        waiter = Waiter(item=item, priority=priority, enqueued=self._clock(), key=key,
                        seq=next(self._seq))
        self._size += 1
        if key:
            self._by_key[key] = waiter
        self._heap_push(waiter)
        return waiter

    def _heap_push(self, waiter: Waiter[T]) -> None:
        # Smallest first: the negated time-free key, then arrival.
        rank = -(waiter.priority - self.aging_rate * waiter.enqueued)
        heapq.heappush(self._heap, (rank, waiter.seq, waiter._generation, waiter))

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and (not heap[0][3].queued or heap[0][2] != heap[0][3]._generation):
            heapq.heappop(heap)

    def head(self) -> Waiter[T] | None:
        """The waiter to serve next (still queued), or None."""
        self._drop_stale()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Waiter[T] | None:
        """Remove and return the waiter to serve next."""
        waiter = self.head()
        if waiter is not None:
            self.remove(waiter)
        return waiter

    def remove(self, waiter: Waiter[T]) -> bool:
        """Take it out of the queue (served, gave up); False if it was not queued."""
        if not waiter.queued:
            return False
        waiter.queued = False
        self._size -= 1
        if waiter.key and self._by_key.get(waiter.key) is waiter:
            del self._by_key[waiter.key]
        if not self._size:
            self._heap.clear()  # every slot left is stale
        elif len(self._heap) > 2 * self._size + COMPACT_SLACK:
            self._heap = [e for e in self._heap if e[3].queued and e[2] == e[3]._generation]
            heapq.heapify(self._heap)
        return True

    def find(self, key: str) -> Waiter[T] | None:
        waiter = self._by_key.get(key) if key else None
        return waiter if waiter is not None and waiter.queued else None

    def set_priority(self, waiter: Waiter[T], priority: int) -> None:
        """Give a queued waiter a new base priority; it keeps its place in time (its
        waiting so far still counts towards aging)."""
        if not waiter.queued or priority == waiter.priority:
            return
        waiter.priority = priority
        waiter._generation += 1
        self._heap_push(waiter)

    def effective(self, waiter: Waiter[T]) -> float:
        """Its priority now, aging included (for display and logs)."""
        return waiter.priority + self.aging_rate * (self._clock() - waiter.enqueued)

    def rank(self, waiter: Waiter[T]) -> int:
        """How many queued waiters are served before it (O(n))."""
        mine = (-(waiter.priority - self.aging_rate * waiter.enqueued), waiter.seq)
        return sum(1 for w in self if w is not waiter
                   and (-(w.priority - self.aging_rate * w.enqueued), w.seq) < mine)

    def __iter__(self) -> Iterator[Waiter[T]]:
        """The queued waiters in serving order (O(n log n))."""
        live = {id(w): w for *_, w in self._heap if w.queued}
        return iter(sorted(live.values(), key=lambda w: (
            -(w.priority - self.aging_rate * w.enqueued), w.seq)))

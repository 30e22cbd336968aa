"""What the scheduler did and why, as a bounded in-memory log with subscribers:
pressure changes, nodes lost, evictions, refused placements, failed restores. The
ListEvents and Events RPCs read it; the gateway's dashboard and alerting can follow
it. The log also counts its events by kind in a Prometheus registry, the scheduler's
metrics (`EventLog.registry`).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

# Events kept for ListEvents and for subscribers that fall behind; a subscriber
# further behind than this gets an EVENTS_LOST marker and continues from the oldest.
EVENT_LOG_CAPACITY = 10_000


class EventKind(str, enum.Enum):
    PRESSURE = "pressure"                  # a device or pinned tier changed level
    NODE_REGISTERED = "node_registered"
    NODE_LOST = "node_lost"
    NODE_RECOVERED = "node_recovered"      # heartbeats resumed after it was lost
    INSTANCE_STARTED = "instance_started"
    INSTANCE_STOPPED = "instance_stopped"  # scaled down, replaced, deleted
    INSTANCE_EVICTED = "instance_evicted"  # to make room, or under memory pressure
    INSTANCE_ADOPTED = "instance_adopted"  # found alive after a scheduler restart
    INSTANCE_LOST = "instance_lost"        # exited, failed, or its node was lost
    SNAPSHOT_EVICTED = "snapshot_evicted"  # a pinned copy dropped under pressure
    RESTORE_FAILED = "restore_failed"      # a restore failed; the instance started fresh
    RESTORE_RETRIED = "restore_retried"    # failed, not the snapshot's proven fault: retried
    SNAPSHOT_QUARANTINED = "snapshot_quarantined"  # never restored again (gateway alerts)
    PLACEMENT_QUEUED = "placement_queued"  # nothing fits: a request waits for room
    PLACEMENT_REFUSED = "placement_refused"  # queue full or timed out
    EVENTS_LOST = "events_lost"            # a subscriber fell behind the log
    VERSION_ACTIVATED = "version_activated"  # a deploy or rollback switched versions
    BUILD_FAILED = "build_failed"          # a version's build failed (the old one serves)
    BUILD_RETRIED = "build_retried"        # its node's agent died mid-build: built elsewhere
    NODE_CONDITION = "node_condition"      # a node's disk filled, went read-only, or recovered
    CHUNK_REPAIRED = "chunk_repaired"      # a corrupt chunk was fetched again or rebuilt
    PRIORITY_CHANGED = "priority_changed"  # an operator re-prioritized a queued invocation
    ACQUIRE_DEMOTED = "acquire_demoted"    # gateway bookkeeping: a call stopped waiting
    GARBAGE_COLLECTED = "garbage_collected"  # a node's garbage collected: bytes freed by kind
    SCHEDULE_RAN = "schedule_ran"          # a cron schedule's due time made an invocation
    SCHEDULE_SKIPPED = "schedule_skipped"  # a due time missed, or its previous run still ran
    SCHEDULE_REFUSED = "schedule_refused"  # its input is not what the function takes


class Actor(str, enum.Enum):
    """Who an event's change came from, in its `actor` attribute where both are
    possible: feeds show an operator's actions as changes and leave the platform's own
    bookkeeping out (it stays in the log, and in ListEvents)."""

    OPERATOR = "operator"
    SYSTEM = "system"


def is_bookkeeping(attrs: Iterable[tuple[str, str]]) -> bool:
    """Whether an event (by its attributes) is the platform's own bookkeeping."""
    return (ACTOR_ATTR, Actor.SYSTEM.value) in tuple(attrs)


ACTOR_ATTR = "actor"


@dataclass(frozen=True)
class Event:
    seq: int
    time: float
    """Unix time."""
    kind: EventKind
    message: str
    node_id: str = ""
    function: str = ""
    """tenant/name, when the event concerns one function."""
    attrs: tuple[tuple[str, str], ...] = ()


class EventLog:
    def __init__(self, capacity: int = EVENT_LOG_CAPACITY,
                 clock: Callable[[], float] = time.time,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        """The scheduler's Prometheus metrics: these counts and its parts' own."""
        self._counts = Counter("thaw_scheduler_events_total",
                               "Scheduler events emitted, by kind", ["kind"],
                               registry=self.registry)
        self._events: deque[Event] = deque(maxlen=capacity)
        self._clock = clock
        self._seq = 0
        self._appended = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, kind: EventKind, message: str, *, node_id: str = "", function: str = "",
             **attrs: object) -> Event:
        self._seq += 1
        event = Event(self._seq, self._clock(), kind, message, node_id, function,
                      tuple((k, str(v)) for k, v in sorted(attrs.items())))
        self._events.append(event)
        self._counts.labels(kind.value).inc()
        # Wake every subscriber at once; each re-reads from its own position.
        appended, self._appended = self._appended, asyncio.Event()
        appended.set()
        return event

    def since(self, after_seq: int = 0, limit: int = 0,
              kinds: Iterable[EventKind | str] = ()) -> list[Event]:
        """Events with seq > after_seq, oldest first, at most `limit` (0 = all kept)."""
        wanted = {EventKind(k) for k in kinds}
        out = []
        first = self._events[0].seq if self._events else self._seq + 1
        for event in list(self._events)[max(0, after_seq + 1 - first):]:
            if wanted and event.kind not in wanted:
                continue
            out.append(event)
            if limit and len(out) >= limit:
                break
        return out

    async def subscribe(self, after_seq: int | None = None,
                        kinds: Iterable[EventKind | str] = ()) -> AsyncIterator[Event]:
        """Every event after `after_seq` (None: from now on), then each new one as it
        is emitted, until the consumer stops iterating."""
        wanted = tuple(EventKind(k) for k in kinds)
        position = self._seq if after_seq is None else after_seq
        while True:
            appended = self._appended
            oldest = self._events[0].seq if self._events else self._seq + 1
            if position + 1 < oldest:
                yield Event(0, self._clock(), EventKind.EVENTS_LOST,
                            f"{oldest - position - 1} events were dropped before this "
                            "subscriber read them")
                position = oldest - 1
            batch = self.since(position)
            for event in batch:
                position = event.seq
                if not wanted or event.kind in wanted:
                    yield event
            if not batch:
                await appended.wait()

"""The alert engine: view -> rules -> book -> notices handed to the sinks
(gateway/alert_sinks.py), which deliver in the background."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from prometheus_client import Gauge

from thaw.core.errors import ThawError
from thaw.gateway.alert_sinks import Notice
from thaw.gateway.alerts.book import AlertBook
from thaw.gateway.alerts.sources import EVENTS_PAGE, AlertSources
from thaw.gateway.alerts.view import (
    RESTORE_FAILED,
    SNAPSHOT_QUARANTINED,
    ClusterView,
    RestoreEvent,
    Rule,
)

log = structlog.get_logger()

# Restore events remembered at most (per gateway), whatever the window.
EVENTS_KEPT = 10_000


class AlertEngine:
    def __init__(self, rules: Sequence[Rule], sources: AlertSources,
                 notify: Callable[[Notice], None], clock: Callable[[], float] = time.time,
                 firing_gauge: Gauge | None = None) -> None:
        self.rules = list(rules)
        self.sources = sources
        self.notify = notify
        self.clock = clock
        self.book = AlertBook()
        self._firing_gauge = firing_gauge
        self._after_seq = 0
        self._events: deque[RestoreEvent] = deque(maxlen=EVENTS_KEPT)
        self._wanted = {r.name for r in self.rules}
        self._event_window = max((r.window for r in self.rules
                                  if r.name in ("restore_failures", "snapshot_quarantined")),
                                 default=0.0)
        self._call_window = max((r.window for r in self.rules
                                 if r.name in ("error_rate", "p99_latency")), default=0.0)

    async def _read(self, what: str, read: Callable[[], Any]) -> Any:
        try:
            result = read()
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except ThawError as exc:
            log.info("alert source unavailable", source=what, error=str(exc))
            return None
        except Exception as exc:
            # A source's bug (or a stand-in scheduler without that call) costs only the
            # rules on that source, not the round.
            log.warning("alert source failed", source=what, error=repr(exc))
            return None

    async def _restore_events(self, now: float) -> Sequence[RestoreEvent] | None:
        while True:
            got = await self._read("events", lambda: self.sources.events(
                self._after_seq, (RESTORE_FAILED, SNAPSHOT_QUARANTINED)))
            if got is None:
                return None
            last_seq, events = got
            if last_seq < self._after_seq:
                self._after_seq = 0  # the scheduler restarted: its numbering with it
                continue
            for e in events:
                self._after_seq = max(self._after_seq, e.seq)
                self._events.append(RestoreEvent(e.time, e.kind, e.function, e.message))
            if len(events) < EVENTS_PAGE:
                break
        while self._events and self._events[0].time < now - self._event_window:
            self._events.popleft()
        return list(self._events)

    async def collect(self) -> ClusterView:
        now = self.clock()
        wanted = self._wanted
        nodes = queue = events = calls = keys = None
        if wanted & {"device_pressure", "pinned_pressure", "node_down"}:
            nodes = await self._read("nodes", self.sources.nodes)
        if "queue_depth" in wanted:
            queue = await self._read("queues", self.sources.queue_depths)
        if wanted & {"restore_failures", "snapshot_quarantined"}:
            events = await self._restore_events(now)
        if wanted & {"error_rate", "p99_latency"}:
            calls = await self._read("calls", lambda: self.sources.calls(
                self._call_window, now))
        if "api_key_expiring" in wanted:
            keys = await self._read("api_keys", self.sources.api_keys)
        return ClusterView(now, nodes, queue, events, calls, keys)

    async def evaluate(self) -> list[Notice]:
        """One round: gather, judge, hand every transition to the sinks."""
        view = await self.collect()
        notices: list[Notice] = []
        for rule in self.rules:
            breaches = rule.check(rule, view)
            if breaches is not None:
                notices.extend(self.book.update(rule, breaches, view.now))
        for notice in notices:
            log.warning("alert " + notice.state.value, alert=notice.alert,
                        subject=notice.subject, value=notice.value, message=notice.message)
            self.notify(notice)
        if self._firing_gauge is not None:
            counts = {r.name: 0 for r in self.rules}
            for a in self.book.firing():
                counts[a.rule] = counts.get(a.rule, 0) + 1
            for name, n in counts.items():
                self._firing_gauge.labels(name).set(n)
        return notices

    async def run_forever(self, interval: float) -> None:
        while True:
            try:
                await self.evaluate()
            except Exception:
                # A bug in one round must not end alerting for the process's life.
                log.exception("alert evaluation failed")
            await asyncio.sleep(interval)

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": [{"alert": r.name, "severity": r.severity, "threshold": r.threshold,
                       "for": r.for_seconds, "cooldown": r.cooldown} for r in self.rules],
            "active": [a.to_json() for a in self.book.active.values()],
            "recent": list(reversed(self.book.recent)),
            "api_keys_source": getattr(self.sources, "key_source", ""),
        }

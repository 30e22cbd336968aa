"""Alerting: rules over the platform's state, each alert announced once when it fires
and once when it clears (RESOLVED), to webhook and Slack-compatible sinks.

Layers, one concern each:
- `ClusterView`: what one evaluation looks at, gathered by `AlertSources` (the I/O:
  the scheduler's nodes and events, this gateway's queues and live statistics, the
  tenancy service's keys). A source that fails leaves its part None and the rules on it
  are skipped that round: an unreachable scheduler neither fires nor resolves anything.
- rules (`RULES`): pure functions of a view -> the subjects in breach right now;
- `AlertBook`: the state machine of every (rule, subject) -- pending (its `for` not yet
  served), firing, cleared -- and the cooldown: a FIRING notice of one alert at most
  once per cooldown, so a condition flapping around its threshold is announced once
  and then once more only if it still holds when the cooldown has passed;
- `AlertEngine`: view -> rules -> book -> notices handed to the sinks
  (gateway/alert_sinks.py), which deliver in the background.

Per gateway replica, like the rest of the gateway's memory: the queue-depth,
error-rate and latency rules see this replica's traffic (gateway/stats.py); the node,
pressure, restore and key rules see the whole platform, so each replica announces
those (point one replica's sinks at a receiver, or dedupe there).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import Gauge

from thaw.core.errors import ThawError, Unavailable
from thaw.core.grpcutil import call
from thaw.gateway.alert_settings import ALERT_RULES, AlertRuleOptions, AlertSettings
from thaw.gateway.alert_sinks import AlertState, Notice, SinkMetrics, Sinks
from thaw.gateway.auth import require_operator
from thaw.gateway.openapi import _errors, _json
from thaw.gateway.state import CONFIG_KEY, GATEWAY_KEY, METRICS_KEY, Gateway
from thaw.gateway.stats import STATS_KEY, FunctionStats, percentile
from thaw.proto import scheduler_pb2, tenancy_pb2, tenancy_pb2_grpc

log = structlog.get_logger()

# Memory-pressure levels in order (scheduler/pressure.py PressureLevel).
PRESSURE_RANK = {"normal": 0, "pressure": 1, "critical": 2, "emergency": 3}
# Scheduler event kinds the restore rules count (scheduler/events.py EventKind).
RESTORE_FAILED = "restore_failed"
SNAPSHOT_QUARANTINED = "snapshot_quarantined"
# Events read per ListEvents call while catching up.
EVENTS_PAGE = 1000
# Restore events remembered at most (per gateway), whatever the window.
EVENTS_KEPT = 10_000
# Transitions kept for GET /v1/alerts.
RECENT_KEPT = 200
# How long shutdown waits for notices still in the sinks' outboxes.
SINKS_CLOSE_GRACE_SECONDS = 5.0
DAY = 86400.0


# ---- what one evaluation looks at --------------------------------------------------

@dataclass(frozen=True)
class CallFigures:
    """One function's invocations within the window."""

    requests: int
    errors: int
    """Answered 5xx."""
    p99_seconds: float


@dataclass(frozen=True)
class KeyExpiry:
    key_id: str
    tenant: str
    name: str
    expires_at: float


@dataclass(frozen=True)
class RestoreEvent:
    time: float
    kind: str
    function: str
    message: str


@dataclass(frozen=True)
class ClusterView:
    """None: that source could not be read this round."""

    now: float
    nodes: Sequence[scheduler_pb2.NodeInfo] | None = None
    queue_depths: Mapping[str, int] | None = None
    restore_events: Sequence[RestoreEvent] | None = None
    """Within the event window, oldest first."""
    calls: Mapping[str, CallFigures] | None = None
    keys: Sequence[KeyExpiry] | None = None


@dataclass(frozen=True)
class Breach:
    subject: str
    value: float | str
    message: str


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str
    threshold: float | str
    check: Callable[[Rule, ClusterView], list[Breach] | None]
    for_seconds: float = 0.0
    cooldown: float = 300.0
    min_requests: int = 1
    """error_rate and p99_latency: fewer invocations in the window are not judged."""
    window: float = 0.0
    """Seconds looked back (restore events); informational elsewhere."""


# ---- the rules (pure) ----------------------------------------------------------------

def _pressure(rule: Rule, view: ClusterView, device: bool) -> list[Breach] | None:
    if view.nodes is None:
        return None
    floor = PRESSURE_RANK[str(rule.threshold)]
    out = []
    for node in view.nodes:
        if node.state == "lost":
            continue  # node_down speaks for it; its last figures are stale
        for p in node.pressures:
            ours = p.resource.startswith("device:") if device else p.resource == "pinned"
            if not ours:
                continue
            if PRESSURE_RANK.get(p.level, 0) >= floor:
                what = f"device {p.resource[7:]}" if device else "pinned tier"
                out.append(Breach(
                    f"{node.id}/{p.resource}", p.level,
                    f"node {node.id} {what} at {p.level} memory pressure "
                    f"({p.used_fraction:.0%} used)"))
    return out


def device_pressure(rule: Rule, view: ClusterView) -> list[Breach] | None:
    return _pressure(rule, view, device=True)


def pinned_pressure(rule: Rule, view: ClusterView) -> list[Breach] | None:
    return _pressure(rule, view, device=False)


def queue_depth(rule: Rule, view: ClusterView) -> list[Breach] | None:
    if view.queue_depths is None:
        return None
    return [Breach(fn, depth, f"{fn} has {depth} requests waiting for an instance "
                              f"(threshold {rule.threshold})")
            for fn, depth in sorted(view.queue_depths.items())
            if depth >= float(rule.threshold)]


def _event_counts(rule: Rule, view: ClusterView, kind: str, what: str
                  ) -> list[Breach] | None:
    if view.restore_events is None:
        return None
    counts: dict[str, int] = {}
    last: dict[str, str] = {}
    for event in view.restore_events:
        if event.kind == kind and event.time >= view.now - rule.window:
            counts[event.function] = counts.get(event.function, 0) + 1
            last[event.function] = event.message
    return [Breach(fn, n, f"{fn}: {n} {what} in the last {rule.window:.0f} s; "
                          f"latest: {last[fn]}")
            for fn, n in sorted(counts.items()) if n >= float(rule.threshold)]


def restore_failures(rule: Rule, view: ClusterView) -> list[Breach] | None:
    return _event_counts(rule, view, RESTORE_FAILED, "failed restore(s)")


def snapshot_quarantined(rule: Rule, view: ClusterView) -> list[Breach] | None:
    return _event_counts(rule, view, SNAPSHOT_QUARANTINED, "snapshot(s) quarantined")


def node_down(rule: Rule, view: ClusterView) -> list[Breach] | None:
    if view.nodes is None:
        return None
    max_age = float(rule.threshold)
    out = []
    for node in view.nodes:
        age = node.last_heartbeat_age_seconds
        if node.state == "lost":
            out.append(Breach(node.id, round(age, 1),
                              f"node {node.id} is lost (last heartbeat {age:.0f} s ago)"))
        elif max_age > 0 and age > max_age:
            out.append(Breach(node.id, round(age, 1),
                              f"node {node.id} has not sent a heartbeat for {age:.0f} s"))
    return out


def error_rate(rule: Rule, view: ClusterView) -> list[Breach] | None:
    if view.calls is None:
        return None
    out = []
    for fn, c in sorted(view.calls.items()):
        if c.requests < rule.min_requests:
            continue
        share = c.errors / c.requests
        if share >= float(rule.threshold):
            out.append(Breach(fn, round(share, 4),
                              f"{fn}: {c.errors} of {c.requests} invocations answered 5xx "
                              f"({share:.1%}) in the last {rule.window:.0f} s"))
    return out


def p99_latency(rule: Rule, view: ClusterView) -> list[Breach] | None:
    if view.calls is None:
        return None
    return [Breach(fn, round(c.p99_seconds, 4),
                   f"{fn}: p99 latency {c.p99_seconds:.3f} s over {c.requests} invocations "
                   f"in the last {rule.window:.0f} s (threshold {rule.threshold} s)")
            for fn, c in sorted(view.calls.items())
            if c.requests >= rule.min_requests and c.p99_seconds > float(rule.threshold)]


def api_key_expiring(rule: Rule, view: ClusterView) -> list[Breach] | None:
    if view.keys is None:
        return None
    horizon = float(rule.threshold) * DAY
    out = []
    for key in view.keys:
        left = key.expires_at - view.now
        if key.expires_at and left <= horizon:
            days = round(left / DAY, 2)
            state = "has expired" if left <= 0 else f"expires in {left / DAY:.1f} days"
            out.append(Breach(key.key_id, days,
                              f"API key {key.key_id} ({key.name or 'unnamed'}) of tenant "
                              f"{key.tenant} {state}"))
    return out


RULES: dict[str, Callable[[Rule, ClusterView], list[Breach] | None]] = {
    "device_pressure": device_pressure, "pinned_pressure": pinned_pressure,
    "queue_depth": queue_depth, "restore_failures": restore_failures,
    "snapshot_quarantined": snapshot_quarantined, "node_down": node_down,
    "error_rate": error_rate, "p99_latency": p99_latency,
    "api_key_expiring": api_key_expiring,
}
assert tuple(RULES) == ALERT_RULES


def rules_from_settings(s: AlertSettings) -> list[Rule]:
    """The enabled rules with their thresholds; a threshold of 0 is off."""
    device_severity = "critical" if s.alerts_device_pressure != "pressure" else "warning"
    made = [
        Rule("device_pressure", device_severity, s.alerts_device_pressure, device_pressure),
        Rule("pinned_pressure", "warning", s.alerts_pinned_pressure, pinned_pressure),
        Rule("queue_depth", "warning", s.alerts_queue_depth, queue_depth),
        Rule("restore_failures", "warning", s.alerts_restore_failures, restore_failures,
             window=s.alerts_event_window),
        Rule("snapshot_quarantined", "warning", s.alerts_quarantined, snapshot_quarantined,
             window=s.alerts_event_window),
        Rule("node_down", "critical", s.alerts_heartbeat_age, node_down),
        Rule("error_rate", "critical", s.alerts_error_rate, error_rate,
             min_requests=s.alerts_min_requests, window=s.alerts_window),
        Rule("p99_latency", "warning", s.alerts_p99_seconds, p99_latency,
             min_requests=s.alerts_min_requests, window=s.alerts_window),
        Rule("api_key_expiring", "warning", s.alerts_key_expiry_days, api_key_expiring),
    ]
    out = []
    for rule in made:
        options = s.alerts_overrides.get(rule.name, AlertRuleOptions())
        # node_down's threshold 0 means "lost only", not off.
        off = rule.threshold == 0 and rule.name != "node_down"
        if not options.enabled or off:
            continue
        out.append(replace(
            rule,
            for_seconds=s.alerts_for if options.for_seconds is None else options.for_seconds,
            cooldown=s.alerts_cooldown if options.cooldown is None else options.cooldown))
    return out


# ---- the state machine of alerts -----------------------------------------------------

@dataclass
class ActiveAlert:
    rule: str
    subject: str
    severity: str
    threshold: float | str
    value: float | str
    message: str
    since: float
    """When the condition was first seen holding (its `for` counts from here)."""
    started_at: float | None = None
    """When it fired (None: pending)."""
    announced: bool = False
    """A FIRING notice went out for this episode (False while the cooldown holds it)."""

    @property
    def state(self) -> str:
        if self.started_at is None:
            return "pending"
        return "firing" if self.announced else "suppressed"

    def to_json(self) -> dict[str, Any]:
        return {"alert": self.rule, "subject": self.subject, "severity": self.severity,
                "state": self.state, "value": self.value, "threshold": self.threshold,
                "message": self.message, "since": self.since, "started_at": self.started_at}


@dataclass
class AlertBook:
    active: dict[tuple[str, str], ActiveAlert] = field(default_factory=dict)
    last_fired: dict[tuple[str, str], float] = field(default_factory=dict)
    """When each alert's latest FIRING notice went out (for the cooldown)."""
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_KEPT))
    suppressed: int = 0
    """FIRING notices held back by a cooldown, in all."""

    def update(self, rule: Rule, breaches: Sequence[Breach], now: float) -> list[Notice]:
        """One round of one rule: the subjects in breach now; every other subject of
        the rule has cleared."""
        out: list[Notice] = []
        seen = set()
        for b in breaches:
            key = (rule.name, b.subject)
            seen.add(key)
            a = self.active.get(key)
            if a is None:
                a = self.active[key] = ActiveAlert(rule.name, b.subject, rule.severity,
                                                   rule.threshold, b.value, b.message, now)
            a.value, a.message = b.value, b.message
            if a.started_at is None and now - a.since >= rule.for_seconds:
                a.started_at = now
            if a.started_at is not None and not a.announced:
                last = self.last_fired.get(key)
                if last is None or now - last >= rule.cooldown:
                    a.announced = True
                    self.last_fired[key] = now
                    out.append(self._notice(a, AlertState.FIRING))
                elif a.started_at == now:
                    self.suppressed += 1
                    self._remember(a, "suppressed", now)
        for key in [k for k in self.active if k[0] == rule.name and k not in seen]:
            a = self.active.pop(key)
            if a.announced:
                out.append(self._notice(a, AlertState.RESOLVED, now))
        for key in [k for k, t in self.last_fired.items()
                    if k[0] == rule.name and k not in self.active and now - t >= rule.cooldown]:
            del self.last_fired[key]
        for notice in out:
            self.recent.append({**notice.to_json(), "time": now})
        return out

    def _notice(self, a: ActiveAlert, state: AlertState, resolved_at: float | None = None
                ) -> Notice:
        assert a.started_at is not None
        return Notice(a.rule, a.severity, state, a.subject, a.value, a.threshold, a.message,
                      a.started_at, resolved_at)

    def _remember(self, a: ActiveAlert, state: str, now: float) -> None:
        self.recent.append({**a.to_json(), "state": state, "time": now,
                            "resolved_at": None})

    def firing(self) -> list[ActiveAlert]:
        return [a for a in self.active.values() if a.announced]


# ---- I/O: where the view comes from ----------------------------------------------------

class AlertSources(Protocol):
    """What the engine reads; each raises ThawError when it cannot."""

    key_source: str
    """Where API keys come from (reported by GET /v1/alerts)."""

    async def nodes(self) -> Sequence[scheduler_pb2.NodeInfo]: ...

    def queue_depths(self) -> Mapping[str, int]: ...

    async def events(self, after_seq: int, kinds: Sequence[str]
                     ) -> tuple[int, Sequence[scheduler_pb2.Event]]:
        """(the scheduler's last seq, events after `after_seq` of these kinds, at most
        EVENTS_PAGE)."""
        ...

    def calls(self, window: float, now: float) -> Mapping[str, CallFigures]: ...

    async def api_keys(self) -> Sequence[KeyExpiry]: ...


class LiveSources:
    """The running gateway's: its scheduler client, queues and live statistics."""

    def __init__(self, gw: Gateway, stats: Callable[[], FunctionStats | None],
                 keys_refresh: float) -> None:
        self._gw = gw
        self._stats = stats
        self._keys_refresh = keys_refresh
        self.key_source = "tenancy"
        self._keys: list[KeyExpiry] = []
        self._keys_read_at: float | None = None

    async def nodes(self) -> Sequence[scheduler_pb2.NodeInfo]:
        return await self._gw.scheduler.list_nodes()

    def queue_depths(self) -> Mapping[str, int]:
        return dict(self._gw.dispatcher.queues.depth)

    async def events(self, after_seq: int, kinds: Sequence[str]
                     ) -> tuple[int, Sequence[scheduler_pb2.Event]]:
        reply = await self._gw.scheduler.list_events(after_seq, EVENTS_PAGE, list(kinds))
        return reply.last_seq, list(reply.events)

    def calls(self, window: float, now: float) -> Mapping[str, CallFigures]:
        stats = self._stats()
        if stats is None:
            return {}
        out = {}
        for function in stats.functions():
            recent = [c for c in stats.recent([function], limit=10**9)
                      if c.time >= now - window]
            if recent:
                latencies = sorted(c.ms / 1000 for c in recent)
                out[function] = CallFigures(len(recent), sum(1 for c in recent if c.error),
                                            percentile(latencies, 0.99))
        return out

    async def api_keys(self) -> Sequence[KeyExpiry]:
        now = time.monotonic()
        if self._keys_read_at is not None and now - self._keys_read_at < self._keys_refresh:
            return self._keys
        try:
            keys = await self._list_keys()
        except ThawError as exc:
            self.key_source = f"unavailable: {exc.message}"
            raise
        self.key_source = "tenancy"
        self._keys, self._keys_read_at = keys, now
        return keys

    async def _list_keys(self) -> list[KeyExpiry]:
        stub = tenancy_pb2_grpc.TenancyStub(self._gw.scheduler.channel)
        tenants = await call(stub.ListTenants(tenancy_pb2.ListTenantsRequest(), timeout=30))
        keys: list[KeyExpiry] = []
        for tenant in tenants.tenants:
            listed = await call(stub.ListKeys(tenancy_pb2.ListKeysRequest(tenant=tenant.id),
                                              timeout=30))
            keys.extend(KeyExpiry(k.id, k.tenant, k.name, k.expires_at)
                        for k in listed.keys if not k.revoked_at and k.expires_at)
        return keys


# ---- the engine ----------------------------------------------------------------------

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


# ---- wiring into the gateway -----------------------------------------------------------

@dataclass
class Alerting:
    """The app's alerting; its engine exists while the app runs."""

    engine: AlertEngine | None = None


ALERTING_KEY = web.AppKey("alerting", Alerting)


async def _alerting(app: web.Application) -> AsyncIterator[None]:
    config, gw = app[CONFIG_KEY], app[GATEWAY_KEY]
    firing = Gauge("thaw_alerts_firing", "Alerts firing now, by rule", ["alert"],
                   registry=app[METRICS_KEY].registry)
    session = aiohttp.ClientSession()
    sinks = Sinks.build(session, SinkMetrics(app[METRICS_KEY].registry),
                        config.alerts_webhook_urls, config.alerts_slack_urls,
                        config.alerts_retries, config.alerts_timeout)
    engine = AlertEngine(rules_from_settings(config),
                         LiveSources(gw, lambda: app.get(STATS_KEY),
                                     config.alerts_keys_refresh), sinks.notify,
                         firing_gauge=firing)
    app[ALERTING_KEY].engine = engine
    sinks.start()
    loop_task = asyncio.get_running_loop().create_task(
        engine.run_forever(config.alerts_interval))
    yield
    loop_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop_task
    app[ALERTING_KEY].engine = None
    await sinks.close(SINKS_CLOSE_GRACE_SECONDS)
    await session.close()


async def list_alerts(request: web.Request) -> web.Response:
    """Active alerts (pending, firing, held by a cooldown) and the latest transitions."""
    gw = request.app[GATEWAY_KEY]
    require_operator(await gw.auth.principal(request.headers.get("Authorization", "")),
                     gw.config)
    engine = request.app[ALERTING_KEY].engine
    if engine is None:
        raise Unavailable("alerting is not running")
    return web.json_response(engine.to_json())


def add_routes(app: web.Application) -> None:
    if STATS_KEY not in app:
        # Until (or without) the dashboard module: the live statistics the error-rate
        # and latency rules read (the dashboard's add_routes installs its own).
        app[STATS_KEY] = FunctionStats()
    app[ALERTING_KEY] = Alerting()
    app.cleanup_ctx.append(_alerting)
    app.router.add_get("/v1/alerts", list_alerts)


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/alerts": {"get": {
        "summary": "Alerts: the rules, active alerts and recent transitions (operator)",
        "responses": {
            "200": _json({"type": "object", "required": ["rules", "active", "recent"],
                          "properties": {
                              "rules": {"type": "array", "items": {"type": "object"}},
                              "active": {"type": "array", "items": {"type": "object"}},
                              "recent": {"type": "array", "items": {"type": "object"}},
                              "api_keys_source": {"type": "string"}}},
                         "Alerts."),
            **_errors(401, 403)}}},
}

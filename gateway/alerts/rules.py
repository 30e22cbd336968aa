"""The alert rules: pure functions of a `ClusterView` -> the subjects in breach now,
and the rules a gateway's settings turn on, with their thresholds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from thaw.core.config import ALERT_RULES, AlertRuleOptions, GatewayConfig
from thaw.gateway.alerts.view import (
    RESTORE_FAILED,
    SNAPSHOT_QUARANTINED,
    Breach,
    ClusterView,
    Rule,
)

# Memory-pressure levels in order (scheduler/pressure.py PressureLevel).
PRESSURE_RANK = {"normal": 0, "pressure": 1, "critical": 2, "emergency": 3}
DAY = 86400.0
# A rule without overrides: the alerting defaults.
NO_OVERRIDES = AlertRuleOptions.model_validate({})


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


def node_storage(rule: Rule, view: ClusterView) -> list[Breach] | None:
    """A node's data directory full or read-only (its heartbeats' conditions): it
    refuses builds and chunk writes with 507 until someone frees or remounts it."""
    if view.nodes is None:
        return None
    out = []
    for node in view.nodes:
        if node.state == "lost":
            continue  # node_down speaks for it; its last conditions are stale
        for c in node.conditions:
            out.append(Breach(f"{node.id}:{c.path}", c.type,
                              f"node {node.id}: {c.path} is {c.type.replace('_', '-')} "
                              f"({c.message}); builds and chunk writes there are refused"))
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
    "api_key_expiring": api_key_expiring, "node_storage": node_storage,
}
assert tuple(RULES) == ALERT_RULES


def rules_from_settings(s: GatewayConfig) -> list[Rule]:
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
        # On unless alerts_overrides turns it off: any condition is a breach.
        Rule("node_storage", "critical", 1, node_storage),
    ]
    out = []
    for rule in made:
        options = s.alerts_overrides.get(rule.name) or NO_OVERRIDES
        # node_down's threshold 0 means "lost only", not off.
        off = rule.threshold == 0 and rule.name != "node_down"
        if not options.enabled or off:
            continue
        out.append(replace(
            rule,
            for_seconds=s.alerts_for if options.for_seconds is None else options.for_seconds,
            cooldown=s.alerts_cooldown if options.cooldown is None else options.cooldown))
    return out

"""Alerting: rules over the platform's state, each alert announced once when it fires
and once when it clears (RESOLVED), to webhook and Slack-compatible sinks.

Modules, one concern each, in the order they depend on each other:
- `view`: what one evaluation looks at (`ClusterView`), gathered by the sources; a
  source that fails leaves its part None and the rules on it are skipped that round: an
  unreachable scheduler neither fires nor resolves anything;
- `rules`: pure functions of a view -> the subjects in breach right now, and the rules
  the gateway's settings turn on;
- `book`: the state machine of every (rule, subject) and the cooldown;
- `sources`: the I/O -- the scheduler's nodes and events, this gateway's queues and
  live statistics, the tenancy service's keys;
- `engine`: view -> rules -> book -> notices handed to the sinks
  (gateway/alert_sinks.py), which deliver in the background;
- `routes`: the engine's life in the app, and GET /v1/alerts.

Per gateway replica, like the rest of the gateway's memory: the queue-depth,
error-rate and latency rules see this replica's traffic (gateway/stats.py); the node,
pressure, restore and key rules see the whole platform, so each replica announces
those (point one replica's sinks at a receiver, or dedupe there).
"""

from __future__ import annotations

from thaw.gateway.alerts.book import RECENT_KEPT, ActiveAlert, AlertBook
from thaw.gateway.alerts.engine import EVENTS_KEPT, AlertEngine
from thaw.gateway.alerts.routes import (
    ALERTING_KEY,
    OPENAPI_PATHS,
    SINKS_CLOSE_GRACE_SECONDS,
    Alerting,
    add_routes,
    list_alerts,
)
from thaw.gateway.alerts.rules import (
    DAY,
    PRESSURE_RANK,
    RULES,
    api_key_expiring,
    device_pressure,
    error_rate,
    node_down,
    p99_latency,
    pinned_pressure,
    queue_depth,
    restore_failures,
    rules_from_settings,
    snapshot_quarantined,
)
from thaw.gateway.alerts.sources import EVENTS_PAGE, AlertSources, LiveSources
from thaw.gateway.alerts.view import (
    RESTORE_FAILED,
    SNAPSHOT_QUARANTINED,
    Breach,
    CallFigures,
    ClusterView,
    KeyExpiry,
    RestoreEvent,
    Rule,
)

__all__ = [
    "ALERTING_KEY", "DAY", "EVENTS_KEPT", "EVENTS_PAGE", "OPENAPI_PATHS", "PRESSURE_RANK",
    "RECENT_KEPT", "RESTORE_FAILED", "RULES", "SINKS_CLOSE_GRACE_SECONDS",
    "SNAPSHOT_QUARANTINED", "ActiveAlert", "AlertBook", "AlertEngine", "AlertSources",
    "Alerting", "Breach", "CallFigures", "ClusterView", "KeyExpiry", "LiveSources",
    "RestoreEvent", "Rule", "add_routes", "api_key_expiring", "device_pressure",
    "error_rate", "list_alerts", "node_down", "p99_latency", "pinned_pressure",
    "queue_depth", "restore_failures", "rules_from_settings", "snapshot_quarantined",
]

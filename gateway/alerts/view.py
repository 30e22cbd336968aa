"""What one evaluation of the alert rules looks at (`ClusterView`), what a rule finds
(`Breach`) and a rule with its thresholds (`Rule`); plain data, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from thaw.proto import scheduler_pb2

# Scheduler event kinds the restore rules count (scheduler/events.py EventKind).
RESTORE_FAILED = "restore_failed"
SNAPSHOT_QUARANTINED = "snapshot_quarantined"


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

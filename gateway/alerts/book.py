"""The state machine of alerts: every (rule, subject) pending (its `for` not yet
served), firing or cleared, and the cooldown: a FIRING notice of one alert at most once
per cooldown, so a condition flapping around its threshold is announced once and then
once more only if it still holds when the cooldown has passed."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from thaw.gateway.alert_sinks import AlertState, Notice
from thaw.gateway.alerts.view import Breach, Rule

# Transitions kept for GET /v1/alerts.
RECENT_KEPT = 200


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

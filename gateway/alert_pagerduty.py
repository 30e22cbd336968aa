"""PagerDuty's Events API v2 as an alert sink: a FIRING notice triggers an incident, the
RESOLVED notice of that alert resolves it.

Both carry the same `dedup_key`, made of the rule and its subject only, so the resolve
closes exactly the incident its trigger opened, a retried trigger does not open a
second one, and the next breach of that subject after a resolve opens a new one
(PagerDuty starts a new incident for a key whose incident was resolved). The routing
key is a secret: logs and metrics name the sink `pagerduty#N`, never the key.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from thaw.gateway.alert_sinks import AlertState, Notice, http_outcome

# PagerDuty's documented public endpoint of the Events API v2; the setting
# alerts_pagerduty_url points elsewhere (a proxy, a test receiver).
EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
# The API's limit on payload.summary.
SUMMARY_CHARS = 1024
# The API's severities; a rule's severity outside them is reported as "error".
SEVERITIES = ("critical", "error", "warning", "info")


def dedup_key(notice: Notice) -> str:
    """One incident per alert and subject: what a resolve must name to close it."""
    return f"thaw/{notice.alert}/{notice.subject}"


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def pagerduty_event(notice: Notice, routing_key: str, source: str) -> dict[str, Any]:
    """The Events API v2 body of one notice."""
    if notice.state is AlertState.RESOLVED:
        return {"routing_key": routing_key, "event_action": "resolve",
                "dedup_key": dedup_key(notice)}
    summary = f"[{notice.severity}] {notice.alert} on {notice.subject}: {notice.message}"
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(notice),
        "client": "thaw",
        "payload": {
            "summary": summary[:SUMMARY_CHARS],
            "severity": notice.severity if notice.severity in SEVERITIES else "error",
            "source": source,
            "component": notice.subject,
            "group": notice.alert,
            "class": notice.alert,
            "timestamp": _iso(notice.started_at),
            "custom_details": {"value": notice.value, "threshold": notice.threshold,
                               "message": notice.message},
        },
    }


class PagerDutyTransport:
    """One routing key (one PagerDuty service)."""

    kind = "pagerduty"

    def __init__(self, routing_key: str, session: aiohttp.ClientSession, timeout: float,
                 source: str, url: str = EVENTS_URL, index: int = 1) -> None:
        self.name = f"pagerduty#{index}"
        self._routing_key = routing_key
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._source = source
        self._url = url

    async def send(self, notice: Notice) -> None:
        body = json.dumps(pagerduty_event(notice, self._routing_key, self._source))
        async with self._session.post(self._url, data=body.encode(),
                                      headers={"content-type": "application/json"},
                                      timeout=self._timeout) as resp:
            http_outcome(resp.status, self.name)

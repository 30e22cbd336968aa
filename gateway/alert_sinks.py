"""Where alert notices go: generic JSON webhooks and Slack-compatible incoming webhooks.

Each sink URL has its own bounded outbox and one sender task, so a slow or failing
receiver delays only its own notices (in order: a RESOLVED never overtakes its FIRING)
and the evaluation loop never waits on the network: it only enqueues. A delivery is
retried with exponential backoff; one given up is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

log = structlog.get_logger()

# Notices waiting per sink; past this the newest are dropped (and counted) rather
# than holding memory for a receiver that is gone.
OUTBOX_CAPACITY = 1000
# Backoff between delivery attempts: 0.5 s, 1 s, 2 s ... capped (tests pass smaller).
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0


class AlertState(str, enum.Enum):
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Notice:
    """One transition of one alert, as sent to every sink."""

    alert: str
    """The rule's name."""
    severity: str
    state: AlertState
    subject: str
    """What it is about: a node, node/resource, tenant/function or key id."""
    value: float | str
    threshold: float | str
    message: str
    started_at: float
    resolved_at: float | None = None
    """Unix time, for RESOLVED notices."""

    def to_json(self) -> dict[str, Any]:
        return {"alert": self.alert, "severity": self.severity, "state": self.state.value,
                "subject": self.subject, "value": self.value, "threshold": self.threshold,
                "message": self.message, "started_at": self.started_at,
                "resolved_at": self.resolved_at}


def webhook_payload(notice: Notice) -> dict[str, Any]:
    return notice.to_json()


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def slack_payload(notice: Notice) -> dict[str, Any]:
    """Slack's incoming-webhook shape (also taken by Mattermost, Rocket.Chat...)."""
    if notice.state is AlertState.RESOLVED:
        head = f"RESOLVED: {notice.alert} on {notice.subject}"
        icon = ":white_check_mark:"
    else:
        head = f"FIRING [{notice.severity}]: {notice.alert} on {notice.subject}"
        icon = ":rotating_light:" if notice.severity == "critical" else ":warning:"
    since = f"since {_iso(notice.started_at)}"
    if notice.resolved_at is not None:
        since += f", resolved {_iso(notice.resolved_at)}"
    return {
        "text": f"{head}: {notice.message}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn",
                                         "text": f"{icon} *{head}*\n{notice.message}"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": (
                f"value `{notice.value}` · threshold `{notice.threshold}` · {since}")}]},
        ],
    }


class SinkKind(str, enum.Enum):
    WEBHOOK = "webhook"
    SLACK = "slack"


PAYLOADS: dict[SinkKind, Callable[[Notice], dict[str, Any]]] = {
    SinkKind.WEBHOOK: webhook_payload, SinkKind.SLACK: slack_payload}


class DeliveryFailed(Exception):
    """A receiver answered with a non-2xx status (retried)."""


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notices = Counter(
            "thaw_alert_notices_total",
            "Alert notices by sink kind and outcome (delivered, failed, dropped)",
            ["sink", "outcome"], registry=registry)


class Sink:
    """One receiver URL with its outbox and sender task."""

    def __init__(self, kind: SinkKind, url: str, session: aiohttp.ClientSession,
                 metrics: SinkMetrics, retries: int, timeout: float,
                 backoff_first: float = BACKOFF_FIRST_SECONDS,
                 backoff_max: float = BACKOFF_MAX_SECONDS) -> None:
        self.kind = kind
        self.url = url
        self._session = session
        self._metrics = metrics
        self._retries = retries
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._backoff_first = backoff_first
        self._backoff_max = backoff_max
        self._outbox: asyncio.Queue[Notice] = asyncio.Queue(OUTBOX_CAPACITY)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._send_forever())

    def offer(self, notice: Notice) -> None:
        try:
            self._outbox.put_nowait(notice)
        except asyncio.QueueFull:
            self._metrics.notices.labels(self.kind.value, "dropped").inc()
            log.warning("alert notice dropped: the sink's outbox is full",
                        sink=self.kind.value, url=self.url, alert=notice.alert)

    async def _send_forever(self) -> None:
        while True:
            notice = await self._outbox.get()
            try:
                await self.deliver(notice)
            finally:
                self._outbox.task_done()

    async def deliver(self, notice: Notice) -> bool:
        """POST the notice, retrying with backoff; False once it is given up."""
        payload = PAYLOADS[self.kind](notice)
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self._retries + 1),
                    wait=wait_exponential(multiplier=self._backoff_first,
                                          max=self._backoff_max),
                    retry=retry_if_exception_type(
                        (aiohttp.ClientError, asyncio.TimeoutError, DeliveryFailed))):
                with attempt:
                    await self._post(payload)
        except RetryError as exc:
            self._metrics.notices.labels(self.kind.value, "failed").inc()
            log.warning("alert notice not delivered", sink=self.kind.value, url=self.url,
                        alert=notice.alert, subject=notice.subject,
                        attempts=self._retries + 1,
                        error=repr(exc.last_attempt.exception()))
            return False
        self._metrics.notices.labels(self.kind.value, "delivered").inc()
        return True

    async def _post(self, payload: dict[str, Any]) -> None:
        async with self._session.post(self.url, json=payload, timeout=self._timeout) as resp:
            if resp.status >= 300:
                raise DeliveryFailed(f"{self.url} answered {resp.status}")

    async def drain(self, grace: float) -> None:
        """Give the outbox up to `grace` seconds to empty, then stop the sender."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._outbox.join(), grace)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Sinks:
    """Every configured receiver; `notify` fans a notice out without waiting."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    @classmethod
    def build(cls, session: aiohttp.ClientSession, metrics: SinkMetrics,
              webhook_urls: list[str], slack_urls: list[str], retries: int,
              timeout: float, **backoff: float) -> Sinks:
        return cls([Sink(SinkKind.WEBHOOK, url, session, metrics, retries, timeout, **backoff)
                    for url in webhook_urls]
                   + [Sink(SinkKind.SLACK, url, session, metrics, retries, timeout, **backoff)
                      for url in slack_urls])

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def notify(self, notice: Notice) -> None:
        for sink in self.sinks:
            sink.offer(notice)

    async def close(self, grace: float) -> None:
        await asyncio.gather(*(sink.drain(grace) for sink in self.sinks))

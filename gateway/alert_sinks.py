"""Where alert notices go: generic JSON webhooks (signed when a secret is set) and
Slack-compatible incoming webhooks here; PagerDuty (gateway/alert_pagerduty.py) and
e-mail (gateway/alert_email.py) are transports of the same kind.

Each sink (receiver) has its own bounded outbox and one sender task, so a slow or failing
receiver delays only its own notices (in order: a RESOLVED never overtakes its FIRING)
and the evaluation loop never waits on the network: it only enqueues. A delivery is
retried with exponential backoff; one given up is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import smtplib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from thaw.gateway.stored.signing import signed_headers

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
    """An attempt failed in a way a later one may not (a 5xx, 408 or 429, a dropped
    connection): retried."""


class DeliveryRefused(Exception):
    """The receiver refused the notice itself (another 4xx, a bad address): retrying
    cannot help, so the notice is given up at once."""


class Transport(Protocol):
    """How one receiver is reached. `name` is what logs and metrics may show: never
    the receiver's URL, routing key or password (those are secrets)."""

    kind: str
    name: str

    async def send(self, notice: Notice) -> None:
        """Deliver once; raise DeliveryFailed (retried) or DeliveryRefused (not)."""


def http_outcome(status: int, name: str) -> None:
    """Raise what a receiver's HTTP status means for a delivery (2xx: nothing)."""
    if status < 300:
        return
    if status in (408, 429) or status >= 500:
        raise DeliveryFailed(f"{name} answered {status}")
    raise DeliveryRefused(f"{name} answered {status}")


def notice_id(notice: Notice) -> str:
    """The same on every retry of one transition (a receiver drops a repeat), different
    for the next transition of that alert."""
    raw = f"{notice.alert}\0{notice.subject}\0{notice.state.value}\0{notice.started_at}"
    return "alert_" + hashlib.sha256(raw.encode()).hexdigest()[:32]


class HttpTransport:
    """A JSON POST: the generic webhook (signed when a secret is set, as the stored
    invocations' webhooks are: Standard Webhooks, gateway/stored/signing.py) and the
    Slack-compatible one."""

    def __init__(self, kind: SinkKind, url: str, session: aiohttp.ClientSession,
                 timeout: float, index: int = 1, secret: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.kind = kind.value
        self.name = f"{kind.value}#{index}"
        self._url = url
        self._payload = PAYLOADS[kind]
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._secret = secret
        self._clock = clock

    async def send(self, notice: Notice) -> None:
        body = json.dumps(self._payload(notice)).encode()
        headers = {"content-type": "application/json"}
        if self._secret:
            headers.update(signed_headers([self._secret], notice_id(notice),
                                          int(self._clock()), body))
        async with self._session.post(self._url, data=body, headers=headers,
                                      timeout=self._timeout) as resp:
            http_outcome(resp.status, self.name)


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notices = Counter(
            "thaw_alert_notices_total",
            "Alert notices by sink kind and outcome (delivered, failed, dropped)",
            ["sink", "outcome"], registry=registry)


# What a delivery attempt may raise that a later attempt may not.
RETRIED = (aiohttp.ClientError, asyncio.TimeoutError, DeliveryFailed, smtplib.SMTPException,
           OSError)


class Sink:
    """One receiver with its outbox and sender task."""

    def __init__(self, transport: Transport, metrics: SinkMetrics, retries: int,
                 backoff_first: float = BACKOFF_FIRST_SECONDS,
                 backoff_max: float = BACKOFF_MAX_SECONDS) -> None:
        self.transport = transport
        self.kind = transport.kind
        self._metrics = metrics
        self._retries = retries
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
            self._metrics.notices.labels(self.kind, "dropped").inc()
            log.warning("alert notice dropped: the sink's outbox is full",
                        sink=self.transport.name, alert=notice.alert)

    async def _send_forever(self) -> None:
        while True:
            notice = await self._outbox.get()
            try:
                await self.deliver(notice)
            finally:
                self._outbox.task_done()

    async def deliver(self, notice: Notice) -> bool:
        """Send the notice, retrying with backoff; False once it is given up."""
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self._retries + 1),
                    wait=wait_exponential(multiplier=self._backoff_first,
                                          max=self._backoff_max),
                    retry=retry_if_exception_type(RETRIED), reraise=True):
                with attempt:
                    await self.transport.send(notice)
        except (DeliveryRefused, *RETRIED) as exc:
            self._metrics.notices.labels(self.kind, "failed").inc()
            # The error's text names the sink, never its URL (aiohttp's would).
            log.warning("alert notice not delivered", sink=self.transport.name,
                        alert=notice.alert, subject=notice.subject,
                        error=type(exc).__name__ if not isinstance(
                            exc, (DeliveryFailed, DeliveryRefused)) else str(exc))
            return False
        self._metrics.notices.labels(self.kind, "delivered").inc()
        return True

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
              timeout: float, webhook_secret: str = "",
              others: Sequence[Transport] = (), **backoff: float) -> Sinks:
        """The webhook and Slack sinks of these URLs (the webhooks signed with
        `webhook_secret` when one is set), and a sink for each of `others`."""
        transports: list[Transport] = [
            HttpTransport(SinkKind.WEBHOOK, url, session, timeout, i, webhook_secret)
            for i, url in enumerate(webhook_urls, 1)]
        transports += [HttpTransport(SinkKind.SLACK, url, session, timeout, i)
                       for i, url in enumerate(slack_urls, 1)]
        transports += others
        return cls([Sink(t, metrics, retries, **backoff) for t in transports])

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def notify(self, notice: Notice) -> None:
        for sink in self.sinks:
            sink.offer(notice)

    async def close(self, grace: float) -> None:
        await asyncio.gather(*(sink.drain(grace) for sink in self.sinks))

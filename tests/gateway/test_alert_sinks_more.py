"""The PagerDuty, signed-webhook and e-mail sinks against real local receivers on
loopback: an aiohttp server standing in for PagerDuty's Events API and for a webhook
receiver (the signature checked with the `standardwebhooks` library), and an aiosmtpd
relay (plain, STARTTLS with a login). Secrets never reach the logs."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import standardwebhooks
import structlog
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from tests.gateway.sink_helpers import WAIT_SECONDS, counted, loopback, wait_count
from thaw.core.config import GatewayConfig
from thaw.gateway.alert_email import EmailTransport, SmtpOptions
from thaw.gateway.alert_pagerduty import PagerDutyTransport, dedup_key
from thaw.gateway.alert_sinks import AlertState, Notice, SinkMetrics, Sinks
from thaw.gateway.alerts.routes import sinks_from_settings
from thaw.gateway.stored.signing import new_secret

ROUTING_KEY = "R0UTINGKEYsecret0123456789abcdef"
PASSWORD = "smtp-pa55word-secret"

FIRING = Notice("node_down", "critical", AlertState.FIRING, "node-a", 95.0, 30.0,
                "node-a: no heartbeat for 95 s", 1_700_000_000.0)
RESOLVED = Notice("node_down", "critical", AlertState.RESOLVED, "node-a", 0.0, 30.0,
                  FIRING.message, FIRING.started_at, 1_700_000_300.0)
OTHER = Notice("queue_depth", "warning", AlertState.FIRING, "dev/echo", 80, 50,
               "dev/echo: 80 requests waiting", 1_700_000_010.0)


@dataclass
class Http:
    url: str = ""
    status: list[int] = field(default_factory=list)
    """Statuses to answer, in order; then 202."""
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int) -> None:
        await wait_count(self.got, count, self.arrived)


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    state = Http()

    async def take(request: web.Request) -> web.Response:
        state.got.append((dict(request.headers), await request.read()))
        state.arrived.set()
        return web.Response(status=state.status.pop(0) if state.status else 202)

    async with loopback(take) as state.url:
        yield state


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


async def test_pagerduty_triggers_then_resolves_with_one_dedup_key(
        http: Http, logs: list[dict[str, Any]]) -> None:
    import json
    metrics = SinkMetrics(CollectorRegistry())
    http.status = [503]  # the first trigger is retried
    async with aiohttp.ClientSession() as session:
        pd = PagerDutyTransport(ROUTING_KEY, session, 5, "thaw-gateway@test",
                                f"{http.url}/v2/enqueue")
        sinks = Sinks.build(session, metrics, [], [], retries=2, timeout=5, others=[pd],
                            backoff_first=0.01, backoff_max=0.02)
        sinks.start()
        sinks.notify(FIRING)
        sinks.notify(OTHER)
        sinks.notify(RESOLVED)
        await http.wait_for(4)
        await sinks.close(5)
    bodies = [json.loads(body) for _, body in http.got]
    assert bodies[0] == bodies[1]  # the retry is the same event
    trigger, other, resolve = bodies[1:]
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["event_action"] == "trigger"
    assert trigger["payload"]["severity"] == "critical"
    assert trigger["payload"]["source"] == "thaw-gateway@test"
    assert "node_down on node-a" in trigger["payload"]["summary"]
    assert trigger["payload"]["custom_details"]["value"] == 95.0
    assert other["payload"]["severity"] == "warning"
    assert other["dedup_key"] != trigger["dedup_key"]
    assert resolve == {"routing_key": ROUTING_KEY, "event_action": "resolve",
                       "dedup_key": trigger["dedup_key"]}
    assert trigger["dedup_key"] == dedup_key(FIRING) == dedup_key(RESOLVED)
    assert counted(metrics, "pagerduty", "delivered") == 3
    assert ROUTING_KEY not in repr(logs)


async def test_a_refused_event_is_not_retried_and_secrets_stay_out_of_logs(
        http: Http, logs: list[dict[str, Any]]) -> None:
    metrics = SinkMetrics(CollectorRegistry())
    http.status = [400]
    hook = f"{http.url}/hooks/T000/B000/tokensecret"
    async with aiohttp.ClientSession() as session:
        pd = PagerDutyTransport(ROUTING_KEY, session, 5, "src", f"{http.url}/v2/enqueue")
        sinks = Sinks.build(session, metrics, [], [], retries=3, timeout=5, others=[pd],
                            backoff_first=0.01, backoff_max=0.02)
        sinks.start()
        sinks.notify(FIRING)
        await http.wait_for(1)
        await sinks.close(5)
        # A receiver that is not there: the connection error's text would hold the URL.
        down = Sinks.build(session, metrics, ["http://127.0.0.1:9/hooks/tokensecret"],
                           [hook.replace(http.url, "http://127.0.0.1:9")], retries=1,
                           timeout=2, backoff_first=0.01, backoff_max=0.02)
        down.start()
        down.notify(FIRING)
        await down.close(10)
    assert len(http.got) == 1  # 400: given up at once
    assert counted(metrics, "pagerduty", "failed") == 1
    assert counted(metrics, "webhook", "failed") == 1
    assert counted(metrics, "slack", "failed") == 1
    failures = [e for e in logs if e["event"] == "alert notice not delivered"]
    assert {e["sink"] for e in failures} == {"pagerduty#1", "webhook#1", "slack#1"}
    text = repr(logs)
    assert ROUTING_KEY not in text and "tokensecret" not in text


async def test_signed_webhook_verifies_with_the_standard_webhooks_library(
        http: Http) -> None:
    secret = new_secret()
    metrics = SinkMetrics(CollectorRegistry())
    async with aiohttp.ClientSession() as session:
        sinks = Sinks.build(session, metrics, [f"{http.url}/hook"], [], retries=1,
                            timeout=5, webhook_secret=secret)
        sinks.start()
        sinks.notify(FIRING)
        sinks.notify(RESOLVED)
        await http.wait_for(2)
        await sinks.close(5)
    verifier = standardwebhooks.Webhook(secret)
    payloads = [verifier.verify(body, headers) for headers, body in http.got]
    assert [p["state"] for p in payloads] == ["firing", "resolved"]
    ids = [headers["webhook-id"] for headers, _ in http.got]
    assert ids[0] != ids[1]
    forged = dict(http.got[0][0], **{"webhook-signature": "v1,AAAA"})
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verifier.verify(http.got[0][1], forged)


# ---- e-mail -------------------------------------------------------------------------

@dataclass
class Mailbox:
    messages: list[tuple[Envelope, Message]] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append((envelope, message_from_bytes(envelope.content)))
        return "250 OK"


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _relay(mailbox: Mailbox, tls: ssl.SSLContext | None = None) -> Controller:
    def check(server: Any, session: Session, envelope: Envelope, mechanism: str,
              auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login = (auth_data.login.decode(), auth_data.password.decode())
        mailbox.logins.append(login)
        if login == ("alerts", PASSWORD):
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)  # the relay answers 535

    # aiosmtpd's controller checks its server by connecting to the port it was given,
    # so it needs a real one: a free port the kernel picked.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kwargs: dict[str, Any] = {"hostname": "127.0.0.1", "port": port}
    if tls is not None:
        kwargs.update(tls_context=tls, require_starttls=True, authenticator=check,
                      auth_require_tls=True)
    controller = Controller(mailbox, **kwargs)
    controller.start()
    return controller


def _port(controller: Controller) -> int:
    return int(controller.port)


async def test_email_through_a_plain_local_relay() -> None:
    mailbox = Mailbox()
    relay = _relay(mailbox)
    try:
        metrics = SinkMetrics(CollectorRegistry())
        mail = EmailTransport(SmtpOptions("127.0.0.1", _port(relay), "thaw@example.org",
                                          ("oncall@example.org", "ops@example.org"),
                                          security="none"))
        async with aiohttp.ClientSession() as session:
            sinks = Sinks.build(session, metrics, [], [], 1, 5, others=[mail])
            sinks.start()
            sinks.notify(FIRING)
            sinks.notify(RESOLVED)
            await sinks.close(WAIT_SECONDS)
    finally:
        relay.stop()
    assert len(mailbox.messages) == 2
    (env1, first), (_, second) = mailbox.messages
    assert env1.mail_from == "thaw@example.org"
    assert env1.rcpt_tos == ["oncall@example.org", "ops@example.org"]
    assert first["Subject"] == "[thaw] FIRING [critical]: node_down on node-a"
    assert second["Subject"] == "[thaw] RESOLVED: node_down on node-a"
    assert second["In-Reply-To"] == first["Message-ID"]
    assert "no heartbeat for 95 s" in first.get_payload()
    assert counted(metrics, "email", "delivered") == 2


async def test_email_with_starttls_and_login(tmp_path: Path,
                                             logs: list[dict[str, Any]]) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    mailbox = Mailbox()
    relay = _relay(mailbox, server_tls)
    metrics = SinkMetrics(CollectorRegistry())
    try:
        good = EmailTransport(SmtpOptions("127.0.0.1", _port(relay), "thaw@example.org",
                                          ("oncall@example.org",), "starttls", "alerts",
                                          PASSWORD, ssl_context=client_tls))
        bad = EmailTransport(SmtpOptions("127.0.0.1", _port(relay), "thaw@example.org",
                                         ("oncall@example.org",), "starttls", "alerts",
                                         "wrong", ssl_context=client_tls), index=2)
        # A relay without TLS at all: starttls refuses to send in the clear.
        plain_box = Mailbox()
        plain = _relay(plain_box)
        clear = EmailTransport(SmtpOptions("127.0.0.1", _port(plain), "thaw@example.org",
                                           ("oncall@example.org",), "starttls"), index=3)
        async with aiohttp.ClientSession() as session:
            sinks = Sinks.build(session, metrics, [], [], retries=3, timeout=5,
                                others=[good, bad, clear], backoff_first=0.01,
                                backoff_max=0.02)
            sinks.start()
            sinks.notify(FIRING)
            await sinks.close(WAIT_SECONDS)
        plain.stop()
    finally:
        relay.stop()
    assert len(mailbox.messages) == 1
    assert mailbox.messages[0][1]["Subject"].startswith("[thaw] FIRING")
    # The wrong password is refused (535, permanent) and not retried: smtplib tries it
    # once with each mechanism the relay offers (PLAIN, LOGIN), in one attempt.
    assert mailbox.logins.count(("alerts", PASSWORD)) == 1
    assert mailbox.logins.count(("alerts", "wrong")) == 2
    assert plain_box.messages == []
    assert counted(metrics, "email", "delivered") == 1
    assert counted(metrics, "email", "failed") == 2
    assert PASSWORD not in repr(logs)
    assert PASSWORD not in repr(SmtpOptions("h", 1, "f", ("t",), password=PASSWORD))


def test_settings_build_every_sink_and_hide_their_secrets() -> None:
    config = GatewayConfig.load(
        alerts_webhook_urls="http://127.0.0.1:1/a", alerts_slack_urls="http://127.0.0.1:1/s",
        alerts_pagerduty_routing_keys=f"{ROUTING_KEY},second",
        alerts_pagerduty_url="http://127.0.0.1:1/v2/enqueue",
        alerts_smtp_host="127.0.0.1", alerts_smtp_from="thaw@example.org",
        alerts_smtp_to="a@example.org,b@example.org", alerts_smtp_password=PASSWORD,
        alerts_webhook_signing_key=new_secret())
    session = aiohttp.ClientSession.__new__(aiohttp.ClientSession)  # never used
    sinks = sinks_from_settings(config, session, SinkMetrics(CollectorRegistry()))
    assert [s.transport.name for s in sinks.sinks] == [
        "webhook#1", "slack#1", "pagerduty#1", "pagerduty#2", "email#1"]
    assert PASSWORD not in repr(config) and ROUTING_KEY not in repr(config)
    shown = {s.key: s.value for s in GatewayConfig.explain(flags={
        "alerts_smtp_password": PASSWORD, "alerts_pagerduty_routing_keys": ROUTING_KEY})}
    assert PASSWORD not in repr(shown) and ROUTING_KEY not in repr(shown)
    with pytest.raises(Exception, match="alerts_smtp_from"):
        GatewayConfig.load(alerts_smtp_host="127.0.0.1")
    with pytest.raises(Exception, match="whsec_"):
        GatewayConfig.load(alerts_webhook_signing_key="plain")

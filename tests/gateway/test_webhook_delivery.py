"""Webhook delivery (gateway/stored/webhooks.py) against receivers on loopback that
the tests start: signed per Standard Webhooks, checked again at delivery (a name
that rebinds to loopback after the submission's check is refused), sent to the very
address checked, retried with backoff a bounded number of times, and failures
recorded in words that say nothing of the network behind them."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from thaw.core.config import GatewayConfig
from thaw.gateway.stored.signing import new_secret
from thaw.gateway.stored.targets import NOT_ALLOWED, WebhookGuard, WebhookNotAllowed
from thaw.gateway.stored.webhooks import (
    DELIVERY_FAILED,
    UNREACHABLE,
    Webhooks,
    delivery_session,
)
from thaw.proto import invocations_pb2

PUBLIC = "93.184.215.14"
TOLERANCE_SECONDS = 300


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes,
                            now: float) -> None:
    """An independent verifier written from the Standard Webhooks specification
    (github.com/standard-webhooks/standard-webhooks, spec/standard-webhooks.md,
    "Verifying webhooks"): the signed content is `msg_id.timestamp.payload`; the key
    is the base64 part of the `whsec_` secret; webhook-signature is a space-delimited
    list of `v1,<base64 HMAC-SHA256>`, compared in constant time; a timestamp outside
    the tolerance is refused."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(now - int(timestamp)) > TOLERANCE_SECONDS:
        raise ValueError("timestamp outside the tolerance")
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(
        key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()).decode()
    for sig in headers["webhook-signature"].split(" "):
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return
    raise ValueError("no matching signature")


class Recorder:
    """What a loopback receiver got: headers and body of each request."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.got: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        status = self.statuses[min(len(self.got), len(self.statuses)) - 1]
        return web.Response(status=status)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Recorder, int]]:
    recorder = Recorder([204])
    app = web.Application()
    app.router.add_post("/hook", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield recorder, runner.addresses[0][1]
    await runner.cleanup()


class FakeInvocations:
    """The scheduler's Invocations service as the delivery sees it."""

    def __init__(self, secret: str, previous: str = "") -> None:
        self.secret, self.previous = secret, previous
        self.records: list[dict[str, Any]] = []

    async def record_webhook(self, invocation_id: str, state: str, attempts: int,
                             error: str, gateway_id: str = "", retry_in: float = 0.0,
                             claim_seconds: float = 0.0, last_status: int = 0
                             ) -> invocations_pb2.Invocation:
        self.records.append({"state": state, "attempts": attempts, "error": error,
                             "retry_in": retry_in, "last_status": last_status})
        return invocations_pb2.Invocation(id=invocation_id, webhook_state=state,
                                          webhook_claimed_by=gateway_id)

    async def webhook_secret(self, tenant: str, rotate: bool = False
                             ) -> invocations_pb2.WebhookSecret:
        return invocations_pb2.WebhookSecret(tenant=tenant, secret=self.secret,
                                             previous_secret=self.previous)


def settings(allow: str = "", attempts: int = 3) -> GatewayConfig:
    return GatewayConfig.load(flags={"webhook_allow": allow,
                                     "webhook_attempts": str(attempts),
                                     "webhook_backoff_seconds": "0.01"})


def finished(url: str) -> invocations_pb2.Invocation:
    return invocations_pb2.Invocation(
        id="inv_" + "a" * 32, tenant="acme", function="jobs", state="succeeded",
        webhook_url=url, webhook_state="pending", result_status=200,
        result_content_type="application/json", result_body=b'{"ok": true}',
        result_bytes=12, created_at=1.0, finished_at=2.0)


def resolver(answers: dict[str, list[list[str]]]) -> Any:
    """Answers each name's lookups in turn (the last answer repeats)."""
    asked: dict[str, int] = {}

    async def resolve(host: str, port: int) -> list[str]:
        n = asked.get(host, 0)
        asked[host] = n + 1
        return answers[host][min(n, len(answers[host]) - 1)]
    return resolve


async def deliver(url: str, config: GatewayConfig, client: FakeInvocations,
                  resolve: Any = None) -> None:
    session = delivery_session()
    try:
        guard = WebhookGuard(config.webhook_allow, resolver=resolve) if resolve else None
        hooks = Webhooks(client, "gw_test", config, session, guard)  # type: ignore[arg-type]
        await hooks.deliver(finished(url))
    finally:
        await session.close()


async def test_a_delivery_is_signed_and_verifies_independently(
        receiver: tuple[Recorder, int]) -> None:
    recorder, port = receiver
    secret = new_secret()
    client = FakeInvocations(secret)
    await deliver(f"http://127.0.0.1:{port}/hook", settings("127.0.0.1"), client)
    assert client.records == [{"state": "delivered", "attempts": 1, "error": "",
                               "retry_in": 0.0, "last_status": 204}]
    [(headers, body)] = recorder.got
    assert headers["webhook-id"] == "inv_" + "a" * 32
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["id"] == "inv_" + "a" * 32
    verify_standard_webhook(secret, headers, body, time.time())
    with pytest.raises(ValueError):
        verify_standard_webhook(new_secret(), headers, body, time.time())
    with pytest.raises(ValueError):
        verify_standard_webhook(secret, headers, body + b" ", time.time())
    # The reference implementation (PyPI standardwebhooks) agrees.
    standardwebhooks = pytest.importorskip("standardwebhooks")
    lowered = {k.lower(): v for k, v in headers.items()}
    assert standardwebhooks.Webhook(secret).verify(body, lowered)["id"] == "inv_" + "a" * 32


async def test_after_a_rotation_both_secrets_sign(receiver: tuple[Recorder, int]) -> None:
    recorder, port = receiver
    old, new = new_secret(), new_secret()
    await deliver(f"http://127.0.0.1:{port}/hook", settings("127.0.0.1"),
                  FakeInvocations(new, previous=old))
    [(headers, body)] = recorder.got
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        verify_standard_webhook(secret, headers, body, time.time())


async def test_loopback_is_refused_by_default_and_nothing_is_sent(
        receiver: tuple[Recorder, int]) -> None:
    recorder, port = receiver
    client = FakeInvocations(new_secret())
    await deliver(f"http://127.0.0.1:{port}/hook", settings(attempts=5), client)
    # Refused once and given up at once: a denied address is not retried.
    assert client.records == [{"state": "failed", "attempts": 1, "error": NOT_ALLOWED,
                               "retry_in": 0.0, "last_status": 0}]
    assert recorder.got == []


async def test_a_name_that_rebinds_to_loopback_after_submission_is_refused(
        receiver: tuple[Recorder, int]) -> None:
    recorder, port = receiver
    url = f"http://rebind.test:{port}/hook"
    resolve = resolver({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    guard = WebhookGuard(resolver=resolve)
    # At submission the name answers a public address: accepted.
    assert (await guard.check(url)).address == PUBLIC
    client = FakeInvocations(new_secret())
    hooks = Webhooks(client, "gw_test", settings(), delivery_session(), guard)  # type: ignore[arg-type]
    try:
        await hooks.deliver(finished(url))
    finally:
        await hooks.session.close()
    assert client.records[-1]["state"] == "failed"
    assert client.records[-1]["error"] == NOT_ALLOWED
    assert recorder.got == []
    with pytest.raises(WebhookNotAllowed):
        await guard.check(url)


async def test_the_connection_goes_to_the_address_checked_with_the_name_as_host(
        receiver: tuple[Recorder, int]) -> None:
    recorder, port = receiver
    # The name resolves to loopback only through the injected resolver (the system's
    # would not know it): the receiver gets the request only if the delivery used
    # the checked address and did not look the name up again.
    client = FakeInvocations(new_secret())
    await deliver(f"http://receiver.test:{port}/hook", settings("127.0.0.1"), client,
                  resolver({"receiver.test": [["127.0.0.1"]]}))
    assert client.records[-1]["state"] == "delivered", client.records
    [(headers, _)] = recorder.got
    assert headers["Host"] == f"receiver.test:{port}"


async def test_failures_are_retried_with_backoff_and_bounded(
        receiver: tuple[Recorder, int]) -> None:
    recorder, port = receiver
    recorder.statuses = [503]
    client = FakeInvocations(new_secret())
    await deliver(f"http://127.0.0.1:{port}/hook", settings("127.0.0.1", attempts=3), client)
    assert [r["state"] for r in client.records] == ["pending", "pending", "failed"]
    assert [r["attempts"] for r in client.records] == [1, 2, 3]
    assert all(r["last_status"] == 503 for r in client.records)
    assert client.records[-1]["error"] == "the receiver answered 503"
    waits = [r["retry_in"] for r in client.records[:2]]
    assert waits == [0.01, 0.02]  # exponential
    assert len(recorder.got) == 3
    # Each attempt is signed afresh; the message id stays (receivers deduplicate).
    assert {h["webhook-id"] for h, _ in recorder.got} == {"inv_" + "a" * 32}


async def test_connection_errors_say_nothing_of_the_port() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    client = FakeInvocations(new_secret())
    await deliver(f"http://127.0.0.1:{closed}/hook", settings("127.0.0.1", attempts=2),
                  client)
    assert [r["error"] for r in client.records] == [UNREACHABLE, UNREACHABLE]
    assert client.records[-1]["state"] == "failed"
    assert all(r["last_status"] == 0 for r in client.records)
    assert "refused" not in json.dumps(client.records).lower()


async def test_redirects_are_not_followed(receiver: tuple[Recorder, int]) -> None:
    recorder, port = receiver
    recorder.statuses = [307]
    client = FakeInvocations(new_secret())
    await deliver(f"http://127.0.0.1:{port}/hook", settings("127.0.0.1", attempts=1), client)
    assert client.records[-1] == {"state": "failed", "attempts": 1, "retry_in": 0.0,
                                  "error": "the receiver answered 307", "last_status": 307}
    assert len(recorder.got) == 1


async def test_the_delivery_session_pools_no_connections() -> None:
    session = delivery_session()
    try:
        assert isinstance(session.connector, aiohttp.TCPConnector)
        assert session.connector.force_close
        assert not session.trust_env
    finally:
        await session.close()


def _tls_pair(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context with a certificate for `name`, client context trusting its CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
             signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = cert("test ca", ca_key, "test ca", ca_key, ca=True)
    leaf = cert(name, key, "test ca", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    return server, client


@pytest.mark.parametrize("certified", ["receiver.test", "other.test"])
async def test_https_goes_to_the_checked_address_and_verifies_the_url_s_name(
        tmp_path: Path, certified: str) -> None:
    server_ctx, client_ctx = _tls_pair(tmp_path, certified)
    recorder = Recorder([204])
    app = web.Application()
    app.router.add_post("/hook", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    port = runner.addresses[0][1]
    config = settings("127.0.0.1", attempts=1)
    guard = WebhookGuard(config.webhook_allow,
                         resolver=resolver({"receiver.test": [["127.0.0.1"]]}))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True,
                                                                   ssl=client_ctx))
    client = FakeInvocations(new_secret())
    try:
        await Webhooks(client, "gw_test", config, session, guard).deliver(  # type: ignore[arg-type]
            finished(f"https://receiver.test:{port}/hook"))
    finally:
        await session.close()
        await runner.cleanup()
    if certified == "receiver.test":
        assert client.records[-1]["state"] == "delivered", client.records
        [(headers, _)] = recorder.got
        assert headers["Host"] == f"receiver.test:{port}"
    else:
        # A certificate for another name: the TLS check is against the URL's host,
        # though the connection went to an address.
        assert client.records[-1]["error"] == UNREACHABLE
        assert recorder.got == []


async def test_an_unexpected_error_is_recorded_in_general_words(
        receiver: tuple[Recorder, int]) -> None:
    recorder, port = receiver
    # A secret that is no whsec_ secret makes signing raise a ValueError whose text
    # must not reach the tenant.
    client = FakeInvocations("not-a-secret")
    await deliver(f"http://127.0.0.1:{port}/hook", settings("127.0.0.1", attempts=2), client)
    assert [r["error"] for r in client.records] == [DELIVERY_FAILED, DELIVERY_FAILED]
    assert client.records[-1]["state"] == "failed"
    assert recorder.got == []

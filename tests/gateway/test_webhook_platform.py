"""Webhooks on a running platform: deliveries signed with the tenant's secret from
`thaw webhook secret` (verified independently), rotation, the delivery state in
`thaw inv show`; anonymous callers of a public function cannot ask for a webhook;
a gateway with the default deny list refuses loopback and metadata addresses at
submission with the same few words whatever is behind them.

Receivers are loopback servers the tests start; the session platform has 127.0.0.1
on its allow-list (tests/conftest.py), the replica here has none."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, Replica, deploy_once
from tests.gateway.tenancy_helpers import deploy, echo_bundle, new_tenant, unique
from tests.gateway.test_invocations import Receiver
from tests.gateway.test_webhook_delivery import verify_standard_webhook
from tests.ops.test_cli import cli_env, thaw

DELIVERY_SECONDS = 60.0
ASYNC = {"Prefer": "respond-async"}


class SignedReceiver(Receiver):
    """Keeps each delivery's headers and raw body (the signature covers the bytes)."""

    def __init__(self) -> None:
        super().__init__(failures=0)
        self.raw: list[tuple[dict[str, str], bytes]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        self.raw.append((dict(request.headers), await request.read()))
        return web.Response(status=204)


def delivered(http: httpx.Client, invocation_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + DELIVERY_SECONDS
    while True:
        doc: dict[str, Any] = http.get(f"/v1/invocations/{invocation_id}").json()
        if doc.get("webhook", {}).get("state") in ("delivered", "failed"):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.05)


def test_deliveries_are_signed_with_the_secret_thaw_webhook_secret_shows(
        platform: RunningPlatform, tmp_path: Path) -> None:
    jobs = deploy_once(platform, BUNDLES / "jobs")
    env = cli_env(tmp_path, platform.url, platform.key)
    shown = thaw(env, "webhook", "secret")
    assert shown.returncode == 0, shown.stderr
    secret = shown.stdout.strip()
    assert secret.startswith("whsec_")
    assert thaw(env, "webhook", "secret").stdout.strip() == secret  # made once
    with SignedReceiver() as receiver:
        resp = platform.invoke(jobs, {"value": "signed"},
                               headers={**ASYNC, "X-Thaw-Webhook": receiver.url})
        assert resp.status_code == 202, resp.text
        invocation_id = resp.json()["id"]
        doc = delivered(platform.http, invocation_id)
        assert doc["webhook"]["state"] == "delivered" and doc["webhook"]["last_status"] == 204
        [(headers, body)] = receiver.raw
        assert headers["webhook-id"] == invocation_id
        verify_standard_webhook(secret, headers, body, time.time())
        assert json.loads(body)["result"] == {"calls": 0, "value": "signed"}

        shown_inv = thaw(env, "inv", "show", invocation_id)
        assert shown_inv.returncode == 0, shown_inv.stderr
        assert receiver.url in shown_inv.stdout
        assert "delivered, 1 attempt, last answer 204" in shown_inv.stdout

        rotated = thaw(env, "webhook", "secret", "--rotate")
        assert rotated.returncode == 0, rotated.stderr
        new = rotated.stdout.strip()
        assert new.startswith("whsec_") and new != secret
        assert "previous secret also signs" in rotated.stderr
        resp = platform.invoke(jobs, {"value": "rotated"},
                               headers={**ASYNC, "X-Thaw-Webhook": receiver.url})
        delivered(platform.http, resp.json()["id"])
        headers, body = receiver.raw[-1]
        assert len(headers["webhook-signature"].split(" ")) == 2
        for key in (new, secret):
            verify_standard_webhook(key, headers, body, time.time())


def test_anonymous_callers_of_a_public_function_cannot_set_a_webhook(
        platform: RunningPlatform, tmp_path: Path) -> None:
    owner = new_tenant(platform)
    name = unique("pubhook")
    assert deploy(owner.http, echo_bundle(tmp_path, name)).status_code == 201
    assert owner.http.patch(f"/v1/functions/{name}", json={"public": True}
                            ).status_code == 200
    url = f"/fn/{owner.tenant}/{name}"
    with SignedReceiver() as receiver, httpx.Client(base_url=platform.url,
                                                    timeout=120) as anonymous:
        assert anonymous.post(url, json={"x": 1}).status_code == 200  # public indeed
        for how in ({"headers": {**ASYNC, "X-Thaw-Webhook": receiver.url}},
                    {"headers": {"X-Thaw-Webhook": receiver.url}},
                    {"headers": ASYNC, "params": {"webhook": receiver.url}},
                    # A streamed call, which is never stored, is refused all the same.
                    {"headers": {"X-Thaw-Webhook": receiver.url,
                                 "Accept": "text/event-stream"}}):
            resp = anonymous.post(url, json={"x": 1}, **how)  # type: ignore[arg-type]
            assert resp.status_code == 403, (how, resp.text)
            assert resp.json()["error"]["field"] == "X-Thaw-Webhook"
        # The tenant's own key may.
        resp = owner.http.post(url, json={"x": 1},
                               headers={**ASYNC, "X-Thaw-Webhook": receiver.url})
        assert resp.status_code == 202, resp.text
        assert delivered(owner.http, resp.json()["id"])["webhook"]["state"] == "delivered"
        assert len(receiver.raw) == 1


def test_the_default_deny_list_refuses_at_submission_saying_only_not_allowed(
        platform: RunningPlatform, replica: Callable[[dict[str, str]], Replica]) -> None:
    jobs = deploy_once(platform, BUNDLES / "jobs")
    strict = replica({"THAW_WEBHOOK_ALLOW": ""})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with SignedReceiver() as receiver:
        answers = []
        for url in (receiver.url, f"http://127.0.0.1:{closed}/hook",
                    f"http://localhost:{closed}/hook", "http://169.254.169.254/latest/",
                    "http://[::ffff:127.0.0.1]:80/hook", "http://[fd00:ec2::254]/",
                    "http://10.0.0.1/hook", "http://no-such-host.invalid/hook"):
            for headers in ({**ASYNC, "X-Thaw-Webhook": url}, {"X-Thaw-Webhook": url}):
                resp = strict.http.post(f"/fn/dev/{jobs}", json={}, headers=headers)
                assert resp.status_code == 400, (url, resp.text)
                answers.append(resp.json()["error"])
        # An open port, a closed one, a name that does not resolve: the same words.
        assert {json.dumps(a, sort_keys=True) for a in answers} == {json.dumps(
            {"code": "webhook_not_allowed", "message": "the webhook URL is not allowed",
             "field": "X-Thaw-Webhook"}, sort_keys=True)}, answers
        assert receiver.raw == []


def test_the_platforms_own_address_stays_refused_beside_the_allow_list(
        platform: RunningPlatform) -> None:
    # The session platform allows only the receivers' loopback address (127.0.0.2):
    # its own API on 127.0.0.1 is not a webhook target.
    jobs = deploy_once(platform, BUNDLES / "jobs")
    assert platform.url.startswith("http://127.0.0.1:")
    for url in (f"{platform.url}/v1/functions", f"{platform.url}/metrics",
                "http://127.0.0.3:9/hook"):
        resp = platform.invoke(jobs, {}, headers={**ASYNC, "X-Thaw-Webhook": url})
        assert resp.status_code == 400, (url, resp.text)
        assert resp.json()["error"]["code"] == "webhook_not_allowed"

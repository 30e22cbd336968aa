"""Alerts end to end: a real LocalPlatform whose gateway is configured through env with
a small error-rate threshold and a local receiver's URLs; a function that fails makes
the error-rate alert fire and reach the receiver (webhook and Slack shapes), and
successful calls afterwards resolve it; a key about to expire fires, revoked it
resolves."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FIXTURES, bundle
from thaw.ops.services import LocalPlatform

# Bounds each wait for a notice; the gateway evaluates every 0.2 s here, so a notice
# arrives well within a second of its cause.
NOTICE_WAIT_SECONDS = 60.0
FUNCTION = "dev/fails-when-asked"


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        received, lock = self.received, self.lock

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for p, body in self.received if p == path]

    def wait_for(self, path: str, match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + NOTICE_WAIT_SECONDS
        while time.monotonic() < deadline:
            found = [b for b in self.bodies(path) if match(b)]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no matching notice at {path}; got {self.bodies(path)}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def is_ours(state: str) -> Any:
    return lambda b: (b.get("alert") == "error_rate" and b.get("subject") == FUNCTION
                      and b.get("state") == state)


def slack_says(word: str) -> Any:
    return lambda b: FUNCTION in b.get("text", "") and "error_rate" in b["text"] and (
        b["text"].startswith(word))


def test_error_rate_alert_fires_reaches_the_receiver_and_resolves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    for name, value in {"THAW_ALERTS_WEBHOOK_URLS": f"{receiver.url}/hook",
                        "THAW_ALERTS_SLACK_URLS": f"{receiver.url}/slack",
                        "THAW_ALERTS_INTERVAL": "0.2", "THAW_ALERTS_COOLDOWN": "0",
                        "THAW_ALERTS_ERROR_RATE": "0.5",
                        "THAW_ALERTS_MIN_REQUESTS": "4",
                        "THAW_ALERTS_KEYS_REFRESH": "0.2"}.items():
        monkeypatch.setenv(name, value)
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x1GiB")
    try:
        local.start()
        with httpx.Client(base_url=local.url, timeout=120,
                          headers={"Authorization": f"Bearer {local.key}"}) as http:
            deployed = http.post("/v1/functions", params={"wait": "true"},
                                 content=bundle(FIXTURES / "fails_when_asked"),
                                 headers={"Content-Type": "application/gzip"})
            assert deployed.status_code == 201, deployed.text
            assert deployed.json()["state"] == "ready", deployed.text
            for _ in range(4):
                failed = http.post(f"/fn/{FUNCTION}", json={"fail": True})
                assert failed.status_code == 500, failed.text

            fired = receiver.wait_for("/hook", is_ours("firing"))
            assert fired["severity"] == "critical"
            assert fired["value"] == 1.0 and fired["threshold"] == 0.5
            assert "4 of 4" in fired["message"]
            assert fired["resolved_at"] is None
            receiver.wait_for("/slack", slack_says("FIRING"))
            assert not [b for b in receiver.bodies("/hook") if is_ours("resolved")(b)]

            listed = http.get("/v1/alerts").json()
            assert listed["api_keys_source"] == "tenancy"
            active = [a for a in listed["active"] if a["alert"] == "error_rate"]
            assert [(a["subject"], a["state"]) for a in active] == [(FUNCTION, "firing")]

            for _ in range(5):  # 4 failed of 9: under half
                ok = http.post(f"/fn/{FUNCTION}", json={})
                assert ok.status_code == 200, ok.text
            resolved = receiver.wait_for("/hook", is_ours("resolved"))
            assert resolved["started_at"] == fired["started_at"]
            assert resolved["resolved_at"] >= fired["started_at"]
            slack = receiver.wait_for("/slack", slack_says("RESOLVED"))
            assert slack["blocks"]

            listed = http.get("/v1/alerts").json()
            assert not [a for a in listed["active"] if a["alert"] == "error_rate"]
            states = [t["state"] for t in listed["recent"]
                      if t["alert"] == "error_rate" and t["subject"] == FUNCTION]
            assert states == ["resolved", "firing"]  # newest first
            assert len([b for b in receiver.bodies("/hook") if is_ours("firing")(b)]) == 1

            # Another tenant's admin is not the operator: no alerts for it. Its key,
            # expiring in 3 days, fires api_key_expiring; revoked, it resolves.
            assert http.post("/v1/tenants", json={"id": "acme"}).status_code == 201
            made = http.post("/v1/keys", json={"tenant": "acme", "scopes": ["admin"],
                                               "name": "ci", "expires_in": 3 * 86400})
            assert made.status_code == 201, made.text
            key_id = made.json()["id"]
            refused = httpx.get(f"{local.url}/v1/alerts",
                                headers={"Authorization": f"Bearer {made.json()['key']}"})
            assert refused.status_code == 403, refused.text

            def expiring(state: str) -> Any:
                return lambda b: (b.get("alert") == "api_key_expiring"
                                  and b.get("subject") == key_id and b.get("state") == state)

            notice = receiver.wait_for("/hook", expiring("firing"))
            assert 2.9 < notice["value"] <= 3.0 and notice["threshold"] == 7.0
            assert "acme" in notice["message"]
            assert http.delete(f"/v1/keys/{key_id}",
                               params={"tenant": "acme"}).status_code in (200, 204)
            receiver.wait_for("/hook", expiring("resolved"))
    finally:
        local.stop()

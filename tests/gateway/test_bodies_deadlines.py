"""Bodies (JSON and raw bytes pass through; 413 past max_body_bytes) and the client's
own deadline, X-Thaw-Timeout (issue 6, item 2)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, Replica, deploy_once, wait_for_file


def test_json_and_raw_bytes_pass_through(platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    resp = platform.http.post(f"/fn/dev/{name}/some/path", json={"a": [1, 2, "é"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["path"] == "/some/path" and body["json"] == {"a": [1, 2, "é"]}

    odd = platform.http.post(f"/fn/dev/{name}/a%20b/%C3%A9?x=1", json={})
    assert odd.status_code == 200 and odd.json()["path"] == "/a b/é"

    raw = os.urandom(100_000)
    resp = platform.http.post(f"/fn/dev/{name}/bytes", content=raw,
                              headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.content == raw[::-1]


def test_a_large_answer_streams_through_intact(platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    raw = os.urandom(3 * 1024 * 1024)  # past the gateway's single-buffer size
    resp = platform.http.post(f"/fn/dev/{name}/bytes", content=raw)
    assert resp.status_code == 200 and resp.content == raw[::-1]


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_bodies_past_the_limit_are_413(platform: RunningPlatform,
                                       replica: Callable[[dict[str, str]], Replica]) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    gw = replica({"THAW_MAX_BODY_BYTES": "1024"})
    ok = gw.http.post(f"/fn/dev/{name}/bytes", content=b"x" * 1024)
    assert ok.status_code == 200 and ok.content == b"x" * 1024

    resp = gw.http.post(f"/fn/dev/{name}/bytes", content=b"x" * 1025)
    assert resp.status_code == 413
    error = resp.json()["error"]
    assert error["code"] == "payload_too_large" and "1024 bytes" in error["message"]

    # Without a Content-Length (chunked), the limit holds as the body arrives.
    resp = gw.http.post(f"/fn/dev/{name}/bytes", content=_chunks(b"y" * 5000, 700))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"

    # OpenAI routes share the limit.
    resp = gw.http.post("/v1/embeddings", json={"model": name, "input": "z" * 2000})
    assert resp.status_code == 413


def test_deadline_while_the_function_runs(platform: RunningPlatform, exchange: Path) -> None:
    name = deploy_once(platform, BUNDLES / "gated")
    gate = exchange / "gate"
    resp = platform.http.post(f"/fn/dev/{name}", json={"gate": str(gate), "sync": True},
                              headers={"X-Thaw-Timeout": "0.5"})
    # The handler cannot have answered: its gate is still closed.
    assert not gate.exists()
    assert resp.status_code == 504, resp.text
    error = resp.json()["error"]
    assert error["code"] == "deadline_exceeded" and error["field"] == "X-Thaw-Timeout"
    assert "0.5s" in error["message"] and "while the function ran" in error["message"]
    assert resp.headers["X-Request-ID"]

    gate.touch()
    # max_concurrency = 1: the next call gets the slot once the first handler is done,
    # which needs its lease back.
    after = platform.http.post(f"/fn/dev/{name}", json={"gate": str(gate), "sync": True},
                               headers={"X-Thaw-Timeout": "20"})
    assert after.status_code == 200, after.text


def test_deadline_while_waiting_for_an_instance(platform: RunningPlatform,
                                                exchange: Path) -> None:
    name = deploy_once(platform, BUNDLES / "gated")
    gate, started = exchange / "gate", exchange / "started"
    holder: dict[str, int] = {}

    def hold_the_only_slot() -> None:
        resp = platform.http.post(f"/fn/dev/{name}", json={
            "gate": str(gate), "sync": True, "started": str(started)})
        holder["status"] = resp.status_code

    first = threading.Thread(target=hold_the_only_slot)
    first.start()
    try:
        wait_for_file(started)  # the first call runs: it holds the only slot
        queued = platform.http.post(f"/fn/dev/{name}", json={"gate": str(gate), "sync": True},
                                    headers={"X-Thaw-Timeout": "0.3"})
        assert queued.status_code == 504, queued.text
        assert "waiting for an instance" in queued.json()["error"]["message"]
    finally:
        gate.touch()
        first.join(30)
    assert holder["status"] == 200
    after = platform.http.post(f"/fn/dev/{name}", json={"gate": str(gate), "sync": True},
                               headers={"X-Thaw-Timeout": "20"})
    assert after.status_code == 200, after.text


def test_bad_deadlines_are_400(platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "probe")
    for value in ("soon", "-1", "0", "nan", "1e9"):
        resp = platform.http.post(f"/fn/dev/{name}", json={},
                                  headers={"X-Thaw-Timeout": value})
        assert resp.status_code == 400, value
        assert resp.json()["error"]["field"] == "X-Thaw-Timeout"

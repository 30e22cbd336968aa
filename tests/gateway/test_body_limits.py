"""A function's own request body limit (thaw.toml [limits] max_body) against the real
platform: sync, async, chunked and OpenAI requests past it get 413 naming the limit;
other functions keep the gateway's limit; the gateway's max_body_bytes caps it; a bad
limit is refused at deploy naming `limits.max_body`."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, Replica, deploy_once

LIMIT = 1024  # tests/gateway/bundles/small_body/thaw.toml: max_body = "1KiB"
# Bounds the raw-socket read below; the 413 comes at once.
SOCKET_SECONDS = 30.0


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def assert_too_large(resp_status: int, error: dict[str, str], limit: int, setting: str
                     ) -> None:
    assert resp_status == 413, error
    assert error["code"] == "payload_too_large" and error["field"] == "body"
    assert f"{limit} bytes" in error["message"] and setting in error["message"], error


def test_bodies_up_to_the_functions_limit_pass(platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "small_body")
    for size in (LIMIT - 1, LIMIT):
        resp = platform.http.post(f"/fn/dev/{name}", content=b"x" * size,
                                  headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"length": size}
    chunked = platform.http.post(f"/fn/dev/{name}", content=_chunks(b"c" * LIMIT, 300))
    assert chunked.status_code == 200 and chunked.json() == {"length": LIMIT}


def test_bodies_past_the_functions_limit_are_413(platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "small_body")
    resp = platform.http.post(f"/fn/dev/{name}", content=b"x" * (LIMIT + 1))
    assert_too_large(resp.status_code, resp.json()["error"], LIMIT, "limits.max_body")
    assert name in resp.json()["error"]["message"]

    # Chunked (no Content-Length): refused as the body arrives.
    resp = platform.http.post(f"/fn/dev/{name}", content=_chunks(b"y" * 5000, 700))
    assert_too_large(resp.status_code, resp.json()["error"], LIMIT, "limits.max_body")

    # JSON and async submissions too: nothing is stored.
    big_json = {"text": "z" * LIMIT}
    resp = platform.invoke(name, big_json)
    assert_too_large(resp.status_code, resp.json()["error"], LIMIT, "limits.max_body")
    resp = platform.invoke(name, big_json, headers={"Prefer": "respond-async"})
    assert_too_large(resp.status_code, resp.json()["error"], LIMIT, "limits.max_body")
    resp = platform.invoke(name, big_json, headers={"Idempotency-Key": "too-big-1"})
    assert resp.status_code == 413

    # OpenAI routes name the function in the body: its limit applies once read.
    resp = platform.http.post("/v1/embeddings", json={"model": name, "input": "z" * LIMIT})
    assert_too_large(resp.status_code, resp.json()["error"], LIMIT, "limits.max_body")


def test_a_declared_length_past_the_limit_is_refused_before_the_body_is_sent(
        platform: RunningPlatform) -> None:
    name = deploy_once(platform, BUNDLES / "small_body")
    host, port = platform.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=SOCKET_SECONDS) as sock:
        # Headers only: the 10 MB body never comes, yet the answer does.
        sock.sendall((f"POST /fn/dev/{name} HTTP/1.1\r\nHost: {host}\r\n"
                      f"Authorization: Bearer {platform.key}\r\n"
                      "Content-Type: application/octet-stream\r\n"
                      "Content-Length: 10000000\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(4096)
            assert piece, answer
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_other_functions_keep_the_gateways_limit(platform: RunningPlatform) -> None:
    deploy_once(platform, BUNDLES / "small_body")
    probe = deploy_once(platform, BUNDLES / "probe")
    raw = b"p" * (100 * LIMIT)
    resp = platform.http.post(f"/fn/dev/{probe}/bytes", content=raw)
    assert resp.status_code == 200 and resp.content == raw[::-1]


def test_the_gateways_limit_caps_the_functions(
        platform: RunningPlatform, replica: Callable[[dict[str, str]], Replica]) -> None:
    name = deploy_once(platform, BUNDLES / "small_body")
    gw = replica({"THAW_MAX_BODY_BYTES": "512"})
    ok = gw.http.post(f"/fn/dev/{name}", content=b"x" * 512)
    assert ok.status_code == 200 and ok.json() == {"length": 512}
    resp = gw.http.post(f"/fn/dev/{name}", content=b"x" * 513)
    assert_too_large(resp.status_code, resp.json()["error"], 512, "max_body_bytes")


def test_a_bad_limit_is_refused_at_deploy(platform: RunningPlatform, tmp_path: Path) -> None:
    folder = tmp_path / "bad_limit"
    shutil.copytree(BUNDLES / "small_body", folder)
    toml = folder / "thaw.toml"
    toml.write_text(toml.read_text().replace('"1KiB"', '"a lot"')
                    .replace("gw-small-body", "gw-bad-limit"))
    resp = platform.deploy(folder)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["field"] == "limits.max_body" and "limits.max_body" in error["message"]
    assert platform.http.get("/v1/functions/gw-bad-limit").status_code == 404

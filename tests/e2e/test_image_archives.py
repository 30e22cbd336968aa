"""Image archive uploads (`PUT /v1/images/{id}`, gateway/images.py) through a real
platform to the scheduler's store (scheduler/images.py): stored content-addressed
once, looked up per tenant, and refused naming the fault when the body is not an
archive, is tampered with, holds another image, or passes the size limit (413 before
a byte is read). No docker engine needed: tests/docker/test_image_archive_deploy.py
loads an uploaded archive into a node's engine."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from urllib.parse import urlsplit

from tests.archives import bundle_layer, config_of, docker_archive
from tests.conftest import RunningPlatform


def put(platform: RunningPlatform, image_id: str, data: bytes) -> tuple[int, dict[str, object]]:
    resp = platform.http.put(f"/v1/images/{image_id}", content=data,
                             headers={"Content-Type": "application/x-tar"})
    return resp.status_code, resp.json()


def store_of(platform: RunningPlatform) -> Path:
    return platform.platform.home / "scheduler" / "images"


def test_an_archive_is_stored_once_and_looked_up(platform: RunningPlatform) -> None:
    data, image_id = docker_archive([bundle_layer()], labels={"test": "stored-once"})
    assert platform.http.get(f"/v1/images/{image_id}").json() == {
        "image_id": image_id, "stored": False, "size": None}
    status, body = put(platform, image_id, data)
    assert status == 201, body
    assert body == {"image_id": image_id, "size": len(data), "existed": False}
    stored = store_of(platform) / f"{image_id.removeprefix('sha256:')}.tar"
    assert stored.read_bytes() == data
    assert platform.http.get(f"/v1/images/{image_id}").json() == {
        "image_id": image_id, "stored": True, "size": len(data)}
    status, body = put(platform, image_id, data)
    assert status == 200 and body["existed"] is True, body
    assert not [p for p in store_of(platform).iterdir() if p.name.startswith(".upload-")]


def test_a_tampered_archive_is_refused(platform: RunningPlatform) -> None:
    claimed = hashlib.sha256(config_of()).hexdigest()
    forged = config_of({"forged": "yes"})
    data, image_id = docker_archive([bundle_layer()], config=forged, config_digest=claimed)
    status, body = put(platform, image_id, data)
    assert status == 400, body
    error = body["error"]
    assert isinstance(error, dict) and error["field"] == "archive"
    assert "the archive is tampered with or damaged" in error["message"]
    assert f"not the {image_id} its manifest names" in error["message"]
    assert not (store_of(platform) / f"{claimed}.tar").exists()


def test_an_archive_of_another_image_is_refused(platform: RunningPlatform) -> None:
    data, image_id = docker_archive([bundle_layer()], labels={"test": "other"})
    other = "sha256:" + "1" * 64
    status, body = put(platform, other, data)
    assert status == 400, body
    assert body["error"] == {"code": "invalid_argument", "field": "image_id",
                             "message": f"the archive holds image {image_id}, not the "
                                        f"{other} it was uploaded as"}


def test_a_non_archive_is_refused(platform: RunningPlatform) -> None:
    status, body = put(platform, "sha256:" + "2" * 64, b"this is not a tar file\n" * 40)
    assert status == 400, body
    error = body["error"]
    assert isinstance(error, dict) and error["field"] == "archive"
    assert "is not a docker save archive" in str(error["message"])
    status, body = put(platform, "sha256:XYZ", b"x")
    assert status == 400 and body["error"]["field"] == "image_id", body  # type: ignore[index]


def test_an_archive_past_the_limit_is_refused_before_it_is_read(
        platform: RunningPlatform) -> None:
    # A head announcing 20 GiB, no body: the answer comes before any of it is sent.
    url = urlsplit(platform.url)
    head = (f"PUT /v1/images/sha256:{'3' * 64} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {platform.key}\r\nContent-Type: application/x-tar\r\n"
            f"Content-Length: {20 * 1024**3}\r\n\r\n")
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer
    assert b"larger than the 16.0 GiB one upload may be (the gateway's " \
           b"max_image_archive_bytes)" in rest, answer

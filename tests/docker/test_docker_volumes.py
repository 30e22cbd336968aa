"""Model volumes on the docker runtime: a container gets the volume as a read-only
bind at its thaw.toml path, in the snapshot build (a restore answers what setup read)
and at a fresh start (read at call time too, and not writable)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from tests.conftest import RunningPlatform
from tests.e2e.test_volumes import _function
from thaw.ops.client import Client
from thaw.ops.uploads import put_volume

VOLUME = "docker-weights"


def test_a_volume_is_a_read_only_bind_in_containers(docker_platform: RunningPlatform,
                                                     tmp_path: Path) -> None:
    p = docker_platform
    weights = tmp_path / "weights"
    (weights / "model").mkdir(parents=True)
    data = random.Random(5).randbytes(3 * 1024 * 1024 + 17)
    (weights / "model" / "weights-0.bin").write_bytes(data)
    assert p.http.post("/v1/volumes", json={"name": VOLUME}).status_code == 201
    assert put_volume(Client(p.url, p.key), VOLUME, weights).chunks_sent == 1
    want = hashlib.sha256(data).hexdigest()

    restored = _function(tmp_path, "docker-volume-reader", VOLUME, snapshot=True)
    made = p.deploy(restored)
    assert made.status_code == 201, made.text
    answer = p.invoke("docker-volume-reader", {})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Thaw-Start"] == "restore"
    assert answer.json()["at_setup"] == want

    fresh = _function(tmp_path, "docker-volume-fresh", VOLUME, snapshot=False)
    assert p.deploy(fresh).status_code == 201
    answer = p.invoke("docker-volume-fresh", {"live": True})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Thaw-Start"] == "fresh"
    assert answer.json() == {"at_setup": want, "live": want, "writable": False}
    for name in ("docker-volume-reader", "docker-volume-fresh"):
        assert p.http.delete(f"/v1/functions/{name}").status_code == 204
    assert p.http.delete(f"/v1/volumes/{VOLUME}").status_code == 204

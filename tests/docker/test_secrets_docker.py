"""A secret on the docker runtime: a restore forked in its template's container gets it
(on_restore sees it, and a rotated value on the next instance) through the spawn
request; the template's container, shared by every function of the code, never has it
in its environment; a fresh container has it in its environment (where docker keeps
a container's variables), never on its command line."""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningPlatform
from tests.docker.conftest import DockerPlatform, agent_containers
from tests.e2e.test_secrets import probe_bundle

pytestmark = pytest.mark.docker


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_secrets_in_containers(docker_platform: RunningPlatform, docker_client: Any,
                               tmp_path: Path) -> None:
    local = docker_platform.platform
    assert isinstance(local, DockerPlatform)
    http = docker_platform.http
    suffix = uuid.uuid4().hex[:6]
    secret = f"PROBE_TOKEN_{suffix.upper()}"
    first, second = "d1-" + secrets.token_urlsafe(20), "d2-" + secrets.token_urlsafe(20)
    assert http.put(f"/v1/secrets/{secret}", json={"value": first}).status_code == 201
    restore = probe_bundle(tmp_path, f"dprobe-r-{suffix}", snapshot=True, secret=secret)
    fresh = probe_bundle(tmp_path, f"dprobe-f-{suffix}", snapshot=False, secret=secret)
    for folder in (restore, fresh):
        (folder / "app.py").write_text((folder / "app.py").read_text().replace(
            '"PROBE_TOKEN"', f'"{secret}"'))
        resp = docker_platform.deploy(folder)
        assert resp.status_code == 201, resp.text

    restored = docker_platform.invoke(restore.name)
    assert restored.status_code == 200 and restored.headers["X-Thaw-Start"] == "restore"
    body = restored.json()
    assert (body["digest"], body["restored_digest"], body["mode"]) == (
        sha(first), sha(first), "probe")
    started = docker_platform.invoke(fresh.name)
    assert started.status_code == 200 and started.json()["digest"] == sha(first)

    def holding(value: str, mode: str) -> list[str]:
        found = []
        for c in agent_containers(docker_client, local, mode=mode):
            c.reload()
            config = c.attrs["Config"]
            if value in json.dumps(config.get("Env") or []):
                found.append(c.name)
            assert value not in json.dumps([config.get("Cmd"), config.get("Entrypoint"),
                                            c.attrs.get("Args")]), c.name
        return found

    assert holding(first, "template") == []
    assert holding(first, "fresh") != []

    assert http.put(f"/v1/secrets/{secret}", json={"value": second}).status_code == 200
    again = docker_platform.invoke(restore.name)
    assert again.status_code == 200 and again.headers["X-Thaw-Start"] == "restore"
    assert (again.json()["digest"], again.json()["restored_digest"]) == (
        sha(second), sha(second))
    assert holding(second, "template") == []

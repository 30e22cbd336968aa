"""Fork safety on the docker runtime: a function whose module initialises CUDA at
import (tests/fixtures/bundles/cuda_at_import, fake CuPy where no GPU is present)
restores cold in a container of its own instead of a fork of its template, whose
container is stopped; the snapshot is never quarantined for it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import FIXTURES, RunningPlatform
from tests.docker.conftest import DockerPlatform, agent_containers

pytestmark = pytest.mark.docker

NAME = "cuda-at-import"
REASON = "CuPy initialised CUDA at import (module app)"


def test_a_fork_poisoned_function_restores_in_its_own_container(
        docker_platform: RunningPlatform, docker_client: Any) -> None:
    platform = docker_platform.platform
    assert isinstance(platform, DockerPlatform)

    def running(mode: str) -> list[Any]:
        return [c for c in agent_containers(docker_client, platform, mode=mode)
                if c.status == "running"]

    templates_before = {c.id for c in running("template")}
    deployed = docker_platform.deploy(FIXTURES / "cuda_at_import")
    assert deployed.status_code == 201, deployed.text
    assert deployed.json()["start_mode"] == "restore", deployed.json()

    cold = docker_platform.invoke(NAME)
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    assert cold.json()["answer"] == 42

    fn = docker_platform.http.get(f"/v1/functions/{NAME}").json()
    assert fn["start_mode"] == "restore" and "quarantine" not in fn.get("reason", ""), fn
    logs = docker_platform.http.get(f"/v1/functions/{NAME}/logs", params={"tail": 1000})
    lines = [json.loads(line)["line"] for line in logs.text.splitlines() if line]
    assert any(f"restores in a fresh interpreter: {REASON}" in line for line in lines), lines
    # The template that could not fork was stopped; the instance has a container of
    # its own, started in restore mode.
    assert {c.id for c in running("template")} <= templates_before
    assert running("restore"), agent_containers(docker_client, platform)

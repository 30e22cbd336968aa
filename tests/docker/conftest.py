"""Fixtures for the docker runtime's tests: a real engine, the base image built on
this machine (minutes the first time, cached after), and a local platform whose agent
runs instances in containers (THAW_RUNTIME=docker).

Without an engine these tests skip, saying why; with CI=true a skip is a failure
(tests/conftest.py)."""

from __future__ import annotations

import os
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningPlatform, running
from thaw.ops.services import LocalPlatform
from thaw.platform import images

# Where the agent's containers are found: every one carries its agent's pid.
LABEL_AGENT_PID = "thaw.agent_pid"


@pytest.fixture(scope="session")
def docker_client() -> Any:
    if os.geteuid() != 0:
        pytest.skip("the docker tests build the base image with debootstrap: run as root")
    try:
        return images.docker_client()
    except images.ImageBuildError as exc:
        pytest.skip(f"no docker engine: {exc} (start one with `dockerd &`)")


@pytest.fixture(scope="session")
def base_image(docker_client: Any) -> str:
    started = time.perf_counter()
    tag = images.ensure_base_image(docker_client)
    print(f"\nbase image {tag} ready in {time.perf_counter() - started:.1f}s")
    return tag


class DockerPlatform(LocalPlatform):
    """`thaw up`'s services, with the agent on the docker runtime."""

    def __init__(self, home: Path, image: str, site_packages: str = "") -> None:
        super().__init__(home, gateway_port=0, host_devices="2x4GiB")
        self.docker_env = {"THAW_RUNTIME": "docker", "THAW_DOCKER_IMAGE": image,
                           "THAW_DOCKER_SITE_PACKAGES": site_packages}

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Any:
        return super()._start(name, args, {**env, **self.docker_env})

    @property
    def agent_pid(self) -> int:
        return next(proc.pid for name, proc in self.procs if name.startswith("agent"))


def agent_containers(client: Any, platform: DockerPlatform, **filters: str) -> list[Any]:
    """Containers (running or not) of this platform's agent."""
    labels = [f"{LABEL_AGENT_PID}={platform.agent_pid}",
              *(f"thaw.{key}={value}" for key, value in filters.items())]
    return list(client.containers.list(all=True, filters={"label": labels}))


def host_site_packages() -> str:
    """This virtualenv's packages (torch, sentence-transformers) for the embed test:
    usable in the image when its Python has the same minor version."""
    return sysconfig.get_paths()["purelib"]


@pytest.fixture(scope="session")
def docker_platform(tmp_path_factory: pytest.TempPathFactory,
                    base_image: str) -> Iterator[RunningPlatform]:
    home = tmp_path_factory.mktemp("thaw-docker-home")
    with running(DockerPlatform(home, base_image, host_site_packages())) as platform:
        yield platform

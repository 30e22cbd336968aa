"""Per-function environments on the docker runtime (docs/environments.md, "Runtimes"):
a bundle pinning its own attrs (a fake 0.0.1 wheel from a local index) deploys on a
docker node, whose agent builds the environment on the host with uv as on a process
node; its containers run the image's python3 with the environment's site-packages
mounted read-only and on PYTHONPATH instead of the node's, restore from the snapshot
and answer with the pinned version."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningPlatform, running
from tests.docker.conftest import DockerPlatform, agent_containers, host_site_packages
from tests.e2e.test_environments import (
    check_public_names,
    environments,
    function,
    log_lines,
    public_names_in_an_environment,
)
from tests.wheels import fake_attrs_index

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def docker_env_platform(tmp_path_factory: pytest.TempPathFactory,
                        base_image: str) -> Iterator[RunningPlatform]:
    index = fake_attrs_index(tmp_path_factory.mktemp("index"))
    index.chmod(0o755)  # the builder's uid reads it
    home = tmp_path_factory.mktemp("thaw-docker-env-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THAW_ENV_INDEX_URL", str(index))
        local = DockerPlatform(home, base_image, host_site_packages())
        with running(local) as platform:
            yield platform


def test_a_bundle_with_its_own_attrs_runs_in_containers(
        docker_env_platform: RunningPlatform, docker_client: Any, tmp_path: Path) -> None:
    p = docker_env_platform
    local = p.platform
    assert isinstance(local, DockerPlatform)
    fn = p.deploy(function(tmp_path / "a", "docker-attrs", "attrs==0.0.1\n")).json()
    assert fn["state"] == "ready" and fn["start_mode"] == "restore", fn
    lines = log_lines(p, "docker-attrs")
    assert any("installing 1 packages into environment" in ln for ln in lines), lines
    built = environments(local.home, "local")
    assert len(built) == 1, built
    site = built[0] / "lib"
    resp = p.invoke("docker-attrs")
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Thaw-Start"] == "restore"
    body = resp.json()
    assert body["version"] == "0.0.1" and body["now"] == "0.0.1", body
    assert body["file"].startswith(str(site) + "/"), body
    assert body["prefix"] == "/usr", body  # the image's python3, not the host's

    # The containers that ran it: the environment's packages, read-only, on
    # PYTHONPATH; the node's own site-packages neither mounted nor on the path.
    ran = [c for c in agent_containers(docker_client, local)
           if str(site) in json.dumps(c.attrs["Config"].get("Env") or [])]
    assert ran, "no container ran in the environment"
    for container in ran:
        env = dict(v.split("=", 1) for v in container.attrs["Config"]["Env"])
        assert host_site_packages() not in env["PYTHONPATH"], env["PYTHONPATH"]
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        packages = next(m for d, m in mounts.items() if d.startswith(str(site)))
        assert packages["RW"] is False, packages
        assert host_site_packages() not in mounts

    # A function without a dependency file keeps the node's packages (attrs from the
    # agent's virtualenv, mounted as docker_site_packages).
    base = p.deploy(function(tmp_path / "b", "docker-base", None)).json()
    assert base["state"] == "ready", base
    answer = p.invoke("docker-base").json()
    assert answer["version"] != "0.0.1" and "/envs/" not in answer["file"], answer


def test_from_thaw_import_works_in_containers(docker_env_platform: RunningPlatform,
                                              tmp_path: Path) -> None:
    # In an environment (the image's python3 with the environment's packages) and in
    # the base one: the `thaw` package's file is mounted beside the runtime either way.
    fn = docker_env_platform.deploy(public_names_in_an_environment(tmp_path / "pn")).json()
    assert fn["state"] == "ready" and fn["start_mode"] == "restore", fn
    check_public_names(docker_env_platform)

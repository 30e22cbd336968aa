"""The docker runtime against the real engine (DESIGN.md §7): the foundation's path
(deploy, cold restore, warm) with every instance in a container, the hardening of
those containers, crashes, and cleanup."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform
from tests.docker.conftest import DockerPlatform, agent_containers
from tests.e2e.test_isolation import CASES as ISOLATION_CASES
from thaw.core.units import parse_size
from thaw.platform.docker import (
    BASE_MEMORY_BYTES,
    RUNTIME_MOUNT,
    UID_BASE,
    can_limit_other_uids,
)

pytestmark = pytest.mark.docker

FRESH_MEMORY = "192MiB"


def copy_bundle(src: Path, dest: Path, name: str, extra_toml: str = "") -> Path:
    """A copy of a bundle under another name, with more thaw.toml appended."""
    shutil.copytree(src, dest)
    toml = (dest / "thaw.toml").read_text()
    old_name = next(line for line in toml.splitlines() if line.startswith("name ="))
    (dest / "thaw.toml").write_text(toml.replace(old_name, f'name = "{name}"') + extra_toml)
    return dest


def local(platform: RunningPlatform) -> DockerPlatform:
    assert isinstance(platform.platform, DockerPlatform)
    return platform.platform


def test_echo_cold_restore_then_warm_in_containers(docker_platform: RunningPlatform,
                                                   docker_client: Any) -> None:
    resp = docker_platform.deploy(EXAMPLES / "echo")
    assert resp.status_code == 201, resp.text
    fn = resp.json()
    assert fn["state"] == "ready" and fn["start_mode"] == "restore", fn

    cold = docker_platform.invoke("echo", {"hello": "container"})
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    body = cold.json()
    assert body["echo"] == {"hello": "container"}
    # setup() ran in the build's container, not in the restored instance.
    assert body["setup_pid"] != body["pid"]

    warm = docker_platform.invoke("echo", {"n": 2})
    assert warm.status_code == 200, warm.text
    assert warm.headers["X-Thaw-Start"] == "warm"
    assert warm.json()["pid"] == body["pid"]

    # The restored instance lives in its template's container; the build's is gone.
    templates = agent_containers(docker_client, local(docker_platform), mode="template")
    assert [c.status for c in templates] == ["running"]
    assert templates[0].labels["thaw.node"] == "local"
    assert not agent_containers(docker_client, local(docker_platform), mode="build")


def test_containers_are_hardened(docker_platform: RunningPlatform, docker_client: Any,
                                 tmp_path: Path) -> None:
    assert docker_platform.deploy(EXAMPLES / "echo").status_code == 201
    assert docker_platform.invoke("echo").status_code == 200
    fresh = copy_bundle(EXAMPLES / "echo", tmp_path / "echo-fresh", "echo-fresh",
                        "\n[snapshot]\nenabled = false\n")
    toml = (fresh / "thaw.toml").read_text().replace(
        "[resources]\n", f'[resources]\nmemory = "{FRESH_MEMORY}"\n')
    (fresh / "thaw.toml").write_text(toml)
    resp = docker_platform.deploy(fresh)
    assert resp.status_code == 201 and resp.json()["start_mode"] == "fresh", resp.text
    call = docker_platform.invoke("echo-fresh")
    assert call.status_code == 200 and call.headers["X-Thaw-Start"] == "fresh", call.text

    platform = local(docker_platform)
    running = [c for c in agent_containers(docker_client, platform) if c.status == "running"]
    modes = {c.labels["thaw.mode"] for c in running}
    assert {"template", "fresh"} <= modes, modes
    for container in running:
        container.reload()
        host = container.attrs["HostConfig"]
        assert host["CapDrop"] == ["ALL"], host["CapDrop"]
        assert not host.get("CapAdd")
        assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"])
        assert host["ReadonlyRootfs"] is True
        assert "/tmp" in host["Tmpfs"]
        assert host["PidsLimit"] and host["PidsLimit"] > 0
        assert host["Memory"] > 0
        assert host["NetworkMode"] == "none"
        assert host["Privileged"] is False
        assert not host.get("Devices") and not host.get("DeviceRequests")
        assert host["PidMode"] in ("", "private")  # host backend: own PID namespace
        networks = container.attrs["NetworkSettings"]["Networks"]
        assert set(networks) == {"none"}
        assert not any(n.get("IPAddress") for n in networks.values())
        user = container.attrs["Config"]["User"]
        if can_limit_other_uids():  # a uid of its own (docker_runtime: "Users")
            assert int(user.split(":")[0]) >= UID_BASE, user
        else:  # the agent's, so that its per-instance memory limit still applies
            assert user == f"{os.getuid()}:{os.getuid()}", user
        assert container.labels["thaw.instance"] and container.labels["thaw.node"] == "local"
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert mounts[RUNTIME_MOUNT]["RW"] is False
        bundle = next(m for d, m in mounts.items() if "/bundles/" in d)
        assert bundle["RW"] is False
        # And from the inside: no writable root, no network but loopback.
        probe = container.exec_run(["python3", "-c", (
            "import socket, sys\n"
            "try:\n    open('/probe', 'w')\nexcept OSError as e:\n    print(e.errno)\n"
            "print(sorted(n for _, n in socket.if_nameindex()))\n")])
        out = probe.output.decode()
        assert probe.exit_code == 0, out
        assert out.splitlines() == ["30", "['lo']"], out  # 30 = EROFS
    fresh_container = next(c for c in running if c.labels["thaw.mode"] == "fresh")
    assert fresh_container.attrs["HostConfig"]["Memory"] == (
        parse_size(FRESH_MEMORY) + BASE_MEMORY_BYTES)


def test_fresh_container_exit_is_5xx_and_replaced(docker_platform: RunningPlatform,
                                                  tmp_path: Path) -> None:
    """A fresh instance is a container's main process: its exit code comes from the
    engine's wait."""
    exits = copy_bundle(FIXTURES / "exits", tmp_path / "exits-fresh", "exits-fresh",
                        "\n[snapshot]\nenabled = false\n")
    fn = docker_platform.deploy(exits).json()
    assert fn["state"] == "ready" and fn["start_mode"] == "fresh", fn
    first = docker_platform.invoke("exits-fresh")
    assert first.status_code == 200, first.text
    bad = docker_platform.invoke("exits-fresh", {"exit": True})
    assert bad.status_code == 502, bad.text
    assert "exit code 3" in bad.json()["error"]["message"]
    again = docker_platform.invoke("exits-fresh")
    assert again.status_code == 200, again.text
    assert again.headers["X-Thaw-Start"] == "fresh"


@pytest.mark.slow
def test_embed_with_host_site_packages(docker_platform: RunningPlatform) -> None:
    """torch and the model come from the host virtualenv, mounted read-only."""
    resp = docker_platform.deploy(EXAMPLES / "embed")
    assert resp.status_code == 201, resp.text
    assert resp.json()["state"] == "ready" and resp.json()["start_mode"] == "restore", \
        resp.json()
    texts = ["a snapshot restore beats a fresh start", "hello world"]
    cold = docker_platform.invoke("embed", {"texts": texts})
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    restored = cold.json()
    assert restored["dimensions"] == 384
    assert restored["setup_runs"] == 1 and restored["setup_pid"] != restored["pid"]
    warm = docker_platform.invoke("embed", {"texts": texts})
    assert warm.headers["X-Thaw-Start"] == "warm"
    assert warm.json()["embeddings"] == restored["embeddings"]


def test_no_container_outlives_the_platform(tmp_path: Path, base_image: str,
                                            docker_client: Any) -> None:
    platform = DockerPlatform(tmp_path / "home", base_image)
    try:
        platform.start()
        running = RunningPlatform(platform)
        assert running.deploy(EXAMPLES / "echo").status_code == 201
        assert running.invoke("echo").status_code == 200
        agent_pid = platform.agent_pid
        assert agent_containers(docker_client, platform), "the agent started no container"
        running.http.close()
    finally:
        platform.stop()
    deadline = time.monotonic() + 10
    left: list[Any] = []
    while time.monotonic() < deadline:
        left = list(docker_client.containers.list(
            all=True, filters={"label": f"thaw.agent_pid={agent_pid}"}))
        if not left:
            break
        time.sleep(0.2)
    assert not left, [c.name for c in left]
    # Nor any of the host-side files that went with them.
    node = tmp_path / "home" / "agent" / "local"
    # Logs are in each tenant's area (logs/<tenant uid>/), their containers' links too.
    private = list((node / "logs").glob("*/.containers"))
    assert private and not [entry for folder in private for entry in folder.iterdir()]
    assert not (node / "containers").exists() or not list((node / "containers").iterdir())


@pytest.mark.parametrize(("name", "payload", "status", "reason"), ISOLATION_CASES,
                         ids=[c[0] for c in ISOLATION_CASES])
def test_misbehaving_restored_instance_is_replaced(docker_platform: RunningPlatform,
                                                   name: str, payload: dict[str, bool],
                                                   status: int, reason: str) -> None:
    """The process runtime's isolation cases (tests/e2e/test_isolation.py), in
    containers: segfault, exit, memory past the limit, hang past the timeout."""
    fn = docker_platform.deploy(FIXTURES / name).json()
    assert fn["state"] == "ready", fn
    first = docker_platform.invoke(name)
    assert first.status_code == 200, first.text
    bad = docker_platform.invoke(name, payload)
    assert bad.status_code == status, bad.text
    assert reason in bad.json()["error"]["message"]
    again = docker_platform.invoke(name)
    assert again.status_code == 200, again.text
    assert again.json()["pid"] != first.json()["pid"]

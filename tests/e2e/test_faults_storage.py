"""A full or read-only data directory is detected and refused early: a real
LocalPlatform whose agent's home is a small tmpfs mounted by the test (we are root).
Filled past storage_min_free, then made read-only, the node reports the condition
(GET /v1/nodes, the event feed, the node_storage alert) and a deploy answers 507 naming
the node and the directory; freed or made writable again, deploys work."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform
from thaw.ops.services import LocalPlatform

MiB = 1024**2
WAIT_SECONDS = 60.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounts a tmpfs: needs root")


@pytest.fixture()
def small_home(tmp_path: Path) -> Iterator[Path]:
    """THAW_HOME whose agent folder ("local") is a 64 MiB tmpfs of its own."""
    home = tmp_path / "home"
    agent_home = home / "agent" / "local"
    agent_home.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(agent_home)],
                   check=True)
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(agent_home)], check=False)


def conditions(p: RunningPlatform) -> list[dict[str, Any]]:
    return list(p.http.get("/v1/nodes").json()["nodes"][0]["conditions"])


def wait_for_conditions(p: RunningPlatform, want: list[tuple[str, str]]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = conditions(p)
        if [(c["type"], c["path"]) for c in found] == want:
            return found
        assert time.monotonic() < deadline, f"conditions {found}, wanted {want}"
        time.sleep(0.1)


def test_a_full_or_read_only_node_is_reported_and_refuses_deploys_with_507(
        small_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"THAW_STORAGE_MIN_FREE": "16MiB", "THAW_HEARTBEAT_INTERVAL": "0.5",
                        "THAW_ALERTS_INTERVAL": "0.2", "THAW_ALERTS_COOLDOWN": "0"}.items():
        monkeypatch.setenv(name, value)
    agent_home = small_home / "agent" / "local"
    local = LocalPlatform(small_home, gateway_port=0, host_devices="1x1GiB")
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(EXAMPLES / "echo").json()["state"] == "ready"
        assert conditions(p) == []

        filler = agent_home / "filler"
        free = os.statvfs(agent_home).f_bavail * os.statvfs(agent_home).f_frsize
        with filler.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, free - 8 * MiB)
        (full,) = wait_for_conditions(p, [("disk_full", str(agent_home))])
        assert full["free_bytes"] < 16 * MiB and full["total_bytes"] == 64 * MiB
        refused = p.deploy(FIXTURES / "sleep")
        assert refused.status_code == 507, refused.text
        error = refused.json()["error"]
        assert error["code"] == "insufficient_storage"
        assert f"insufficient storage on node local: {agent_home} is disk-full" in (
            error["message"])
        events = p.http.get("/v1/events", params={"kind": "node_condition"}).json()["events"]
        assert [e["attrs"]["condition"] for e in events] == ["disk_full"]
        deadline = time.monotonic() + WAIT_SECONDS
        while not [a for a in p.http.get("/v1/alerts").json()["active"]
                   if a["alert"] == "node_storage"]:
            assert time.monotonic() < deadline, "no node_storage alert"
            time.sleep(0.2)
        assert p.invoke("echo", {"x": 1}).status_code == 200  # what runs keeps serving

        filler.unlink()
        wait_for_conditions(p, [])
        assert p.deploy(FIXTURES / "sleep").json()["state"] == "ready"

        # A read-only bind mount over the folder: files the agent holds open for
        # writing (logs) keep their own mount, so this needs no remount of the tmpfs.
        subprocess.run(["mount", "--bind", str(agent_home), str(agent_home)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(agent_home)], check=True)
        try:
            (ro,) = wait_for_conditions(p, [("read_only", str(agent_home))])
            assert ro["message"] == "mounted read-only"
            again = p.deploy(FIXTURES / "batched")
            assert again.status_code == 507, again.text
            assert f"{agent_home} is read-only" in again.json()["error"]["message"]
        finally:
            subprocess.run(["umount", "-l", str(agent_home)], check=True)
        wait_for_conditions(p, [])
        assert p.deploy(FIXTURES / "batched").json()["state"] == "ready"
        assert p.invoke("sleep", {"seconds": 0}).status_code == 200
    finally:
        local.stop()

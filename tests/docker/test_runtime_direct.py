"""DockerRuntime on its own, as the agent drives it: fresh, build, template and spawn,
with each container under a uid of its own (the path the e2e tests take only where
the agent has CAP_SYS_RESOURCE)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES
from thaw.platform.docker import UID_BASE, DockerRuntime
from thaw.platform.runtime import LaunchSpec

pytestmark = pytest.mark.docker


async def invoke(socket_path: str, body: dict[str, Any]) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    data = json.dumps(body).encode()
    writer.write(b"POST /invoke HTTP/1.1\r\nHost: i\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    result: dict[str, Any] = json.loads(payload)
    return result


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(next(line for line in handle if line.startswith("Uid:")).split()[1])


@pytest.fixture
async def runtime(docker_client: Any, base_image: str,
                  tmp_path: Path) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(docker_client, image=base_image, node_id=f"t-{uuid.uuid4().hex[:6]}",
                       state_dir=tmp_path / "containers", own_uids=True)
    try:
        yield rt
    finally:
        await rt.close()
    left = docker_client.containers.list(all=True,
                                         filters={"label": f"thaw.agent={rt.agent_id}"})
    assert not left


async def test_fresh_build_template_spawn(runtime: DockerRuntime, tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / "echo"
    shutil.copytree(EXAMPLES / "echo", bundle)
    logs = tmp_path / "logs"
    logs.mkdir()
    run = Path("/dev/shm") / f"thaw-test-{uuid.uuid4().hex[:8]}"
    snapshots = run / "snapshots"
    (run / "run").mkdir(parents=True)
    try:
        sock = str(run / "run" / "i1.sock")
        fresh = await runtime.launch(LaunchSpec.from_runtime_args(
            "fresh", ["--bundle", str(bundle), "--handler", "app:Echo", "--socket", sock],
            str(logs / "i1.log"), cwd=str(bundle), env={"THAW_FUNCTION": "t/echo"},
            instance_id="i1"))
        ready = await fresh.next_event(60)
        assert ready["event"] == "ready" and ready["pid"] == fresh.pid
        assert uid_of(fresh.pid) >= UID_BASE
        answer = await invoke(sock, {"a": 1})
        assert answer["echo"] == {"a": 1} and answer["pid"] == 1  # PID 1 of its namespace

        out = tmp_path / "builds" / "b1"
        out.mkdir(parents=True)
        build = await runtime.launch(LaunchSpec.from_runtime_args("build", [
            "--bundle", str(bundle), "--handler", "app:Echo", "--out", str(out),
            "--function-version", "1"], str(logs / "build.log"), cwd=str(bundle)))
        assert (await build.next_event(60))["event"] == "captured"
        assert await build.proc.wait() == 0
        # As the agent lays them out: per-snapshot folder, arenas shared by content.
        snap = snapshots / "k1"
        shutil.copytree(out, snap)
        (snapshots / "arenas").mkdir()
        os.replace(snap / "host.arena", snapshots / "arenas" / "a1")

        control = str(run / "run" / "t.sock")
        template = await runtime.launch(LaunchSpec.from_runtime_args("template", [
            "--bundle", str(bundle), "--handler", "app:Echo",
            "--snapshot-json", str(snap / "snapshot.json"), "--control", control],
            str(logs / "template.log"), cwd=str(bundle)))
        assert (await template.next_event(60))["event"] == "template_ready"
        inst_sock = str(run / "run" / "r1.sock")
        pid, event = await runtime.spawn(control, {
            "instance_id": "r1", "socket": inst_sock, "pickle": str(snap / "state.pickle"),
            "host_arena": str(snapshots / "arenas" / "a1"), "device_arena": None,
            "snapshot_json": str(snap / "snapshot.json"), "log": str(logs / "r1.log")}, 30)
        assert event["event"] == "ready" and event["pid"] == pid
        assert uid_of(pid) == uid_of(template.pid) != uid_of(fresh.pid)
        answer = await invoke(inst_sock, {"b": 2})
        assert answer["setup_pid"] == 1 and answer["pid"] != 1  # forked, not set up
        # Its exit status reaches the template's stream under its host pid.
        os.kill(pid, signal.SIGSEGV)
        line = await asyncio.wait_for(template.events.readline(), 10)
        assert json.loads(line) == {"event": "child_exited", "pid": pid, "returncode": -11}

        os.killpg(fresh.pid, signal.SIGTERM)
        assert await asyncio.wait_for(fresh.proc.wait(), 30) == 0
        await template.kill()
        assert template.proc.returncode == -signal.SIGKILL
    finally:
        shutil.rmtree(run, ignore_errors=True)

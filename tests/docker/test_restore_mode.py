"""The docker runtime's restore mode, as the agent uses it for a snapshot whose template
may not fork: a container of its own imports the function, then takes the same spawn
request (its descriptors passed over the bind-mounted control socket) and restores
into its main process."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES
from tests.docker.test_runtime_direct import invoke
from thaw.platform.docker import DockerRuntime
from thaw.platform.runtime import LaunchSpec

pytestmark = pytest.mark.docker


@pytest.fixture
async def runtime(docker_client: Any, base_image: str,
                  tmp_path: Path) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(docker_client, image=base_image, node_id=f"t-{uuid.uuid4().hex[:6]}",
                       state_dir=tmp_path / "containers")
    try:
        yield rt
    finally:
        await rt.close()


async def test_a_restore_mode_container_restores_the_request_it_is_sent(
        runtime: DockerRuntime, tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / "echo"
    shutil.copytree(EXAMPLES / "echo", bundle)
    logs = tmp_path / "logs"
    logs.mkdir()
    run = Path("/dev/shm") / f"thaw-test-{uuid.uuid4().hex[:8]}"
    (run / "run").mkdir(parents=True)
    try:
        out = tmp_path / "builds" / "b1"
        out.mkdir(parents=True)
        build = await runtime.launch(LaunchSpec.from_runtime_args("build", [
            "--bundle", str(bundle), "--handler", "app:Echo", "--out", str(out),
            "--function-version", "1"], str(logs / "build.log"), cwd=str(bundle)))
        assert (await build.next_event(60))["event"] == "captured"
        assert await build.proc.wait() == 0

        control = str(run / "run" / "r.sock")
        restore = await runtime.launch(LaunchSpec.from_runtime_args("restore", [
            "--bundle", str(bundle), "--handler", "app:Echo", "--control", control],
            str(logs / "r1.log"), cwd=str(bundle), instance_id="r1"))
        assert (await restore.next_event(60))["event"] == "template_ready"
        # The snapshot's files are opened on this side and sent as descriptors: the
        # container has none of them mounted.
        inst_sock = str(run / "run" / "r1.sock")
        pid, event = await runtime.spawn(control, {
            "instance_id": "r1", "socket": inst_sock, "log": str(logs / "r1.log"),
            "pickle": str(out / "state.pickle"), "host_arena": str(out / "host.arena"),
            "snapshot_json": str(out / "snapshot.json")}, 30)
        assert event["event"] == "ready"
        assert pid == restore.pid  # restored in the container's main process, no fork
        answer = await invoke(inst_sock, {"b": 2})
        assert answer["echo"] == {"b": 2} and answer["pid"] == 1  # PID 1 of its namespace
        await restore.kill()
    finally:
        shutil.rmtree(run, ignore_errors=True)

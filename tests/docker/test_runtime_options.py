"""The docker runtime's container options, checked without an engine (a fake client),
and its cleanup of a dead agent's containers, with one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from thaw.platform import images
from thaw.platform.docker import (
    BASE_MEMORY_BYTES,
    UID_BASE,
    DockerRuntime,
    _Container,
    can_limit_other_uids,
    exit_code_from_engine,
    host_pid_of,
)
from thaw.platform.docker.spec import create_kwargs
from thaw.platform.runtime import LaunchSpec


class FakeImage:
    attrs = {"Config": {"Labels": {images.LABEL_PYTHON: "3.11.2"}}}


class FakeImages:
    def get(self, tag: str) -> FakeImage:
        return FakeImage()


class FakeClient:
    images = FakeImages()


def runtime(tmp_path: Path, device: str) -> DockerRuntime:
    return DockerRuntime(FakeClient(), image="thaw/base:test", node_id="n1",
                         state_dir=tmp_path, device=device)


def run_kwargs(rt: DockerRuntime, c: _Container, spec: LaunchSpec) -> dict[str, Any]:
    """The container's create arguments for `spec`, as the runtime makes them."""
    return create_kwargs(spec, rt.settings, name=c.name, uid=c.uid, mounts=[],
                         memory_bytes=1 << 30)


def container(tmp_path: Path) -> _Container:
    return _Container("c1", "fresh", 200_123, "i1.log", tmp_path, tmp_path, tmp_path)


def test_cuda_requests_gpus_and_shares_the_pid_namespace(tmp_path: Path) -> None:
    spec = LaunchSpec.from_runtime_args("fresh", ["--bundle", "/b"], "/l/i1.log", cwd="/b",
                                        env={}, instance_id="i1")
    kwargs = run_kwargs(runtime(tmp_path, "cuda"), container(tmp_path), spec)
    [request] = kwargs["device_requests"]
    assert request["Capabilities"] == [["gpu"]] and request["Count"] == -1
    assert kwargs["pid_mode"] == "host"
    assert kwargs["network_mode"] == "none" and kwargs["cap_drop"] == ["ALL"]
    # A fresh instance told its slice's GPU gets that one only.
    spec = LaunchSpec.from_runtime_args("fresh", [], "/l/i1.log", cwd="/b", env={},
                                        instance_id="i1", gpu_device_ids=["GPU-1234"])
    kwargs = run_kwargs(runtime(tmp_path, "cuda"), container(tmp_path), spec)
    [request] = kwargs["device_requests"]
    assert request["DeviceIDs"] == ["GPU-1234"] and not request["Count"]


def test_host_backend_has_no_gpu_and_its_own_pid_namespace(tmp_path: Path) -> None:
    spec = LaunchSpec.from_runtime_args("fresh", ["--bundle", "/b"], "/l/i1.log", cwd="/b",
                                        env={"THAW_FUNCTION": "dev/echo"}, instance_id="i1")
    kwargs = run_kwargs(runtime(tmp_path, "host"), container(tmp_path), spec)
    assert "device_requests" not in kwargs and "pid_mode" not in kwargs
    assert kwargs["user"] == "200123:200123"
    assert kwargs["environment"]["THAW_FUNCTION"] == "dev/echo"
    assert kwargs["read_only"] is True and "/tmp" in kwargs["tmpfs"]
    assert kwargs["security_opt"] == ["no-new-privileges"]
    assert kwargs["labels"]["thaw.instance"] == "i1" and kwargs["labels"]["thaw.node"] == "n1"


def test_own_uids_where_the_memory_limit_still_applies(tmp_path: Path) -> None:
    assert runtime(tmp_path, "cuda").own_uids  # the host PID namespace: always
    host = runtime(tmp_path, "host")
    assert host.own_uids == can_limit_other_uids()
    uid = host._allocate_uid()
    assert uid == (UID_BASE if host.own_uids else os.getuid())
    if host.own_uids:
        assert host._allocate_uid() != uid


def test_memory_limits(tmp_path: Path) -> None:
    rt = runtime(tmp_path, "host")
    assert rt._memory_limit("fresh", 256 << 20, None) == BASE_MEMORY_BYTES + (256 << 20)
    assert rt._memory_limit("fresh", 0, None) == rt.default_memory_bytes
    # A template's container holds its instances too.
    assert rt._memory_limit("template", 256 << 20, None) == (
        rt.template_instances * (BASE_MEMORY_BYTES + (256 << 20)))
    assert rt._memory_limit("template", 256 << 20, 2) == 2 * (BASE_MEMORY_BYTES + (256 << 20))


def test_fingerprint_is_the_image_python(tmp_path: Path) -> None:
    assert runtime(tmp_path, "host").fingerprint() == {"python": "3.11.2"}


def test_engine_exit_codes_read_like_subprocess() -> None:
    assert exit_code_from_engine(0) == 0
    assert exit_code_from_engine(3) == 3
    assert exit_code_from_engine(128 + signal.SIGSEGV) == -signal.SIGSEGV
    assert exit_code_from_engine(137) == -signal.SIGKILL


def test_host_pid_of_a_child_in_our_own_namespace() -> None:
    child = subprocess.Popen(["sleep", "5"])
    try:
        # Same namespace: the child's namespace pid is its host pid.
        assert host_pid_of(os.getpid(), child.pid) == child.pid
        assert host_pid_of(os.getpid(), 0) is None
    finally:
        child.kill()
        child.wait()


@pytest.mark.docker
def test_containers_of_a_dead_agent_are_removed(docker_client: Any, base_image: str,
                                                tmp_path: Path) -> None:
    import docker.errors

    node = f"stale-{uuid.uuid4().hex[:8]}"
    dead = subprocess.Popen(["true"])
    dead.wait()
    labels = {"thaw.node": node, "thaw.agent_pid": str(dead.pid)}
    alive = {"thaw.node": node, "thaw.agent_pid": str(os.getpid())}
    made = [docker_client.containers.create(base_image, ["true"], labels=lbl,
                                            network_mode="none")
            for lbl in (labels, alive)]
    try:
        rt = DockerRuntime(docker_client, image=base_image, node_id=node,
                           state_dir=tmp_path)
        assert rt.remove_stale_containers() == 1
        left = docker_client.containers.list(all=True, filters={"label": f"thaw.node={node}"})
        assert [c.id for c in left] == [made[1].id]  # a live agent's are kept
    finally:
        for c in made:
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)

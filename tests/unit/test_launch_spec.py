"""The Runtime interface without an engine: LaunchSpecs as the agent builds them, the
docker container spec derived from one (a pure function), both runtimes against the
protocol, and the instance lifecycle refusing an edge it does not have."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from thaw.platform.docker import DockerRuntime
from thaw.platform.docker.spec import (
    BASE_MEMORY_BYTES,
    PUBLIC_NAMES_MOUNT,
    RUNTIME_MOUNT,
    SNAPSHOT_FD,
    STATUS_DIR,
    ContainerLayout,
    ContainerSettings,
    container_kwargs,
    container_mounts,
    socket_dir,
)
from thaw.platform.instances import IllegalInstanceTransition, Instance, InstanceState
from thaw.platform.launch import build_spec, fresh_spec, template_spec
from thaw.platform.process import ProcessRuntime
from thaw.platform.runtime import (
    Exited,
    LaunchMode,
    LaunchSpec,
    Limits,
    MemoryLimitHit,
    MountKind,
    Runtime,
    SandboxPolicy,
    SliceGrant,
    exit_event,
)
from thaw.proto import agent_pb2
from thaw.snapshotter.runtime.events import ExitCode

SPEC = agent_pb2.FunctionSpec(tenant="acme", name="embed", version="3", handler="app:Embed",
                              memory_limit_bytes=256 << 20, max_batch_size=4,
                              max_batch_wait_ms=2.5)
SETTINGS = ContainerSettings(image="thaw/base:test", node_id="n1", agent_id="a1",
                             agent_pid=4242, env={"THAW_NODE": "n1"},
                             env_site_packages=("/venv/site-packages",))
LAYOUT = ContainerLayout(name="c1", uid=200_007, status_dir="/state/c1/ctl",
                         log_dir="/home/logs", log_private="/home/logs/.containers/c1",
                         run_dir="/dev/shm/run", run_private="/state/c1/run")


def fresh() -> LaunchSpec:
    return fresh_spec(SPEC, Path("/home/bundles/b1"), instance_id="i1",
                      socket="/dev/shm/run/i1.sock", log_path="/home/logs/i1.log",
                      grant=SliceGrant("s1", "host:0", 1 << 30))


def test_the_agents_fresh_spec_carries_the_function() -> None:
    spec = fresh()
    assert spec.mode is LaunchMode.FRESH and spec.function == "acme/embed"
    assert spec.env["THAW_FUNCTION"] == "acme/embed" and spec.env["THAW_MAX_BATCH_SIZE"] == "4"
    assert spec.limits == Limits(memory_bytes=256 << 20)
    assert spec.slice == SliceGrant("s1", "host:0", 1 << 30)
    assert spec.command() == ["fresh", "--bundle", "/home/bundles/b1", "--handler",
                              "app:Embed", "--socket", "/dev/shm/run/i1.sock"]
    assert {(m.path, m.kind) for m in spec.mounts()} == {
        ("/home/bundles/b1", MountKind.BUNDLE), ("/dev/shm/run/i1.sock", MountKind.SOCKET)}


def test_a_template_spec_names_no_function_and_a_build_its_version() -> None:
    template = template_spec(SPEC, Path("/b"), key="k" * 24, snapshot_json='{"modules":[]}',
                             control="/dev/shm/run/t.sock", log_path="/home/logs/t.log")
    assert template.function == "" and "THAW_FUNCTION" not in template.env
    # The snapshot.json travels as its text (each runtime hands it over as a
    # descriptor): the command line names no file of the snapshot store.
    assert template.snapshot is not None
    assert template.snapshot.snapshot_json == '{"modules":[]}'
    assert template.command()[-2:] == ["--control", "/dev/shm/run/t.sock"]
    assert "--snapshot-json" not in template.command()
    build = build_spec(SPEC, Path("/b"), out=Path("/home/builds/x"), log_path="/l/b.log")
    assert build.command()[-4:] == ["--out", "/home/builds/x", "--function-version", "3"]
    assert build.instance_id == "x"
    assert [m.kind for m in build.mounts()] == [MountKind.BUNDLE, MountKind.OUTPUT]


def test_container_spec_from_a_launch_spec() -> None:
    spec = fresh()
    kwargs = container_kwargs(spec, SETTINGS, LAYOUT)
    assert kwargs["image"] == "thaw/base:test" and kwargs["name"] == "c1"
    assert kwargs["user"] == "200007:200007" and kwargs["working_dir"] == "/home/bundles/b1"
    env = kwargs["environment"]
    assert env["THAW_FUNCTION"] == "acme/embed" and env["THAW_NODE"] == "n1"
    assert env["PYTHONPATH"].split(":") == ["/opt/thaw", "/venv/site-packages"]
    assert kwargs["mem_limit"] == BASE_MEMORY_BYTES + (256 << 20)
    assert kwargs["network_mode"] == "none" and kwargs["cap_drop"] == ["ALL"]
    assert kwargs["read_only"] is True and kwargs["security_opt"] == ["no-new-privileges"]
    assert kwargs["labels"]["thaw.instance"] == "i1" and kwargs["labels"]["thaw.mode"] == "fresh"
    assert "device_requests" not in kwargs and "pid_mode" not in kwargs
    [shell] = [part for part in kwargs["command"] if "exec" in part]
    assert "--socket /dev/shm/run/i1.sock" in shell and ">>/home/logs/i1.log" in shell
    mounts = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in kwargs["mounts"]}
    assert mounts["/home/bundles/b1"] == ("/home/bundles/b1", True)
    assert mounts[RUNTIME_MOUNT][1] is True and mounts[STATUS_DIR] == ("/state/c1/ctl", True)
    assert mounts["/home/logs"] == ("/home/logs/.containers/c1", False)
    # Sockets through the container's private folder, never the shared one.
    assert mounts["/dev/shm/run"] == ("/state/c1/run", False)
    assert "/dev/shm/run/i1.sock" not in mounts


def test_container_spec_follows_the_sandbox_and_limits_of_the_spec() -> None:
    from dataclasses import replace

    spec = replace(fresh(), sandbox=SandboxPolicy(network="egress", read_only_rootfs=False,
                                                  cap_drop=("NET_RAW",)),
                   limits=Limits(memory_bytes=0, pids=64), image="repo:1@sha256:abc",
                   secrets={"HF_TOKEN": "s3cret"})
    kwargs = container_kwargs(spec, SETTINGS, LAYOUT)
    # egress: the engine's bridge (from which the host's loopback is out of reach).
    assert kwargs["network_mode"] == "bridge" and kwargs["read_only"] is False
    assert container_kwargs(fresh(), SETTINGS, LAYOUT)["network_mode"] == "none"
    assert kwargs["cap_drop"] == ["NET_RAW"] and kwargs["pids_limit"] == 64
    assert kwargs["mem_limit"] == SETTINGS.default_memory_bytes
    assert kwargs["image"] == "sha256:abc"
    assert kwargs["environment"]["HF_TOKEN"] == "s3cret"
    # An image function's packages are its image's: no host site-packages.
    assert kwargs["environment"]["PYTHONPATH"] == "/opt/thaw"
    assert "/venv/site-packages" not in {m["Target"] for m in kwargs["mounts"]}


def test_template_containers_get_no_snapshot_files() -> None:
    spec = template_spec(SPEC, Path("/b"), key="k" * 24, snapshot_json='{"modules":[]}',
                         control="/dev/shm/run/t.sock", log_path="/home/logs/t.log")
    layout = LAYOUT
    mounts = {m.target: m for m in container_mounts(spec, layout, SETTINGS)}
    # Only the runtime (and the thaw package's file beside it), the status folder, the
    # bundle, the log and socket folders.
    assert set(mounts) == {RUNTIME_MOUNT, PUBLIC_NAMES_MOUNT, STATUS_DIR, "/b", "/home/logs",
                           "/dev/shm/run", "/venv/site-packages"}
    kwargs = container_kwargs(spec, SETTINGS, layout)
    [shell] = [part for part in kwargs["command"] if "exec" in part]
    # The shell opens the template's own copy of its snapshot.json (in its private
    # status folder) on SNAPSHOT_FD.
    assert f"--snapshot-fd {SNAPSHOT_FD}" in shell
    assert f"{SNAPSHOT_FD}<{STATUS_DIR}/snapshot.json" in shell
    assert kwargs["mem_limit"] == SETTINGS.template_instances * (BASE_MEMORY_BYTES + (256 << 20))


def test_cuda_containers_get_the_gpus_the_spec_names() -> None:
    from dataclasses import replace

    from thaw.platform.runtime import DeviceRequest

    cuda = replace(SETTINGS, device="cuda", mps_pipe_directory="/tmp/mps")
    kwargs = container_kwargs(replace(fresh(), device=DeviceRequest(("GPU-1",))), cuda, LAYOUT)
    [request] = kwargs["device_requests"]
    assert request["DeviceIDs"] == ["GPU-1"] and kwargs["pid_mode"] == "host"
    assert kwargs["ipc_mode"] == "host"
    assert kwargs["environment"]["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/mps"
    assert "/tmp/mps" in {m["Target"] for m in kwargs["mounts"]}


def test_sockets_of_one_instance_in_two_folders_are_refused() -> None:
    from dataclasses import replace

    spec = replace(fresh(), control="/elsewhere/t.sock")
    with pytest.raises(ValueError, match="several folders"):
        socket_dir(spec)
    assert socket_dir(fresh()) == "/dev/shm/run"


def test_the_runtime_command_line_reads_back_into_the_same_spec() -> None:
    spec = fresh()
    again = LaunchSpec.from_runtime_args(
        "fresh", spec.command()[1:], spec.log_path, cwd=spec.cwd, env=spec.env,
        instance_id="i1", memory_limit_bytes=256 << 20)
    assert again.command() == spec.command() and again.mounts() == spec.mounts()
    assert again.limits == spec.limits and dict(again.env) == dict(spec.env)


class FakeImage:
    attrs: dict[str, dict[str, dict[str, str]]] = {"Config": {"Labels": {}}}


class FakeImages:
    def get(self, tag: str) -> FakeImage:
        return FakeImage()


class FakeClient:
    images = FakeImages()


def test_both_runtimes_satisfy_the_protocol(tmp_path: Path) -> None:
    process: Runtime = ProcessRuntime()
    docker: Runtime = DockerRuntime(FakeClient(), image="thaw/base:test", node_id="n1",
                                    state_dir=tmp_path)
    for runtime in (process, docker):
        assert isinstance(runtime, Runtime)
    assert not process.capabilities.runs_images and docker.capabilities.runs_images
    assert docker.capabilities.template_per_tenant
    assert not process.capabilities.template_per_tenant


def test_exits_read_as_typed_events() -> None:
    assert exit_event(0) == Exited("exit code 0", 0)
    assert exit_event(-9) == Exited("killed by SIGKILL", -9)
    oom = exit_event(int(ExitCode.OUT_OF_MEMORY))
    assert isinstance(oom, MemoryLimitHit) and oom.code == ExitCode.OUT_OF_MEMORY


def make_instance(state: InstanceState) -> Instance:
    return Instance(id="i1", function="t/f", version="1", socket="/x", max_concurrency=1,
                    timeout=1.0, state=state)


def test_an_illegal_instance_move_is_refused_and_logged() -> None:
    inst = make_instance(InstanceState.DEFUNCT)
    with capture_logs() as logs, pytest.raises(IllegalInstanceTransition):
        inst.move(InstanceState.READY)
    assert inst.state is InstanceState.DEFUNCT
    assert [entry["event"] for entry in logs] == ["illegal instance transition refused"]
    assert logs[0]["log_level"] == logging.getLevelName(logging.WARNING).lower()


def test_instance_state_changes_only_by_move() -> None:
    inst = make_instance(InstanceState.STARTING)
    with pytest.raises(AttributeError):
        inst.state = InstanceState.READY
    inst.move(InstanceState.READY)
    assert inst.state is InstanceState.READY and not inst.ended
    inst.move(InstanceState.DRAINING)
    inst.move(InstanceState.DEFUNCT)
    assert inst.ended

"""An instance on the process runtime gets exactly its LaunchSpec's environment over a
short base (PATH, libraries, locale, a home of its own), nothing of the agent's: no
internal address, token or key reaches tenant code."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from thaw.platform.process import INHERITED_ENV, INSTANCE_DEFAULT_ENV, ProcessRuntime
from thaw.platform.runtime import LaunchSpec, SandboxPolicy
from thaw.platform.sandbox.areas import make_readable
from thaw.platform.sandbox.plan import SandboxSettings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALLOWED = set(INHERITED_ENV) | set(INSTANCE_DEFAULT_ENV)


SANDBOXED = pytest.param(True, marks=[
    pytest.mark.sandbox,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel sandboxes need root")],
    id="sandboxed")


@pytest.mark.parametrize("sandboxed", [pytest.param(False, id="plain"), SANDBOXED])
async def test_an_instance_sees_only_its_launch_spec_and_the_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandboxed: bool) -> None:
    # What an agent's environment may hold; none of it may reach the instance.
    monkeypatch.setenv("THAW_SCHEDULER_ADDRESS", "127.0.0.1:7070")
    monkeypatch.setenv("THAW_API_KEY", "thaw_secret_operator_key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-tenants")
    bundle = tmp_path / "bundle"
    shutil.copytree(EXAMPLES / "echo", bundle)
    area = tmp_path / "area"
    area.mkdir()
    sock = str(area / "i1.sock")
    spec = LaunchSpec.from_runtime_args(
        "fresh", ["--bundle", str(bundle), "--handler", "app:Echo", "--socket", sock],
        str(tmp_path / "i1.log"), cwd=str(bundle),
        env={"THAW_FUNCTION": "t/echo", "GREETING": "hi"}, instance_id="i1")
    runtime = ProcessRuntime()
    if sandboxed:
        os.chown(area, 200_950, 200_950)
        make_readable(bundle)
        spec = dataclasses.replace(spec, sandbox=SandboxPolicy(
            uid=200_950, gid=200_950, writable=(str(area),)))
        runtime = ProcessRuntime(sandbox=SandboxSettings())
    proc = await runtime.launch(spec)
    try:
        event = await proc.next_event(60)
        assert event["event"] == "ready", event
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
        environ = dict(item.split("=", 1) for item in raw.decode().split("\0") if item)
    finally:
        os.killpg(proc.pid, 9)
        await asyncio.wait_for(proc.proc.wait(), 10)
    assert set(environ) - ALLOWED == {"THAW_FUNCTION", "GREETING"}, sorted(environ)
    assert environ["GREETING"] == "hi" and environ["HOME"] == "/tmp"
    assert "thaw_secret_operator_key" not in raw.decode()
    assert os.environ["PATH"] == environ["PATH"]


# What a container's environment holds besides its LaunchSpec's: where the runtime's
# code is, and the same home and locale as a process instance.
CONTAINER_BASE = {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "HOME", "USER", "LANG"}


def test_a_container_gets_the_same_environment_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from thaw.platform.docker.spec import ContainerLayout, ContainerSettings, container_kwargs

    monkeypatch.setenv("THAW_SCHEDULER_ADDRESS", "127.0.0.1:7070")
    monkeypatch.setenv("THAW_API_KEY", "thaw_secret_operator_key")
    spec = LaunchSpec.from_runtime_args(
        "fresh", ["--bundle", "/b", "--handler", "app:Echo", "--socket", "/run/1/i1.sock"],
        "/logs/1/i1.log", env={"THAW_FUNCTION": "t/echo", "GREETING": "hi"},
        instance_id="i1")
    settings = ContainerSettings(image="thaw/base:test", node_id="n1", agent_id="a1",
                                 agent_pid=4242)
    layout = ContainerLayout(name="c1", uid=200_007, status_dir="/state/c1/ctl",
                             log_dir="/logs/1", log_private="/logs/1/.containers/c1",
                             run_dir="/run/1", run_private="/state/c1/run")
    kwargs = container_kwargs(spec, settings, layout)
    environment = kwargs["environment"]
    assert set(environment) - CONTAINER_BASE == {"THAW_FUNCTION", "GREETING"}
    assert environment["HOME"] == "/tmp"
    assert "thaw_secret_operator_key" not in repr(kwargs)
    assert kwargs["user"] == "200007:200007" and kwargs["cap_drop"] == ["ALL"]
    assert kwargs["network_mode"] == "none" and kwargs["read_only"] is True

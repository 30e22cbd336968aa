"""A function's [env] and secrets on the node: in the environment of its builds, fresh
starts and restores (forked or not), never in a template's, a command line, a sandbox
plan or a repr; and out of the environment before a build's capture."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from thaw.platform.docker.spec import ContainerLayout, ContainerSettings, container_kwargs
from thaw.platform.launch import (
    build_spec,
    fresh_spec,
    restore_spec,
    spawn_request_for,
    template_build_request,
    template_spec,
)
from thaw.platform.runtime import BuildRequest, SandboxPolicy, SpawnRequest
from thaw.platform.sandbox.plan import SandboxSettings, build_plan, encode_plan
from thaw.proto import agent_pb2
from thaw.snapshotter.runtime import secretenv
from thaw.snapshotter.runtime.capture import capture

VALUE = "s3cr3t-value-7f1e"
SPEC = agent_pb2.FunctionSpec(tenant="acme", name="chat", version="2", handler="app:Chat",
                              env={"MODE": "fast"}, secrets={"API_TOKEN": VALUE},
                              memory_limit_bytes=64 << 20)
BUNDLE = Path("/bundles/abc")


def launches() -> dict[str, object]:
    return {
        "fresh": fresh_spec(SPEC, BUNDLE, instance_id="i1", socket="/run/i1.sock",
                            log_path="/logs/i1.log", grant=None),
        "build": build_spec(SPEC, BUNDLE, out=Path("/out/b1"), log_path="/logs/b1.log"),
        "restore": restore_spec(SPEC, BUNDLE, instance_id="i2", control="/run/r.sock",
                                log_path="/logs/i2.log", grant=None),
    }


def test_builds_fresh_starts_and_unforked_restores_get_env_and_secrets() -> None:
    for mode, launch in launches().items():
        env = launch.environment  # type: ignore[attr-defined]
        assert env["MODE"] == "fast" and env["API_TOKEN"] == VALUE, mode
        assert launch.secrets == {"API_TOKEN": VALUE}  # type: ignore[attr-defined]
        assert VALUE not in " ".join(launch.command()), mode  # type: ignore[attr-defined]
        assert VALUE not in repr(launch), mode
    build = launches()["build"]
    assert build.env[secretenv.SECRET_NAMES_ENV] == "API_TOKEN"  # type: ignore[attr-defined]


def test_a_template_gets_neither_env_nor_secrets() -> None:
    launch = template_spec(SPEC, BUNDLE, key="k" * 64, snapshot_json="{}",
                           control="/run/t.sock", log_path="/logs/t.log")
    assert "MODE" not in launch.environment and "API_TOKEN" not in launch.environment
    assert not launch.secrets


def test_the_sandbox_plan_and_the_container_never_name_a_value_on_a_command_line() -> None:
    launch = launches()["fresh"]
    sandboxed = launch.__class__(**{**launch.__dict__, "sandbox": SandboxPolicy(  # type: ignore[attr-defined]
        uid=200_001, gid=200_001)})
    plan = build_plan(sandboxed, SandboxSettings(), sys.executable, sandboxed.environment)
    assert VALUE not in json.dumps(plan) and VALUE not in encode_plan(plan)
    assert VALUE.encode().hex() not in encode_plan(plan)
    settings = ContainerSettings(image="thaw/base:test", node_id="n1", agent_id="a1",
                                 agent_pid=1, env={}, env_site_packages=())
    layout = ContainerLayout(name="c1", uid=200_007, status_dir="/s", log_dir="/l",
                             log_private="/l/p")
    kwargs = container_kwargs(launch, settings, layout)  # type: ignore[arg-type]
    assert kwargs["environment"]["API_TOKEN"] == VALUE  # the container's env: fine
    assert VALUE not in json.dumps(kwargs.get("command", []))
    assert VALUE not in json.dumps(kwargs.get("entrypoint", []))


def test_a_forked_restore_and_a_template_build_carry_them_in_their_request() -> None:
    request = spawn_request_for(SPEC, instance_id="i3", socket="/run/i3.sock",
                                log="/logs/i3.log", fds={"snapshot_json": 5, "pickle": 6})
    assert request.env["MODE"] == "fast" and request.secrets == {"API_TOKEN": VALUE}
    assert "THAW_MEMORY_LIMIT_BYTES" in request.env or request.env.get("MODE")
    assert VALUE not in repr(request)
    line, fds = request.to_message()
    back = SpawnRequest.from_message(line, fds)
    assert (back.env, back.secrets) == (request.env, request.secrets)
    with pytest.raises(ValueError, match="'secrets' must map"):
        SpawnRequest.from_message(line.replace(b'"secrets":{"API_TOKEN"',
                                               b'"secrets":{"X":1,"API_TOKEN"'), fds)
    build = template_build_request(SPEC, out="/out/b2", log="/logs/b2.log")
    assert VALUE not in repr(build)
    record = json.loads(json.dumps({"op": build.op, **build.__dict__}))
    again = BuildRequest.from_record(record)
    assert again.secrets == {"API_TOKEN": VALUE} and again.env == {"MODE": "fast"}


@pytest.fixture
def clean_environ() -> Iterator[None]:
    before = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


class Holder:
    def __init__(self) -> None:
        self.mode = os.environ["MODE"]


def test_secrets_leave_the_environment_before_a_capture(tmp_path: Path,
                                                        clean_environ: None) -> None:
    secretenv.apply({"MODE": "fast"}, {"API_TOKEN": VALUE}, before_capture=True)
    assert os.environ["API_TOKEN"] == VALUE
    assert os.environ[secretenv.SECRET_NAMES_ENV] == "API_TOKEN"
    capture(Holder(), tmp_path / "snap", modules=[], timings={})
    assert "API_TOKEN" not in os.environ and secretenv.SECRET_NAMES_ENV not in os.environ
    assert os.environ["MODE"] == "fast"
    for path in (tmp_path / "snap").iterdir():
        assert VALUE.encode() not in path.read_bytes(), path.name

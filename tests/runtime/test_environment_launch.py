"""An instance launched in a per-function environment (LaunchSpec.python_env) runs the
environment's interpreter, imports the environment's own `attrs` (a package the
platform uses, here a fake 0.0.1) and sees none of the platform's packages, with the
process runtime plain and sandboxed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from tests.wheels import fake_attrs_index
from thaw.platform.environments import Dependencies, node_python
from thaw.platform.environments_build import Environments, EnvSettings
from thaw.platform.process import ProcessRuntime
from thaw.platform.runtime import LaunchSpec, SandboxPolicy
from thaw.platform.sandbox.areas import make_readable
from thaw.platform.sandbox.plan import SandboxSettings

PROBE = '''import importlib.util
import sys

import attrs


class Probe:
    def setup(self):
        problems = []
        if attrs.__version__ != "0.0.1":
            problems.append(f"attrs {attrs.__version__} from {attrs.__file__}")
        for name in ("thaw.platform", "structlog", "grpc", "aiohttp"):
            if importlib.util.find_spec(name) is not None:
                problems.append(f"{name} is importable")
        if problems:
            raise RuntimeError("; ".join(problems) + f" (sys.path {sys.path})")

    def __call__(self, request):
        return {}
'''

SANDBOXED = pytest.param(True, marks=[
    pytest.mark.sandbox,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel sandboxes need root")],
    id="sandboxed")


@pytest.mark.parametrize("sandboxed", [pytest.param(False, id="plain"), SANDBOXED])
async def test_an_instance_runs_in_its_environment_and_sees_only_its_packages(
        tmp_path: Path, sandboxed: bool) -> None:
    tmp_path.chmod(0o755)
    index = fake_attrs_index(tmp_path / "index")
    envs = Environments(tmp_path / "envs", EnvSettings(index_url=str(index)),
                        ProcessRuntime().run_tool)
    lock = await envs.resolve(Dependencies(("attrs==0.0.1",), node_python(), "r"),
                              lambda _l: None)
    env = await envs.ensure(lock, node_python(), lambda _l: None)
    python_env = envs.python_env(env)

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "app.py").write_text(PROBE)
    (bundle / "thaw.toml").write_text('name = "probe"\nhandler = "app:Probe"\n')
    area = tmp_path / "area"
    area.mkdir()
    spec = dataclasses.replace(LaunchSpec.from_runtime_args(
        "fresh", ["--bundle", str(bundle), "--handler", "app:Probe", "--socket",
                  str(area / "i1.sock")], str(area / "i1.log"), cwd=str(bundle),
        instance_id="i1"), python_env=python_env)
    runtime = ProcessRuntime()
    if sandboxed:
        os.chown(area, 200_951, 200_951)
        make_readable(bundle)
        spec = dataclasses.replace(spec, sandbox=SandboxPolicy(
            uid=200_951, gid=200_951, writable=(str(area),)))
        runtime = ProcessRuntime(sandbox=SandboxSettings())
    proc = await runtime.launch(spec)
    try:
        event = await proc.next_event(60)
        assert event["event"] == "ready", (event, (area / "i1.log").read_text())
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    finally:
        os.killpg(proc.pid, 9)
        await asyncio.wait_for(proc.proc.wait(), 10)
    assert str(env.path / "bin" / "python").encode() in argv

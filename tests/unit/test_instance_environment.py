"""An instance on the process runtime gets exactly its LaunchSpec's environment over a
short base (PATH, libraries, locale, a home of its own), nothing of the agent's: no
internal address, token or key reaches tenant code."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from thaw.platform.process import INHERITED_ENV, INSTANCE_DEFAULT_ENV, ProcessRuntime
from thaw.platform.runtime import LaunchSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALLOWED = set(INHERITED_ENV) | set(INSTANCE_DEFAULT_ENV)


async def test_an_instance_sees_only_its_launch_spec_and_the_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What an agent's environment may hold; none of it may reach the instance.
    monkeypatch.setenv("THAW_SCHEDULER_ADDRESS", "127.0.0.1:7070")
    monkeypatch.setenv("THAW_API_KEY", "thaw_secret_operator_key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-tenants")
    bundle = tmp_path / "bundle"
    shutil.copytree(EXAMPLES / "echo", bundle)
    sock = str(tmp_path / "i1.sock")
    spec = LaunchSpec.from_runtime_args(
        "fresh", ["--bundle", str(bundle), "--handler", "app:Echo", "--socket", sock],
        str(tmp_path / "i1.log"), cwd=str(bundle),
        env={"THAW_FUNCTION": "t/echo", "GREETING": "hi"}, instance_id="i1")
    runtime = ProcessRuntime()
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

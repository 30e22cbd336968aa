"""A build's current step end to end (docs/environments.md, "Build steps"): while a
version builds, the node's heartbeats carry its step to the scheduler and the API shows
it as `build_step` on the function and on its latest build, `thaw fn show` prints it,
and once the build is over (ready or failed) no step is left; a failed build keeps its
message."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import RunningPlatform
from tests.ops.test_cli import cli_env, thaw

# Heartbeats (every 2 s) carry the steps: a step shows within a few of them.
STEP_WAIT = 60.0

GATED = '''import os
import time

GATE = {gate!r}


class Gated:
    def setup(self):
        # Holds the build in "running setup()" until the test opens the gate.
        while not os.path.exists(GATE):
            time.sleep(0.05)
        if os.path.exists(GATE + ".fail"):
            raise RuntimeError("setup refused on purpose")

    def __call__(self, request):
        return {{"ok": True}}
'''


def gated(folder: Path, name: str, gate: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thaw.toml").write_text(f'name = "{name}"\nhandler = "app:Gated"\n')
    (folder / "app.py").write_text(GATED.format(gate=str(gate)))
    return folder


def until(platform: RunningPlatform, name: str, what: str, check: Any) -> dict[str, Any]:
    deadline = time.monotonic() + STEP_WAIT
    while True:
        doc: dict[str, Any] = platform.http.get(f"/v1/functions/{name}").json()
        if check(doc):
            return doc
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {doc}"
        time.sleep(0.2)


def test_the_build_step_shows_while_building_and_goes_when_done(
        platform: RunningPlatform, exchange: Path, tmp_path: Path) -> None:
    gate = exchange / f"gate-{uuid.uuid4().hex[:8]}"
    name = f"steps-{uuid.uuid4().hex[:6]}"
    reply = platform.deploy(gated(tmp_path / "fn", name, gate), wait=False)
    assert reply.status_code == 201, reply.text

    doc = until(platform, name, "the setup step",
                lambda d: "running setup()" in (d.get("build_step") or ""))
    assert doc["state"] == "building" and doc["latest_build"]["state"] == "building", doc
    assert doc["latest_build"]["build_step"] == doc["build_step"], doc
    assert doc["build_progress"] is None, doc  # setup has no measure
    versions = platform.http.get(f"/v1/functions/{name}/versions").json()["versions"]
    assert "running setup()" in versions[0]["build_step"], versions

    shown = thaw(cli_env(tmp_path, platform.url, platform.key), "fn", "show", name)
    assert shown.returncode == 0, shown.stderr
    version = doc["latest_build"]["version"]
    assert f"building v{version}: running setup()" in shown.stdout, shown.stdout

    gate.write_text("open")
    done = until(platform, name, "the build's end", lambda d: d["state"] != "building")
    assert done["state"] == "ready", done
    assert done["build_step"] is None and done["latest_build"]["build_step"] is None, done
    shown = thaw(cli_env(tmp_path, platform.url, platform.key), "fn", "show", name)
    assert "building" not in shown.stdout, shown.stdout


def test_a_failed_build_keeps_its_message_and_no_step(
        platform: RunningPlatform, exchange: Path, tmp_path: Path) -> None:
    gate = exchange / f"gate-{uuid.uuid4().hex[:8]}"
    name = f"steps-fail-{uuid.uuid4().hex[:6]}"
    reply = platform.deploy(gated(tmp_path / "fn", name, gate), wait=False)
    assert reply.status_code == 201, reply.text
    until(platform, name, "the setup step",
          lambda d: "running setup()" in (d.get("build_step") or ""))
    Path(str(gate) + ".fail").write_text("fail")
    gate.write_text("open")
    done = until(platform, name, "the failure", lambda d: d["state"] != "building")
    assert done["state"] == "failed", done
    assert "setup refused on purpose" in done["reason"], done
    assert done["latest_build"]["reason"] == done["reason"], done
    assert done["build_step"] is None and done["build_progress"] is None, done

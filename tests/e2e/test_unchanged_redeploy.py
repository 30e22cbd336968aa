"""An unchanged redeploy on the real platform: `thaw deploy` of the same folder (every
file touched since) packs to the same bytes, the gateway answers 200 "unchanged" with
the serving version, and nothing is built: no new version, no new snapshot, no
version switch, and the warm instance keeps serving. A change to thaw.toml alone is a
new version."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tests.conftest import EXAMPLES, RunningPlatform
from tests.ops.test_cli import cli_env, thaw

NAME = "echo-unchanged"  # the platform fixture is shared: a name only this test uses


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "echo-unchanged"
    shutil.copytree(EXAMPLES / "echo", folder, ignore=shutil.ignore_patterns("__pycache__"))
    toml = folder / "thaw.toml"
    text = toml.read_text()
    assert 'name = "echo"' in text
    toml.write_text(text.replace('name = "echo"', f'name = "{NAME}"'))
    return folder


def _touch_all(folder: Path) -> None:
    later = time.time() + 120
    for here, _dirs, files in os.walk(folder):
        for name in files:
            os.utime(os.path.join(here, name), (later, later))


def _activations(platform: RunningPlatform) -> list[dict[str, object]]:
    events = platform.http.get("/v1/events", params={"kind": "version_activated"}).json()
    return [e for e in events["events"] if e["function"] == f"dev/{NAME}"]


def test_an_unchanged_redeploy_keeps_its_version_and_builds_nothing(
        platform: RunningPlatform, tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    first = platform.deploy(folder, force=False)
    assert first.status_code == 201, first.text
    fn = first.json()
    assert fn["state"] == "ready" and fn["unchanged"] is False, fn
    version, digest = fn["version"], fn["bundle_digest"]
    answer = platform.invoke(NAME, {"n": 1})
    assert answer.status_code == 200, answer.text
    snapshots = platform.http.get(f"/v1/functions/{NAME}/versions").json()["versions"]
    assert len(snapshots) == 1 and len(_activations(platform)) == 1

    _touch_all(folder)
    env = cli_env(tmp_path, platform.url, platform.key)
    result = thaw(env, "deploy", str(folder))
    assert result.returncode == 0, result.stderr
    assert f"unchanged, version {version} kept" in result.stdout, result.stdout
    assert "nothing to build" in result.stderr and "built in" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith(f"/fn/dev/{NAME}")

    again = platform.deploy(folder, force=False)
    assert again.status_code == 200, again.text
    assert again.json()["unchanged"] is True
    assert (again.json()["version"], again.json()["bundle_digest"]) == (version, digest)
    # Nothing was built: one version, one snapshot, one switch; the warm instance
    # (not a restore) answers.
    listed = platform.http.get(f"/v1/functions/{NAME}/versions").json()["versions"]
    assert [(v["version"], v["active"]) for v in listed] == [(int(version), True)]
    assert len(_activations(platform)) == 1
    warm = platform.invoke(NAME, {"n": 2})
    assert warm.status_code == 200 and warm.headers["X-Thaw-Start"] == "warm"

    toml = folder / "thaw.toml"
    toml.write_text(toml.read_text() + '\n[env]\nGREETING = "hello"\n')
    changed = platform.deploy(folder, force=False)
    assert changed.status_code == 201, changed.text
    assert changed.json()["unchanged"] is False
    assert int(changed.json()["version"]) == int(version) + 1
    assert len(_activations(platform)) == 2

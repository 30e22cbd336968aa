"""Immutable versions on the real platform: continuous invocations from a few threads
while v2 is deployed (its snapshot builds while v1 serves) and while the function is
rolled back to v1: no request fails, each answer comes from exactly one version (its
body and its X-Thaw-Version header agree), and once a switch has returned only the
version switched to answers."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from click.testing import CliRunner

from tests.conftest import FIXTURES, RunningPlatform
from tests.scheduler.harness import wait_until
from thaw.ops.cli import cli

NAME = "versioned-e2e"  # the platform fixture is shared: a name only this test uses
V1, V2 = FIXTURES / "versioned_v1", FIXTURES / "versioned_v2"
THREADS = 3
# Answers to see after each switch before the next step (each takes ~10 ms).
ANSWERS_AFTER_SWITCH = 30


@dataclass(frozen=True)
class Answer:
    started: float
    status: int
    body_version: str
    header_version: str
    error: str = ""


class Caller:
    """Threads invoking the function back to back until stopped."""

    def __init__(self, platform: RunningPlatform) -> None:
        self.platform = platform
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(THREADS)]

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.platform.key}"}
        with httpx.Client(base_url=self.platform.url, headers=headers, timeout=120) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    resp = http.post(f"/fn/dev/{NAME}", json={})
                    body = resp.json() if resp.status_code == 200 else {}
                    answer = Answer(started, resp.status_code, body.get("version", ""),
                                    resp.headers.get("X-Thaw-Version", ""),
                                    "" if resp.status_code == 200 else resp.text[:300])
                except httpx.HTTPError as exc:
                    answer = Answer(started, 0, "", "", repr(exc))
                with self._lock:
                    self.answers.append(answer)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        with self._lock:
            return list(self.answers)

    def count_since(self, since: float) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.started > since)


def test_deploy_and_rollback_under_load_fail_no_request(platform: RunningPlatform) -> None:
    first = platform.deploy(V1)
    assert first.status_code == 201, first.text
    assert first.json()["state"] == "ready", first.json()
    v1 = int(first.json()["version"])

    caller = Caller(platform)
    caller.start()
    try:
        wait_until(lambda: caller.count_since(0) >= 10, "first answers", timeout=60)
        deploy_began = time.monotonic()
        second = platform.deploy(V2)  # waits for the build and the switch
        deployed = time.monotonic()
        assert second.status_code == 201, second.text
        fn = second.json()
        v2 = int(fn["version"])
        assert v2 > v1 and fn["state"] == "ready" and fn["active_version"] == v2, fn
        assert fn["latest_build"]["version"] == v2 and fn["latest_build"]["active"], fn
        wait_until(lambda: caller.count_since(deployed) >= ANSWERS_AFTER_SWITCH,
                   "answers after the deploy", timeout=60)

        listed = platform.http.get(f"/v1/functions/{NAME}/versions").json()
        assert listed["active_version"] == v2
        assert [(v["version"], v["state"], v["active"]) for v in listed["versions"]] == [
            (v2, "ready", True), (v1, "ready", False)]
        assert listed["versions"][1]["snapshot"] == "ready"  # kept for a rollback

        rollback_began = time.monotonic()
        back = platform.http.post(f"/v1/functions/{NAME}/rollback", json={"version": v1})
        rolled = time.monotonic()
        assert back.status_code == 200, back.text
        assert back.json()["version"] == v1 and back.json()["rebuilt"] is False, back.json()
        wait_until(lambda: caller.count_since(rolled) >= ANSWERS_AFTER_SWITCH,
                   "answers after the rollback", timeout=60)
    finally:
        answers = caller.stop()

    failed = [a for a in answers if a.status != 200]
    assert not failed, failed[:5]
    numbers = {"v1": str(v1), "v2": str(v2)}
    # Each answer from exactly one version: what the handler says is what the header says.
    mismatched = [a for a in answers if numbers.get(a.body_version) != a.header_version]
    assert not mismatched, mismatched[:5]

    during_build = [a.body_version for a in answers if deploy_began < a.started < deployed]
    assert "v1" in during_build  # v1 served while v2's snapshot was being built
    between = {a.body_version for a in answers if deployed < a.started < rollback_began}
    assert between == {"v2"}
    after = {a.body_version for a in answers if a.started > rolled}
    assert after == {"v1"}


def test_rollback_input_errors_name_the_version(platform: RunningPlatform) -> None:
    resp = platform.deploy(V1)
    assert resp.status_code == 201, resp.text
    path = f"/v1/functions/{NAME}/rollback"
    bad = platform.http.post(path, json={"version": "two"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "version", bad.text
    zero = platform.http.post(path, json={"version": 0})
    assert zero.status_code == 400 and zero.json()["error"]["field"] == "version"
    unknown = platform.http.post(path, json={"version": 9999})
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "version"
    missing = platform.http.post("/v1/functions/no-such-function/rollback")
    assert missing.status_code == 404
    assert platform.http.get("/v1/functions/no-such-function/versions").status_code == 404


def test_the_cli_lists_versions_and_rolls_back(platform: RunningPlatform,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_URL", platform.url)
    monkeypatch.setenv("THAW_API_KEY", platform.key)
    monkeypatch.delenv("THAW_PROFILE", raising=False)
    for folder in (V1, V2):
        assert platform.deploy(folder).status_code == 201
    runner = CliRunner()
    listed = runner.invoke(cli, ["fn", "versions", NAME, "--json"])
    assert listed.exit_code == 0, listed.output
    versions = json.loads(listed.output)
    active, previous = versions[0]["version"], versions[1]["version"]
    assert versions[0]["active"] and not versions[1]["active"]
    table = runner.invoke(cli, ["fn", "versions", NAME])
    assert table.exit_code == 0 and "snapshot bytes" in table.output, table.output

    back = runner.invoke(cli, ["fn", "rollback", NAME])  # the previous ready version
    assert back.exit_code == 0, back.output
    assert f"v{previous}" in back.output
    assert platform.invoke(NAME).headers["X-Thaw-Version"] == str(previous)
    forward = runner.invoke(cli, ["fn", "rollback", NAME, str(active)])
    assert forward.exit_code == 0, forward.output
    assert platform.invoke(NAME).json() == {"version": "v2"}

    unknown = runner.invoke(cli, ["fn", "rollback", NAME, "99999"])
    # (the `thaw` entry point prints a ThawError as one line; CliRunner keeps it raised)
    assert unknown.exit_code == 1
    assert "no version 99999" in f"{unknown.output}{unknown.exception}", unknown.output

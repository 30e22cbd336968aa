"""`thaw invoke --async` and `thaw inv get/ls/cancel/result`, the real CLI as a
subprocess against the session's running platform: ids and URLs printed, status,
timings and results shown, raw answers to stdout, errors as one line with exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningPlatform
from tests.gateway.conftest import BUNDLES, deploy_once, wait_for_file
from tests.ops.test_cli import CLI_TIMEOUT, cli_env, thaw

# Bounds the wait for an invocation to finish; they finish in well under a second.
FINISH_SECONDS = 60.0


@pytest.fixture
def env(platform: RunningPlatform, tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path, platform.url, platform.key)


@pytest.fixture
def jobs(platform: RunningPlatform) -> str:
    return deploy_once(platform, BUNDLES / "jobs")


def submit(env: dict[str, str], name: str, body: dict[str, Any]) -> tuple[str, str]:
    result = thaw(env, "invoke", name, "--async", "-d", json.dumps(body))
    assert result.returncode == 0, result.stderr
    invocation_id, url = result.stdout.strip().splitlines()
    return invocation_id, url


def finished(env: dict[str, str], invocation_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + FINISH_SECONDS
    while True:
        result = thaw(env, "inv", "get", invocation_id, "--json")
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        if doc["status"] not in ("queued", "running"):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)


def one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_invoke_async_then_get_ls_and_result(env: dict[str, str], jobs: str,
                                             platform: RunningPlatform) -> None:
    invocation_id, url = submit(env, jobs, {"value": "cli"})
    assert invocation_id.startswith("inv_")
    assert url == f"{platform.url}/v1/invocations/{invocation_id}"
    doc = finished(env, invocation_id)
    assert doc["status"] == "succeeded" and doc["result"] == {"calls": 0, "value": "cli"}

    shown = thaw(env, "inv", "get", invocation_id)
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines()
                  if line and line[0].isalpha())
    assert fields["id"] == invocation_id and fields["function"] == jobs
    assert fields["status"] == "succeeded" and fields["priority"] == "50"
    assert fields["ran"].endswith("s") and fields["answer"].startswith("200 application/json")
    assert '"value": "cli"' in shown.stdout  # the result, inline

    raw = thaw(env, "inv", "result", invocation_id)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout) == {"calls": 0, "value": "cli"}

    listed = thaw(env, "inv", "ls", "--json", "--function", jobs)
    assert listed.returncode == 0, listed.stderr
    assert invocation_id in [i["id"] for i in json.loads(listed.stdout)]
    table = thaw(env, "inv", "ls", "--status", "succeeded")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if invocation_id in line)
    assert jobs in row and "succeeded" in row
    queued = thaw(env, "inv", "ls", "--status", "queued", "--json")
    assert invocation_id not in [i["id"] for i in json.loads(queued.stdout)]


def test_result_prints_raw_bytes(platform: RunningPlatform, env: dict[str, str]) -> None:
    probe = deploy_once(platform, BUNDLES / "probe")
    raw = os.urandom(5000)
    resp = platform.http.post(f"/fn/dev/{probe}/bytes", content=raw,
                              headers={"Prefer": "respond-async",
                                       "Content-Type": "application/octet-stream"})
    assert resp.status_code == 202, resp.text
    out = subprocess.run([sys.executable, "-m", "thaw.ops", "inv", "result",
                          resp.json()["id"]], env=env, capture_output=True,
                         timeout=CLI_TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == raw[::-1]
    shown = thaw(env, "inv", "get", resp.json()["id"])
    assert "application/octet-stream" in shown.stdout and "thaw inv result" in shown.stdout


def test_cancel_a_running_invocation(env: dict[str, str], jobs: str, exchange: Path) -> None:
    started, gate = exchange / "started", exchange / "never-opened"
    invocation_id, _ = submit(env, jobs, {"started": str(started), "gate": str(gate)})
    wait_for_file(started)
    cancelled = thaw(env, "inv", "cancel", invocation_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"{invocation_id}: cancelled"
    assert finished(env, invocation_id)["status"] == "cancelled"
    one_error_line(thaw(env, "inv", "result", invocation_id), "409", "cancelled")


def test_errors_are_one_line_and_exit_1(env: dict[str, str], jobs: str,
                                        exchange: Path) -> None:
    one_error_line(thaw(env, "inv", "get", "inv_nope"), "404", "inv_nope")
    one_error_line(thaw(env, "inv", "cancel", "inv_nope"), "404")

    failed_id, _ = submit(env, jobs, {"fail": True})
    assert finished(env, failed_id)["status"] == "failed"
    one_error_line(thaw(env, "inv", "result", failed_id), "asked to fail")
    one_error_line(thaw(env, "inv", "cancel", failed_id), "409", "already failed")

    started, gate = exchange / "started", exchange / "gate"
    running_id, _ = submit(env, jobs, {"started": str(started), "gate": str(gate)})
    wait_for_file(started)
    one_error_line(thaw(env, "inv", "result", running_id, "--no-wait"), "still running")
    gate.touch()
    waited = thaw(env, "inv", "result", running_id)  # waits for the answer
    assert waited.returncode == 0 and json.loads(waited.stdout)["calls"] == 0

    one_error_line(thaw(env, "invoke", "no-such-function", "--async"), "no-such-function")
    both = thaw(env, "invoke", jobs, "--async", "--stream")
    assert both.returncode == 2 and "exclude each other" in both.stderr

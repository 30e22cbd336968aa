"""Errors a handler raises on purpose, through the whole path on a LocalPlatform (a
sandboxed instance importing them from the runtime package): the caller gets the
handler's status and error body, the breaker stays closed however many there are, and
a crash stays a 500 whose traceback is in the function's logs and not in the answer."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, RunningPlatform, running
from tests.wheels import fake_attrs_index
from thaw.ops.services import LocalPlatform

NAME = "tenant-errors-rt"
# More than the function breaker's threshold (breaker_failures, 5 by default) of each.
ROUNDS = 12


def invalid_422s(metrics: str) -> float:
    """The 422 answers of the function counted so far, over every start kind."""
    return sum(float(m.group(1)) for m in re.finditer(
        rf'thaw_invocations_total\{{(?=[^}}]*function="dev/{NAME}")(?=[^}}]*status="422")'
        rf'[^}}]*\}} (\S+)', metrics))


def test_tenant_errors_reach_the_caller_and_leave_the_breaker_closed(
        platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "tenant_errors_rt").status_code == 201
    before = invalid_422s(platform.http.get("/metrics").text)

    for _ in range(ROUNDS):
        invalid = platform.invoke(NAME, {"kind": "invalid"})
        assert invalid.status_code == 422, invalid.text
        assert invalid.headers["X-Thaw-Error"] == "tenant"
        assert invalid.json() == {"error": {"code": "invalid_input", "field": "prompt",
                                            "message": "prompt must not be empty"}}
        for status in (404, 429, 500, 503):
            answer = platform.invoke(NAME, {"kind": "http", "status": status})
            assert answer.status_code == status, answer.text
            assert answer.headers["X-Thaw-Error"] == "tenant"
            assert answer.json() == {"error": {"code": "http_error",
                                               "message": f"answered {status} on purpose"}}

        busy = platform.invoke(NAME, {"kind": "busy"})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "3", busy.text
        assert busy.json()["error"]["message"] == "the model is reloading"

    # Still serving: no circuit opened, the warm instance kept.
    ok = platform.invoke(NAME, {"kind": "ok"})
    assert ok.status_code == 200 and ok.json() == {"ok": True}, ok.text
    assert ok.headers["X-Thaw-Start"] == "warm"
    metrics = platform.http.get("/metrics").text
    assert not re.search(rf'thaw_circuit_state\{{[^}}]*name="dev/{NAME}"[^}}]*\}} [12]',
                         metrics), metrics
    # Metrics keep the status the caller got (a series per start kind); other tests
    # of the session may have called this function before.
    assert invalid_422s(metrics) - before == ROUNDS, metrics


def test_a_crash_is_a_500_with_its_traceback_only_in_the_logs(
        platform: RunningPlatform) -> None:
    assert platform.deploy(FIXTURES / "tenant_errors_rt").status_code == 201
    crash = platform.invoke(NAME, {"kind": "crash"})
    assert crash.status_code == 500, crash.text
    assert "X-Thaw-Error" not in crash.headers
    assert crash.json() == {"error": {
        "code": "handler_error", "message": "RuntimeError: the handler failed inside crunch()"}}
    assert "Traceback" not in crash.text

    lines: list[str] = []
    for _ in range(100):
        reply = platform.http.get(f"/v1/functions/{NAME}/logs", params={"tail": "1000"})
        assert reply.status_code == 200, reply.text
        lines = [json.loads(line)["line"] for line in reply.text.splitlines() if line]
        if any("the handler failed inside crunch()" in line for line in lines):
            break
        time.sleep(0.1)
    assert any(line.startswith("Traceback") for line in lines), lines
    assert any("the handler failed inside crunch()" in line for line in lines), lines


def test_a_function_in_its_own_environment_imports_them_too(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    # Its environment holds its own packages and a copy of the runtime package alone
    # (docs/environments.md): the errors come with that copy.
    index = fake_attrs_index(tmp_path_factory.mktemp("index"))
    index.chmod(0o755)  # the builder's uid reads it
    folder = tmp_path / "own-env"
    shutil.copytree(FIXTURES / "tenant_errors_rt", folder)
    (folder / "requirements.txt").write_text("thawtiny==1.0\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THAW_ENV_INDEX_URL", str(index))
        home = tmp_path_factory.mktemp("thaw-home")
        with running(LocalPlatform(home, gateway_port=0, host_devices="1x2GiB")) as p:
            fn = p.deploy(folder).json()
            assert fn["state"] == "ready", fn
            envs = home / "agent" / "local" / "envs"
            assert [e for e in envs.iterdir() if not e.name.startswith(".")], "no environment"
            invalid = p.invoke(NAME, {"kind": "invalid"})
            assert invalid.status_code == 422, invalid.text
            assert invalid.headers["X-Thaw-Error"] == "tenant"
            assert invalid.json()["error"]["field"] == "prompt"
            teapot = p.invoke(NAME, {"kind": "http", "status": 418})
            assert teapot.status_code == 418, teapot.text

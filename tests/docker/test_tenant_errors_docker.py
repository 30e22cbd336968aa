"""Errors a handler raises on purpose, with its instances in containers: the runtime
mounted in the container carries HTTPError and InvalidInput, and the caller gets their
statuses and bodies (tests/e2e/test_tenant_errors.py is the same on the process
runtime)."""

from __future__ import annotations

import pytest

from tests.conftest import FIXTURES, RunningPlatform

pytestmark = pytest.mark.docker

NAME = "tenant-errors-rt"


def test_tenant_errors_from_a_container(docker_platform: RunningPlatform) -> None:
    resp = docker_platform.deploy(FIXTURES / "tenant_errors_rt")
    assert resp.status_code == 201, resp.text
    invalid = docker_platform.invoke(NAME, {"kind": "invalid"})
    assert invalid.status_code == 422, invalid.text
    assert invalid.headers["X-Thaw-Error"] == "tenant"
    assert invalid.json() == {"error": {"code": "invalid_input", "field": "prompt",
                                        "message": "prompt must not be empty"}}
    conflict = docker_platform.invoke(NAME, {"kind": "http", "status": 409})
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"] == {"code": "http_error",
                                        "message": "answered 409 on purpose"}
    crash = docker_platform.invoke(NAME, {"kind": "crash"})
    assert crash.status_code == 500 and "X-Thaw-Error" not in crash.headers
    assert "Traceback" not in crash.text
    ok = docker_platform.invoke(NAME, {"kind": "ok"})
    assert ok.status_code == 200 and ok.headers["X-Thaw-Start"] == "warm", ok.text

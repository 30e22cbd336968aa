"""Typed inputs with the function built in a container: the runtime mounted there
reads predict()'s signature, and the gateway checks calls against it
(tests/e2e/test_typed_inputs.py is the same on the process runtime)."""

from __future__ import annotations

import pytest

from tests.conftest import FIXTURES, RunningPlatform

pytestmark = pytest.mark.docker


def test_typed_inputs_from_a_container(docker_platform: RunningPlatform) -> None:
    resp = docker_platform.deploy(FIXTURES / "typed_rt")
    assert resp.status_code == 201, resp.text
    wrong = docker_platform.invoke("typed-rt", {"text": "hi", "n": 0})
    assert wrong.status_code == 422, wrong.text
    # The gateway's refusal, not the function's own answer.
    assert "X-Thaw-Error" not in wrong.headers
    assert wrong.json()["error"]["field"] == "n"
    ok = docker_platform.invoke("typed-rt", {"text": "hi", "sep": " "})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"out": "hi hi", "tags": None, "calls": 1}

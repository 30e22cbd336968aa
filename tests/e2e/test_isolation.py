"""A misbehaving handler (segfault, exit, memory past its limit, hang past its timeout)
gets its caller a clear 5xx with the reason; the instance is replaced; the agent and
every other function keep serving (issue 4)."""

from __future__ import annotations

import pytest

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform

CASES = [
    ("crash", {"crash": True}, 502, "killed by SIGSEGV"),
    ("exits", {"exit": True}, 502, "exit code 3"),
    ("hog", {"hog": True}, 507, "exceeded its memory limit"),
    ("hang", {"hang": True}, 504, "timeout of 2s"),
]


@pytest.mark.parametrize(("name", "payload", "status", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_misbehaving_instance_is_replaced(platform: RunningPlatform, name: str,
                                          payload: dict[str, bool], status: int,
                                          reason: str) -> None:
    assert platform.deploy(EXAMPLES / "echo").status_code == 201
    fn = platform.deploy(FIXTURES / name).json()
    assert fn["state"] == "ready", fn
    first = platform.invoke(name)
    assert first.status_code == 200, first.text
    bad = platform.invoke(name, payload)
    assert bad.status_code == status, bad.text
    assert reason in bad.json()["error"]["message"]
    again = platform.invoke(name)
    assert again.status_code == 200, again.text
    assert again.json()["pid"] != first.json()["pid"]
    assert platform.invoke("echo", {"ok": 1}).json()["echo"] == {"ok": 1}

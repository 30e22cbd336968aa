"""A function whose module initialises CUDA at import (tests/fixtures/bundles/
cuda_at_import, with fake CuPy where no GPU is present) cannot be forked from a
template: its cold starts still restore from the snapshot, in fresh interpreters, the
snapshot is never quarantined for it, and the function's log says why (DESIGN.md §6)."""

from __future__ import annotations

import json

from tests.conftest import FIXTURES, RunningPlatform

NAME = "cuda-at-import"
REASON = "CuPy initialised CUDA at import (module app)"


def function_log(platform: RunningPlatform) -> list[str]:
    resp = platform.http.get(f"/v1/functions/{NAME}/logs", params={"tail": 1000})
    assert resp.status_code == 200, resp.text
    return [json.loads(line)["line"] for line in resp.text.splitlines() if line]


def test_a_fork_poisoned_function_restores_fresh_without_quarantine(
        platform: RunningPlatform) -> None:
    deployed = platform.deploy(FIXTURES / "cuda_at_import")
    assert deployed.status_code == 201, deployed.text
    assert deployed.json()["start_mode"] == "restore", deployed.json()

    cold = platform.invoke(NAME)
    assert cold.status_code == 200, cold.text
    assert cold.headers["X-Thaw-Start"] == "restore"
    body = cold.json()
    assert body["answer"] == 42  # set by setup() in the build, restored here
    assert body["has_gpu"] is True  # the module's import-time query answered

    fn = platform.http.get(f"/v1/functions/{NAME}").json()
    assert fn["start_mode"] == "restore", fn
    assert "quarantine" not in fn.get("reason", ""), fn

    lines = function_log(platform)
    assert any(f"restores in a fresh interpreter: {REASON}" in line for line in lines), lines

"""The foundation's path end to end on each metadata DB: SQLite (the embedded
default) and a real PostgreSQL (DESIGN.md §2; issue 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, FIXTURES, RunningPlatform
from thaw.ops.services import LocalPlatform


def test_deploy_restore_warm_and_failures_on_each_database(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_DATABASE_URL", db_url)
    local = LocalPlatform(tmp_path / "home", gateway_port=0, host_devices="1x2GiB")
    local.start()
    try:
        p = RunningPlatform(local)
        assert p.deploy(EXAMPLES / "echo").json()["start_mode"] == "restore"
        cold = p.invoke("echo", {"db": 1})
        assert cold.status_code == 200 and cold.headers["X-Thaw-Start"] == "restore"
        warm = p.invoke("echo", {"db": 2})
        assert warm.headers["X-Thaw-Start"] == "warm"
        failed = p.deploy(FIXTURES / "setup_raises").json()
        assert failed["state"] == "failed" and "the model file is missing" in failed["reason"]
        listed = {f["name"]: f["state"] for f in p.http.get("/v1/functions").json()["functions"]}
        assert listed == {"echo": "ready", "setup-raises": "failed"}
        # A redeploy is a new version in the same row.
        assert p.deploy(EXAMPLES / "echo").json()["version"] == "2"
    finally:
        local.stop()

"""Shared fixtures. Functional tests run the real services as subprocesses on port 0
(the same LocalPlatform that `thaw up` uses), each with its own THAW_HOME."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from thaw.core.spec import pack_bundle
from thaw.ops.services import LocalPlatform

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "bundles"
EXAMPLES = REPO / "examples"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Markers whose tests must run in CI: a skip there is a failure.
MUST_RUN_IN_CI = ("docker", "postgres", "browser", "sandbox")
# Tests' webhook receivers listen on this loopback address, which the webhook deny list
# refuses by default: every platform and replica the tests start has it (and only it:
# 127.0.0.1, where the platform's own ports are, stays refused) on the operator's
# allow-list. Tests of the deny list itself set their own.
WEBHOOK_RECEIVER_HOST = "127.0.0.2"
os.environ.setdefault("THAW_WEBHOOK_ALLOW", WEBHOOK_RECEIVER_HOST)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    # Turn the skip into a failure of this test; raising from the hook instead is an
    # INTERNALERROR that stops the whole session.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        for marker in MUST_RUN_IN_CI:
            if item.get_closest_marker(marker) is not None:
                report.outcome = "failed"
                report.longrepr = (f"{item.nodeid} is marked {marker!r} and must run with "
                                   f"CI=true, but it was skipped: {call.excinfo.value}")


def bundle(path: Path) -> bytes:
    return pack_bundle(str(path))


class RunningPlatform:
    def __init__(self, platform: LocalPlatform) -> None:
        self.platform = platform
        self.url = platform.url
        self.key = platform.key
        self.http = httpx.Client(base_url=self.url, timeout=600,
                                 headers={"Authorization": f"Bearer {self.key}"})

    def deploy(self, folder: Path, wait: bool = True, force: bool = True) -> httpx.Response:
        """POST the folder's bundle. `force` (the tests' default): every deploy is a
        new version, so a test starts from a fresh build whatever an earlier test on
        the shared platform deployed; False deploys as `thaw deploy` does (an
        unchanged folder keeps its version: tests/e2e/test_unchanged_redeploy.py)."""
        return self.http.post("/v1/functions", params={"wait": str(wait).lower(),
                                                       "force": str(force).lower()},
                              content=bundle(folder),
                              headers={"Content-Type": "application/gzip"})

    def invoke(self, name: str, body: object = None, **kwargs: object) -> httpx.Response:
        return self.http.post(f"/fn/dev/{name}", json=body if body is not None else {},
                              **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def running(local: LocalPlatform) -> Iterator[RunningPlatform]:
    """`local` started, as a RunningPlatform; stopped after, whatever happened."""
    try:
        local.start()
        platform = RunningPlatform(local)
        yield platform
        platform.http.close()
    finally:
        local.stop()


def tenant_exchange(home: Path, tenant: str = "dev", node_id: str = "local") -> Path:
    """A new folder a test and its tenant's functions both see at the same path: inside
    the tenant's area on the node (its log folder, which every sandbox of the tenant
    has writable), owned by the tenant's uid. Call it after the tenant's first deploy
    (the agent gives the tenant its uid and area then). Functions of the test coordinate
    through files there (gates, counters) without a hole in any sandbox."""
    agent_home = home / "agent" / node_id
    uid = json.loads((agent_home / "sandbox" / "uids.json").read_text())[tenant]
    folder = agent_home / "logs" / str(uid) / f"exchange-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    if os.geteuid() == 0:
        os.chown(folder, uid, uid)
    return folder


@pytest.fixture()
def exchange(platform: RunningPlatform) -> Path:
    """tenant_exchange of the session platform's "dev" tenant (it has deployed by then:
    the fixture deploys examples/echo first)."""
    if not (platform.platform.home / "agent" / "local" / "sandbox" / "uids.json").exists():
        assert platform.deploy(EXAMPLES / "echo").status_code == 201
    return tenant_exchange(platform.platform.home)


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    home = tmp_path_factory.mktemp("thaw-home")
    with running(LocalPlatform(home, gateway_port=0, host_devices="2x4GiB")) as platform:
        yield platform

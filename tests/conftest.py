"""Shared fixtures. Functional tests run the real services as subprocesses on port 0
(the same LocalPlatform that `thaw up` uses), each with its own THAW_HOME."""

from __future__ import annotations

import os
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

    def deploy(self, folder: Path, wait: bool = True) -> httpx.Response:
        return self.http.post("/v1/functions", params={"wait": str(wait).lower()},
                              content=bundle(folder),
                              headers={"Content-Type": "application/gzip"})

    def invoke(self, name: str, body: object = None, **kwargs: object) -> httpx.Response:
        return self.http.post(f"/fn/dev/{name}", json=body if body is not None else {},
                              **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    home = tmp_path_factory.mktemp("thaw-home")
    local = LocalPlatform(home, gateway_port=0, host_devices="2x4GiB")
    try:
        local.start()
        running = RunningPlatform(local)
        yield running
        running.http.close()
    finally:
        local.stop()

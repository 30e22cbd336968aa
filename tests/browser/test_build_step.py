"""The dashboard's function page shows a running build's current step (in a real
browser, as test_dashboard.py runs it): a version whose setup() waits on a gate file
shows "building version N: running setup() ..." under the function's title, and the
line goes once the build is done."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.browser.pages import signed_in
from tests.conftest import RunningPlatform
from tests.e2e.test_build_steps import gated, until

pytestmark = pytest.mark.browser

UI_WAIT_MS = 60_000


def test_the_function_page_shows_the_build_step(platform: RunningPlatform, exchange: Path,
                                                browser: object, tmp_path: Path) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    gate = exchange / f"gate-{uuid.uuid4().hex[:8]}"
    name = f"steps-page-{uuid.uuid4().hex[:6]}"
    reply = platform.deploy(gated(tmp_path / "fn", name, gate), wait=False)
    assert reply.status_code == 201, reply.text
    try:
        doc = until(platform, name, "the setup step",
                    lambda d: "running setup()" in (d.get("build_step") or ""))
        version = doc["latest_build"]["version"]
        with signed_in(browser, platform.url, platform.key,
                       wait_ms=UI_WAIT_MS) as (page, problems):
            page.locator(f"#functions tbody tr[data-name='{name}']").click()
            line = page.locator("#detail-build")
            expect(line).to_be_visible()
            expect(line).to_have_text(
                f"building version {version}: running setup() and capturing its state")

            gate.write_text("open")
            expect(line).to_be_hidden()
            assert problems == []
    finally:
        gate.write_text("open")
        platform.http.delete(f"/v1/functions/{name}")

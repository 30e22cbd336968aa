"""The dashboard's API keys panel in a real browser: an admin key sees its tenant's
live keys with their budgets; an invoke-only key sees no panel."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningPlatform
from tests.gateway.tenancy_helpers import new_tenant

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("THAW_TEST_CHROMIUM", "/usr/bin/chromium")
UI_WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set THAW_TEST_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking"])
        try:
            yield b
        finally:
            b.close()


def test_keys_panel_shows_budgets(platform: RunningPlatform, browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    admin = new_tenant(platform)
    limited = admin.http.post("/v1/keys", json={"name": "limited", "scopes": ["invoke"],
                                                "rpd": 100, "tpm": 5000})
    assert limited.status_code == 201, limited.text
    problems: list[str] = []
    for key, panel in ((admin.key, True), (limited.json()["key"], False)):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(UI_WAIT_MS)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.goto(platform.url)
        page.fill("#key", key)
        with page.expect_response(lambda r: r.url.endswith("/v1/keys")) as listed:
            page.click("#signin-form button[type=submit]")
        expect(page.locator("#tenant")).to_have_text(admin.tenant)
        assert listed.value.status == (200 if panel else 403)
        if panel:
            row = page.locator(f"#keys tr[data-key='{limited.json()['id']}']")
            expect(row).to_contain_text("limited")
            expect(row.locator("td.budgets")).to_have_text("rpd=100 tpm=5000")
            expect(page.locator(f"#keys tr[data-key='{admin.key_id}'] td.budgets")
                   ).to_have_text("—")
        else:
            # The invoke-only key cannot list keys: no panel (its answer was a 403).
            expect(page.locator("#keys-panel")).to_be_hidden()
        page.close()
    assert not problems, problems

"""The dashboard's API keys panel in a real browser: an admin key sees its tenant's
live keys with their budgets; an invoke-only key sees no panel."""

from __future__ import annotations

import pytest

from tests.browser.pages import opened
from tests.conftest import RunningPlatform
from tests.gateway.tenancy_helpers import new_tenant

pytestmark = pytest.mark.browser


def test_keys_panel_shows_budgets(platform: RunningPlatform, browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    admin = new_tenant(platform)
    limited = admin.http.post("/v1/keys", json={"name": "limited", "scopes": ["invoke"],
                                                "rpd": 100, "tpm": 5000})
    assert limited.status_code == 201, limited.text
    for key, panel in ((admin.key, True), (limited.json()["key"], False)):
        with opened(browser) as (page, problems):
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
            assert not problems, problems

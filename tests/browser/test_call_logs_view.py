"""The dashboard's invocation view in a real browser: a call made from the invoke box
shows exactly what its handler printed (its request id), and a click on another call
in the recent invocations list shows that call's lines instead."""

from __future__ import annotations

import re

import pytest

from tests.browser.pages import signed_in
from tests.conftest import FIXTURES, RunningPlatform

pytestmark = pytest.mark.browser

NAME = "call-logs"


def test_the_invocation_view_shows_one_calls_lines(platform: RunningPlatform,
                                                   browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    assert platform.deploy(FIXTURES / "call_logs").status_code == 201
    earlier = platform.invoke(NAME, {"tag": "earlier", "lines": 2})
    assert earlier.status_code == 200, earlier.text
    earlier_id = earlier.headers["X-Request-ID"]
    with signed_in(browser, platform.url, platform.key) as (page, problems):
        expect(page.locator("#tenant")).to_have_text("dev")
        page.click(f"#functions tbody tr[data-name='{NAME}']")
        page.fill("#invoke-body", '{"tag": "dashboard", "lines": 3}')
        with page.expect_response(lambda r: f"/fn/dev/{NAME}" in r.url) as answered:
            page.click("#invoke-form button[type=submit]")
        request_id = answered.value.headers["x-request-id"]
        call_logs = page.locator("#call-logs")
        expect(call_logs).to_have_attribute("data-request", request_id)
        expect(page.locator("#call-logs-state")).to_contain_text(
            re.compile(rf"request {re.escape(request_id)}: \d+ lines"))
        shown = call_logs.inner_text()
        for i in range(3):
            assert f"dashboard line {i}" in shown, shown
        assert "dashboard to stderr" in shown and "earlier" not in shown, shown

        # The earlier call, from the recent list: its lines replace these.
        row = page.locator(f"#recent tbody tr[data-id='{earlier_id}']")
        row.click()
        expect(call_logs).to_have_attribute("data-request", earlier_id)
        expect(call_logs).to_contain_text("earlier line 1")
        expect(call_logs).not_to_contain_text("dashboard")
        assert not problems, problems

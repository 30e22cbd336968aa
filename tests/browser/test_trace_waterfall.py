"""An invocation's trace in the dashboard, in a real browser (as test_dashboard.py runs
it): invoking a function from the page shows its trace id and the trace as a waterfall
(one row a span, nested under its parent, each bar placed on the call's time axis), the
handler's own OpenTelemetry spans among them; the function's recent traces are listed
and a click on one draws it."""

from __future__ import annotations

import re

import pytest

from tests.browser.pages import OUTPUT, signed_in
from tests.conftest import FIXTURES, RunningPlatform

pytestmark = pytest.mark.browser

FUNCTION = "otel-spans"


def test_an_invocation_shows_as_a_waterfall(platform: RunningPlatform,
                                            browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    assert platform.deploy(FIXTURES / "otel_spans").status_code == 201
    try:
        with signed_in(browser, platform.url, platform.key, height=1400) as (page, problems):
            page.locator(f"#functions tbody tr[data-name='{FUNCTION}']").click()
            page.click("#invoke-form button[type=submit]")

            trace_id = page.locator("#invoke-meta dt:text-is('trace') + dd")
            expect(trace_id).to_have_text(re.compile(r"^[0-9a-f]{32}$"))
            waterfall = page.locator("#waterfall")
            expect(waterfall).to_be_visible()
            expect(waterfall).to_have_attribute("data-trace", trace_id.inner_text())
            names = ["invoke dev/otel-spans", "admission", "acquire", "queue", "run",
                     "handler-work", "handler-step", "relay"]
            for name in names:
                expect(waterfall.locator(f".span-row[data-span='{name}']")).to_have_count(1)
            # Nested under their parents: the handler's span under run, its step under it.
            indent = {name: waterfall.locator(f".span-row[data-span='{name}'] .span-name")
                      .evaluate("e => parseFloat(getComputedStyle(e).paddingLeft)")
                      for name in ("invoke dev/otel-spans", "run", "handler-work", "handler-step")}
            assert (indent["invoke dev/otel-spans"] < indent["run"] < indent["handler-work"]
                    < indent["handler-step"])
            # Bars on one time axis: the root spans it all, the run starts after admission.
            def box(name: str) -> dict[str, float]:
                found = waterfall.locator(f".span-row[data-span='{name}'] .span-bar").bounding_box()
                assert found is not None
                return found
            root, admission, run, work = (box(n) for n in (
                "invoke dev/otel-spans", "admission", "run", "handler-work"))
            assert root["width"] > run["width"] > 0
            assert run["x"] >= admission["x"] + admission["width"] - 1
            assert run["x"] - 2 <= work["x"]
            assert work["x"] + work["width"] <= run["x"] + run["width"] + 2

            # The list of recent traces has this call; a click on another draws that one.
            rows = page.locator("#traces tbody tr")
            expect(rows.first).to_have_attribute("data-trace", trace_id.inner_text())
            page.click("#invoke-form button[type=submit]")
            expect(rows).to_have_count(2)
            first = rows.nth(1).get_attribute("data-trace")
            rows.nth(1).click()
            expect(waterfall).to_have_attribute("data-trace", first or "")
            OUTPUT.mkdir(exist_ok=True)
            page.locator("#trace-panel").screenshot(path=str(OUTPUT / "trace-waterfall.png"))
            assert not problems, problems
    finally:
        platform.http.delete(f"/v1/functions/{FUNCTION}")

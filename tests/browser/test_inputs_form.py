"""The dashboard's form for a typed function, in a real browser (as test_dashboard.py
runs it): one control per input with its limits, choices and default, required inputs
marked; trying it posts the JSON body with the user's key and shows the answer, and a
422 beside the field it names."""

from __future__ import annotations

import json

import pytest

from tests.browser.pages import OUTPUT, signed_in
from tests.conftest import FIXTURES, RunningPlatform

pytestmark = pytest.mark.browser

FUNCTION = "form-rt"


def test_the_form_tries_a_typed_function(platform: RunningPlatform,
                                         browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    assert platform.deploy(FIXTURES / "form_rt").status_code == 201
    try:
        with signed_in(browser, platform.url, platform.key, height=1200) as (page, problems):
            page.locator(f"#functions tbody tr[data-name='{FUNCTION}']").click()
            form = page.locator("#inputs-form")
            expect(form).to_be_visible()

            # One control per input, of its kind, with its limits and default.
            prompt = form.locator("#input-prompt")
            assert prompt.get_attribute("pattern") == "[a-z ]+"
            assert prompt.get_attribute("required") is not None
            expect(form.locator(".field[data-field='prompt'] .required")).to_have_text("*")
            expect(form.locator(".field[data-field='steps'] .required")).to_have_count(0)
            steps = form.locator("#input-steps")
            assert (steps.get_attribute("type"), steps.get_attribute("min"),
                    steps.get_attribute("max"), steps.get_attribute("step")) == (
                "number", "1", "10", "1")
            expect(steps).to_have_value("3")
            assert form.locator("#input-scale").get_attribute("step") == "any"
            expect(form.locator("#input-scale")).to_have_value("0.5")
            mode = form.locator("#input-mode")
            assert mode.evaluate("e => e.tagName") == "SELECT"
            assert mode.locator("option").all_inner_texts() == ['"fast"', '"slow"']
            assert mode.evaluate("e => e.selectedOptions[0].textContent") == '"fast"'
            assert form.locator("#input-loud").get_attribute("type") == "checkbox"
            assert not form.locator("#input-loud").is_checked()
            assert form.locator("#input-tags").evaluate("e => e.tagName") == "TEXTAREA"
            assert form.locator("#input-extra").evaluate("e => e.tagName") == "TEXTAREA"
            expect(form.locator(".field[data-field='prompt']")).to_contain_text("What to say")

            # Tried: the answer is what reached the handler.
            prompt.fill("hello there")
            steps.fill("5")
            mode.select_option(label='"slow"')
            form.locator("#input-loud").check()
            form.locator("#input-tags").fill('["a", "b"]')
            form.locator("#input-extra").fill('{"k": 1}')
            form.locator("button[type=submit]").click()
            expect(page.locator("#invoke-meta")).to_contain_text("200")
            expect(page.locator("#invoke-result")).to_contain_text('"mode": "slow"')
            answer = json.loads(page.locator("#invoke-result").inner_text())
            assert answer == {"prompt": "hello there", "steps": 5, "scale": 0.5, "mode": "slow",
                              "loud": True, "tags": ["a", "b"], "extra": {"k": 1}}
            expect(form.locator(".field-error:not(:empty)")).to_have_count(0)

            # Out of range: the gateway's 422, beside the field it names.
            steps.fill("11")
            form.locator("button[type=submit]").click()
            expect(page.locator("#invoke-meta")).to_contain_text("422")
            steps_error = form.locator(".field[data-field='steps'] .field-error")
            expect(steps_error).not_to_be_empty()
            expect(form.locator(".field.invalid")).to_have_count(1)
            # Bad JSON is caught before any call; a missing required input is the gateway's.
            steps.fill("2")
            form.locator("#input-tags").fill("[not json")
            form.locator("button[type=submit]").click()
            expect(form.locator(".field[data-field='tags'] .field-error")).to_have_text(
                "not valid JSON")
            expect(steps_error).to_be_empty()
            form.locator("#input-tags").fill("")
            prompt.fill("")
            form.locator("button[type=submit]").click()
            expect(form.locator(".field[data-field='prompt'] .field-error")).not_to_be_empty()
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(path=str(OUTPUT / "dashboard-inputs-form.png"), full_page=True)
            assert problems == []
    finally:
        platform.http.delete(f"/v1/functions/{FUNCTION}")

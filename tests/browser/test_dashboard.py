"""The dashboard in a real browser (Debian's Chromium driven by Playwright): sign in,
deploy a bundle from the form, invoke it from the page, see the invocation with its
stages, the charts drawn, and the admin view's packing map. Screenshots go to
test-output/ (CI keeps that folder as its artifacts)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.pages import OUTPUT, opened, signed_in
from tests.conftest import FIXTURES, RunningPlatform
from thaw.core.spec import pack_bundle

pytestmark = pytest.mark.browser

BUNDLE = FIXTURES / "sliced_echo"
FUNCTION = "sliced-echo"
FAILING = "dashboard-setup-raises"
# Bound for waiting on a build (Playwright's timeout, milliseconds): a snapshot build
# takes seconds here; this only stops a broken page from hanging the run.
BUILD_WAIT_MS = 180_000


@pytest.fixture
def removed_after(platform: RunningPlatform) -> Iterator[list[str]]:
    """Functions the test deploys, deleted after it: their slices and instances do not
    stay on the session's shared platform."""
    names: list[str] = []
    yield names
    for name in names:
        platform.http.delete(f"/v1/functions/{name}")


def failing_bundle(tmp_path: Path) -> Path:
    """setup_raises under a name of this test's own."""
    folder = tmp_path / "failing"
    shutil.copytree(FIXTURES / "setup_raises", folder)
    toml = folder / "thaw.toml"
    toml.write_text(re.sub(r'(?m)^name = .*$', f'name = "{FAILING}"', toml.read_text()))
    tarball = tmp_path / "failing.tar.gz"
    tarball.write_bytes(pack_bundle(str(folder)))
    return tarball


def test_sign_in_deploy_invoke_and_watch(platform: RunningPlatform, browser: object,
                                         tmp_path: Path, removed_after: list[str]) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    OUTPUT.mkdir(exist_ok=True)
    tarball = tmp_path / "sliced-echo.tar.gz"
    tarball.write_bytes(pack_bundle(str(BUNDLE)))
    with opened(browser, console=True) as (page, problems):

        # The page runs under its Content-Security-Policy: any violation is recorded.
        page.add_init_script("document.addEventListener('securitypolicyviolation', (e) => "
                             "(window.cspViolations = window.cspViolations || [])"
                             ".push(e.violatedDirective + ' ' + e.blockedURI));")

        # A wrong key is refused with a readable message, and the key is not kept.
        loaded = page.goto(platform.url)
        assert loaded is not None and "script-src 'self'" in loaded.headers[
            "content-security-policy"]
        page.fill("#key", "thaw_wrong")
        page.click("#signin-form button[type=submit]")
        expect(page.locator("#signin-error")).to_contain_text("Sign-in failed")
        assert page.evaluate("sessionStorage.getItem('thaw.key')") is None

        page.fill("#key", platform.key)
        page.click("#signin-form button[type=submit]")
        expect(page.locator("#tenant")).to_have_text("dev")
        expect(page.locator("#conn")).to_have_class(re.compile(r"\blive\b"))
        assert page.evaluate("sessionStorage.getItem('thaw.key')") == platform.key

        # Deploy from the form; the page follows the build over the live feed.
        removed_after.extend([FUNCTION, FAILING])
        page.set_input_files("#bundle", str(tarball))
        page.click("#deploy-form button[type=submit]")
        expect(page.locator("#deploy-steps li.done").first).to_contain_text("Uploaded")
        expect(page.locator("#deploy-steps li").last).to_contain_text(
            "Ready", timeout=BUILD_WAIT_MS)
        url = page.locator("#deploy-url code").inner_text()
        # On the function origin: the gateway's host, a port of its own.
        assert url == platform.http.get(f"/v1/functions/{FUNCTION}").json()["url"]
        assert url.endswith(f"/fn/dev/{FUNCTION}") and not url.startswith(f"{platform.url}/")
        row = page.locator(f"#functions tbody tr[data-name='{FUNCTION}']")
        expect(row).to_contain_text("ready")
        expect(row).to_contain_text("disk ×1")  # the snapshot's tiers
        expect(row).to_have_class(re.compile(r"\bselected\b"))

        # Invoke from the page: the answer and how it started.
        page.fill("#invoke-body", '{"hello": "browser"}')
        page.click("#invoke-form button[type=submit]")
        expect(page.locator("#invoke-result")).to_contain_text('"hello": "browser"')
        expect(page.locator("#invoke-meta")).to_contain_text("X-Thaw-Start")
        expect(page.locator("#invoke-meta")).to_contain_text("run;dur=")

        # The invocation shows up in the recent list with its stages, pushed live.
        recent = page.locator("#recent tbody tr", has_text=FUNCTION).first
        expect(recent).to_contain_text("200")
        expect(recent.locator(".stage-text")).to_contain_text("queue")
        expect(recent.locator(".stage-text")).to_contain_text("run")
        expect(page.locator("#recent .stages span").first).to_be_visible()
        # Two more calls: the instance is warm now.
        for _ in range(2):
            page.click("#invoke-form button[type=submit]")
            expect(page.locator("#invoke-meta")).to_contain_text("warm")
        expect(page.locator("#recent tbody tr", has_text=FUNCTION)).to_have_count(3)
        expect(page.locator("#recent tbody tr", has_text="warm").first).to_be_visible()

        # The detail panel's figures and charts: uPlot draws on canvases.
        expect(page.locator("#detail-name")).to_have_text(FUNCTION)
        expect(row.locator("td").nth(5)).not_to_have_text("0.00")  # calls/s over the minute
        for chart in ("rate", "latency", "cold"):
            canvas = page.locator(f"#chart-{chart} canvas")
            expect(canvas).to_have_count(1)
            assert canvas.bounding_box()["width"] > 200  # type: ignore[index]
        expect(page.locator("#chart-latency .u-legend")).to_contain_text("p99")
        # The first call was a cold start: the stage chart has its bar.
        if page.locator("#recent tbody tr", has_text="restore").count():
            expect(page.locator("#chart-cold .u-legend")).to_contain_text("restore")
        # The usage panel: the page's three calls, metered.
        usage = page.locator("#usage tbody tr", has_text=FUNCTION)
        expect(usage).to_have_count(1)
        expect(usage.locator("td").nth(1)).to_have_text("3")
        page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)

        # Admin view: the node, its devices' slices (the packing map), the pinned tier.
        page.click("#tab-admin")
        node = page.locator(".node").first
        expect(node).to_contain_text("pinned")
        expect(node.locator(".device .free").first).to_contain_text("free of")
        expect(page.locator(f".slice[data-function='dev/{FUNCTION}']")).to_have_count(1)
        expect(node.locator(".legend")).to_contain_text(f"dev/{FUNCTION}")
        expect(page.locator("#events li").first).to_be_visible()
        page.screenshot(path=str(OUTPUT / "dashboard-admin.png"), full_page=True)

        # A bundle whose setup() raises: the build fails and the page says why.
        page.click("#tabs button[data-view=functions]")
        page.set_input_files("#bundle", str(failing_bundle(tmp_path)))
        page.click("#deploy-form button[type=submit]")
        expect(page.locator("#deploy-steps li").last).to_contain_text(
            "Failed:", timeout=BUILD_WAIT_MS)
        expect(page.locator("#deploy-steps li.failed")).to_contain_text("setup")
        expect(page.locator("#deploy-url")).to_be_hidden()

        assert problems == []
        assert page.evaluate("window.cspViolations || []") == []


def test_typed_inputs_shown_and_prefilled(platform: RunningPlatform, browser: object,
                                          removed_after: list[str]) -> None:
    """A typed function's inputs are listed beside the invoke box, which starts with an
    example body; a wrong input shows the gateway's 422 naming it."""
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    removed_after.append("typed-rt")
    assert platform.deploy(FIXTURES / "typed_rt").status_code == 201
    with signed_in(browser, platform.url, platform.key) as (page, _):
        page.locator("#functions tbody tr[data-name='typed-rt']").click()
        rows = page.locator("#inputs tbody tr")
        expect(rows).to_have_count(4)
        expect(rows.first).to_contain_text("Text to repeat")
        expect(rows.nth(1)).to_contain_text("≥ 1; ≤ 5")
        body = page.locator("#invoke-body").input_value()
        assert '"n": 2' in body and '"text": ""' in body

        page.click("#invoke-form button[type=submit]")
        expect(page.locator("#invoke-result")).to_contain_text('"calls": 1')
        page.fill("#invoke-body", '{"text": "hi", "n": 7}')
        page.click("#invoke-form button[type=submit]")
        expect(page.locator("#invoke-meta")).to_contain_text("422")
        expect(page.locator("#invoke-result")).to_contain_text('"field": "n"')

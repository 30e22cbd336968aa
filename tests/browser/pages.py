"""Pages of the dashboard for the browser tests: a new page that records its errors and
is closed after its test, signed in to the dashboard or not."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from tests.conftest import REPO

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

# Screenshots go here; CI keeps the folder as its artifacts.
OUTPUT = REPO / "test-output"
# Bound on waiting for the page (Playwright's timeouts, milliseconds): it only stops a
# broken page from hanging the run.
UI_WAIT_MS = 30_000


@contextmanager
def opened(browser: Browser, *, height: int = 1000, wait_ms: int = UI_WAIT_MS,
           console: bool = False) -> Iterator[tuple[Page, list[str]]]:
    """A new page 1400 px wide with `wait_ms` as its default timeout, and the list its
    uncaught errors (and, with `console`, its console errors) are appended to; the page
    is closed on the way out."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.set_default_timeout(wait_ms)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    if console:
        page.on("console", lambda msg: problems.append(f"console: {msg.text}")
                if msg.type == "error" else None)
    try:
        yield page, problems
    finally:
        page.close()


@contextmanager
def signed_in(browser: Browser, url: str, key: str, *, height: int = 1000,
              wait_ms: int = UI_WAIT_MS, console: bool = False,
              ) -> Iterator[tuple[Page, list[str]]]:
    """`opened`, on the dashboard at `url`, signed in with `key`."""
    with opened(browser, height=height, wait_ms=wait_ms, console=console) as (page, problems):
        page.goto(url)
        page.fill("#key", key)
        page.click("#signin-form button[type=submit]")
        yield page, problems

"""The dashboard's function page shows the function's cron schedules and their recent
runs, in a real browser (as test_dashboard.py runs it), on a platform whose scheduler
clock the test moves (tests/e2e/test_schedules.py's fixture): the schedule's cron,
time zone and input, its last run's outcome, and each scheduled run; a run made while
the page is open appears there too."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.browser.pages import signed_in
from tests.conftest import RunningPlatform
from tests.e2e.test_schedules import POLLS, Clock, bundle, setup, wait_runs

pytestmark = pytest.mark.browser
__all__ = ["setup"]  # the module-scoped platform with its scheduler clock

# The page reloads a function's schedules every 10 s; a loaded machine may take longer.
UI_WAIT_MS = 60_000
NAME = "scheduled-page"


def to_next_due(p: RunningPlatform, clock: Clock) -> None:
    """Move the scheduler's clock just past the schedule's next due time."""
    for _ in range(POLLS):
        found = p.http.get("/v1/schedules", params={"function": NAME}).json()["schedules"]
        if found and found[0]["next_run_at"]:
            clock.forward(found[0]["next_run_at"] - (time.time() + clock.offset) + 1)
            return
        time.sleep(0.1)
    raise AssertionError(f"the schedule of {NAME} never got a due time")


def test_the_function_page_shows_schedules_and_runs(
        setup: tuple[RunningPlatform, Clock, Path], browser: object) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    p, clock, work = setup
    # Once a year: no due time comes by itself while the test runs, only those the
    # test moves the clock to.
    folder = bundle(work, NAME, '[schedule]\ncron = "0 0 1 1 *"\ninput = {a = 40}\n'
                                'timezone = "Europe/Paris"\n')
    assert p.deploy(folder).status_code == 201
    to_next_due(p, clock)
    [first] = wait_runs(p, NAME, 1)

    with signed_in(browser, p.url, p.key, wait_ms=UI_WAIT_MS) as (page, problems):
        page.click(f"#functions tbody tr[data-name='{NAME}']")
        panel = page.locator("#schedule-panel")
        expect(panel).to_be_visible(timeout=UI_WAIT_MS)
        row = page.locator("#schedules tbody tr")
        expect(row).to_have_count(1)
        expect(row).to_contain_text("0 0 1 1 *")
        expect(row).to_contain_text("Europe/Paris")
        expect(row).to_contain_text('{"a":40}')
        expect(row.locator("td.outcome")).to_have_text("succeeded")
        expect(row.locator("td").nth(4)).to_have_attribute("title", first["id"])
        run = page.locator(f"#scheduled-runs tbody tr[data-id='{first['id']}']")
        expect(run).to_contain_text("succeeded")
        expect(page.locator("#no-scheduled-runs")).to_be_hidden()

        # The next due time runs while the page is open: it shows up, newest first.
        to_next_due(p, clock)
        second = next(r for r in wait_runs(p, NAME, 2) if r["id"] != first["id"])
        expect(page.locator("#scheduled-runs tbody tr").first).to_have_attribute(
            "data-id", second["id"], timeout=UI_WAIT_MS)
        expect(row.locator("td").nth(4)).to_have_attribute("title", second["id"],
                                                           timeout=UI_WAIT_MS)
        assert not problems, problems

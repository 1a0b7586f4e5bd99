"""The coach's story in a real browser (Playwright driving Debian's Chromium) against waitress:
a school, its bell schedule from a CSV file, a term, a room's unit, the plan "Room 204,
periods 2 and 5, every school day from March 3 to March 28", and its windows in the timeline."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.controller.test_schedule_api import (
    BELLS_CSV,
    HOLIDAY,
    PLAN_DAYS,
    YEAR,
    ZONE,
    scheduled,
    service_clock,
)
from tests.support.web import PASSWORD, LiveServer, WebStack, enrol

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/classcap-dashboard-schedule.png")
TIMEOUT_MS = 20_000
expect.set_options(timeout=TIMEOUT_MS)

pytestmark = [pytest.mark.xdist_group("browser")]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def site(web_stack: WebStack) -> Iterator[WebStack]:
    """A scheduling controller with one spare unit enrolled elsewhere and a technician."""
    _, service = scheduled(web_stack, service_clock())
    assert web_stack.app is not None
    enrol(web_stack, "depot-7", "Depot", "Shelf")
    web_stack.user("tech", "technician")  # type: ignore[arg-type]
    server = LiveServer(web_stack.app, web_stack.port)
    server.start()
    yield web_stack
    server.stop()
    service.stop()


def _logged_in(browser: Browser, stack: WebStack) -> Page:
    page = browser.new_context(base_url=stack.base_url).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto("/schedules")
    page.get_by_label("Username").fill("tech")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Schedules")).to_be_visible()
    return page


def _flash(page: Page, text: str) -> None:
    expect(page.locator(".flash").first).to_contain_text(text)


def test_coach_plans_room_204_and_sees_its_windows(
    browser: Browser, site: WebStack, tmp_path: Path
) -> None:
    page = _logged_in(browser, site)

    page.get_by_label("School name").fill("Lincoln Middle")
    page.get_by_label("Timezone").fill(ZONE)
    page.get_by_role("button", name="Add school").click()
    expect(page.get_by_role("heading", name="Lincoln Middle")).to_be_visible()

    bells = tmp_path / "bells.csv"
    bells.write_text(BELLS_CSV)
    upload = page.locator("#bell-import")
    upload.get_by_label("CSV (schedule, period, start, end) or iCalendar file").set_input_files(
        bells
    )
    upload.get_by_role("button", name="Import bell schedules").click()
    _flash(page, "Imported bell schedules: Regular, Early release.")
    expect(page.locator('.bell-schedule[data-schedule="Regular"] tbody tr')).to_have_count(5)

    day_type = page.locator("#day-type-form")
    day_type.get_by_label("Day type").fill("Regular")
    day_type.get_by_label("Bell schedule").select_option("Regular")
    day_type.get_by_role("button", name="Save day type").click()
    _flash(page, "Day type Regular saved.")

    term = page.locator("#term-form")
    term.get_by_label("First day").fill(f"{YEAR}-01-04")
    term.get_by_label("Last day").fill(f"{YEAR}-06-18")
    term.get_by_label("Usual day type").select_option("Regular")
    term.get_by_role("button", name="Save term").click()
    _flash(page, "Calendar saved.")

    holiday = page.locator("#day-form")
    holiday.get_by_label("Date").fill(HOLIDAY.isoformat())
    holiday.get_by_label("No school (holiday)").check()
    holiday.get_by_label("Note").fill("Spring break")
    holiday.get_by_role("button", name="Save day").click()
    _flash(page, f"Day {HOLIDAY} saved.")
    expect(page.locator("#calendar-days tbody")).to_contain_text("Spring break")

    room = page.locator("#room-form")
    room.get_by_label("Room").fill("Room 204")
    room.get_by_label("Unit").select_option("depot-7")
    room.get_by_role("button", name="Save room").click()
    _flash(page, "Room Room 204 saved.")
    expect(page.locator('#rooms-table tr[data-room="Room 204"]')).to_contain_text("depot-7")

    plan = page.locator("#new-plan")
    plan.get_by_label("Plan name").fill("Coaching Ms Rivera")
    plan.get_by_label("Rooms").select_option(["Room 204"])
    plan.get_by_label("Periods").select_option(["Period 2", "Period 5"])
    plan.get_by_label("First day").fill(f"{YEAR}-03-03")
    plan.get_by_label("Last day").fill(f"{YEAR}-03-28")
    plan.get_by_label("Teacher").fill("Ms Rivera")
    plan.get_by_role("button", name="Create plan").click()
    _flash(page, "Plan Coaching Ms Rivera created.")
    expect(page.locator("#plans-table tbody tr")).to_contain_text("Period 2, Period 5")

    timeline = page.locator("#timeline")
    timeline.get_by_label("From").fill(f"{YEAR}-03-01")
    timeline.get_by_label("To").fill(f"{YEAR}-03-31")
    timeline.get_by_role("button", name="Show").click()
    rows = page.locator("#timeline-table tbody tr[data-window]")
    expect(rows).to_have_count(2 * len(PLAN_DAYS))
    first = rows.first
    expect(first).to_contain_text("Room 204")
    expect(first).to_contain_text("08:55\u201309:45")
    expect(first.locator(".status")).to_have_text("planned")
    expect(page.locator("#timeline-table .status-planned")).to_have_count(2 * len(PLAN_DAYS))
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # The unit already has the windows of its pushed horizon, without waiting.
    pushed = [d for unit, d in site.desired_published if unit == "depot-7"]
    assert pushed and pushed[-1].schedule
    assert {w.start.date() for w in pushed[-1].schedule} <= set(PLAN_DAYS)
    assert date(YEAR, 3, 3) <= pushed[-1].schedule[0].start.date()

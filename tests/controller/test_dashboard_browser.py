"""The dashboard in a real browser (Playwright driving Debian's Chromium) against waitress."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from shared.clock import utcnow
from shared.messages import (
    CommandResult,
    CommandStatus,
    EndReason,
    RecorderState,
    RecordingManifest,
    RecordingStatus,
    SegmentAnnouncement,
    Snapshot,
    Status,
    Trigger,
    UploadGrant,
    UploadResult,
)
from tests.support.web import PASSWORD, LiveServer, WebStack, enrol, unit_health

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
SCREENSHOT = Path("/tmp/classcap-dashboard-unit.png")
TIMEOUT_MS = 20_000
# Assertions wait as long as actions: on a loaded machine a page can take seconds.
expect.set_options(timeout=TIMEOUT_MS)

pytestmark = [
    # One worker runs them all with one browser instead of a browser per worker.
    pytest.mark.xdist_group("browser"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def site(web_stack: WebStack) -> Iterator[WebStack]:
    """Three units in two schools, served with live updates every second."""
    app = web_stack.build(refresh_interval_s=1)
    enrol(web_stack, "north-101", "North High", "101")
    enrol(web_stack, "north-102", "North High", "102")
    enrol(web_stack, "south-201", "South Middle", "201", online=False)
    web_stack.registry.on_health("north-102", unit_health(RecorderState.RECORDING))
    web_stack.user("tech", "technician")  # type: ignore[arg-type]
    web_stack.user("watcher", "viewer")  # type: ignore[arg-type]
    server = LiveServer(app, web_stack.port)
    server.start()
    yield web_stack
    server.stop()


def _page(browser: Browser, stack: WebStack, username: str, **context: object) -> Page:
    page = browser.new_context(base_url=stack.base_url, **context).new_page()  # type: ignore[arg-type]
    page.set_default_timeout(TIMEOUT_MS)
    page.goto("/")
    expect(page).to_have_url(f"{stack.base_url}/login?next=/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
    return page


def _unit_rows(page: Page) -> list[str]:
    units = page.locator("tr.unit").evaluate_all("rows => rows.map(r => r.dataset.unit)")
    return [str(unit) for unit in units]


def test_login_shows_units_grouped_by_school_then_filter_and_search(
    browser: Browser, site: WebStack
) -> None:
    page = _page(browser, site, "tech")
    expect(page.locator("tr.group")).to_have_text(["North High", "South Middle"])
    assert _unit_rows(page) == ["north-101", "north-102", "south-201"]
    recording = page.locator('tr[data-unit="north-102"]')
    expect(recording).to_contain_text("recording")
    expect(page.locator('tr[data-unit="south-201"]')).to_contain_text("offline")

    page.get_by_label("School").select_option("South Middle")  # applies at once
    expect(page.locator("tr.unit")).to_have_count(1)
    assert _unit_rows(page) == ["south-201"]
    expect(page.get_by_role("heading", name="Every unit of South Middle")).to_be_visible()

    page.get_by_role("link", name="Clear").click()
    page.get_by_label("Search").fill("102")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("tr.unit")).to_have_count(1)
    assert _unit_rows(page) == ["north-102"]

    page.get_by_label("Search").fill("no such room")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("No units match.")).to_be_visible()


def test_fleet_updates_live(browser: Browser, site: WebStack) -> None:
    page = _page(browser, site, "watcher")
    row = page.locator('tr[data-unit="south-201"]')
    expect(row).to_contain_text("offline")
    site.registry.on_status("south-201", Status(online=True, epoch=1))
    site.registry.on_health("south-201", unit_health(disk_free_bytes=10 * 1024**2))
    expect(row).to_contain_text("online")
    expect(row).to_contain_text("disk low")


def test_unit_page_start_recording_and_snapshot(
    browser: Browser, site: WebStack, tmp_path: Path
) -> None:
    page = _page(browser, site, "tech")
    page.get_by_role("link", name="north-101").click()
    expect(page.get_by_role("heading", name="north-101")).to_be_visible()
    expect(page.get_by_text("No snapshot yet")).to_be_visible()

    page.get_by_role("button", name="Start recording").click()
    expect(page.get_by_role("status").first).to_contain_text("Start recording: command")
    row = page.locator("#commands tbody tr").first
    expect(row).to_contain_text("Start recording")
    expect(row.locator(".status")).to_have_text("queued")
    (command_id,) = site.published
    assert row.get_attribute("data-command") == command_id

    jpeg = tmp_path / "snapshot.jpg"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240",
            "-frames:v",
            "1",
            str(jpeg),
        ],
        check=True,
        timeout=60,
    )
    site.registry.on_snapshot(
        "north-101",
        Snapshot(
            taken_at=utcnow(),
            width=320,
            height=240,
            jpeg_base64=base64.b64encode(jpeg.read_bytes()).decode(),
        ),
    )
    site.commands.mark_sent(command_id)
    site.commands.on_result(
        "north-101", CommandResult(command_id=command_id, status=CommandStatus.ACCEPTED)
    )
    site.commands.on_result(
        "north-101",
        CommandResult(command_id=command_id, status=CommandStatus.DONE, recording_id="rec-1"),
    )
    site.registry.on_health("north-101", unit_health(RecorderState.RECORDING, recording_id="rec-1"))

    picture = page.locator("img#snapshot")
    expect(picture).to_be_visible()
    page.wait_for_function("document.querySelector('img#snapshot').naturalWidth === 320")
    expect(page.locator("#commands tbody tr").first.locator(".status")).to_have_text("done")
    expect(page.locator("#unit-live")).to_contain_text("● recording")
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_school_wide_command_asks_first(browser: Browser, site: WebStack) -> None:
    page = _page(browser, site, "tech")
    page.get_by_label("School").select_option("North High")
    expect(page.locator("tr.unit")).to_have_count(2)
    dialogs: list[str] = []

    def answer(dialog: object) -> None:
        dialogs.append(dialog.message)  # type: ignore[attr-defined]
        dialog.accept()  # type: ignore[attr-defined]

    page.on("dialog", answer)
    page.locator(".school-actions").get_by_role("button", name="Reboot").click()
    expect(page.get_by_role("status").first).to_have_text("Reboot sent to 2 units of North High.")
    assert dialogs == ["Reboot for every unit of North High?"]
    assert len(site.published) == 2


def test_viewer_sees_no_command_buttons(browser: Browser, site: WebStack) -> None:
    page = _page(browser, site, "watcher")
    page.goto("/units/north-101")
    expect(page.get_by_role("heading", name="north-101")).to_be_visible()
    expect(page.get_by_role("button", name="Start recording")).to_have_count(0)
    expect(page.get_by_role("link", name="Users & tokens")).to_have_count(0)


def test_fleet_fits_a_tablet(browser: Browser, site: WebStack) -> None:
    page = _page(browser, site, "tech", viewport={"width": 768, "height": 1024}, has_touch=True)
    expect(page.locator("tr.unit")).to_have_count(3)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    page.goto("/units/north-101")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    expect(page.get_by_role("button", name="Start recording")).to_be_visible()


def _stored_recording(stack: WebStack, data: bytes) -> str:
    """A recording of one segment PUT to the live server's store and verified; returns its key."""
    now = utcnow()
    stack.catalogue.on_manifest(
        "north-101",
        RecordingManifest(
            recording_id="rec-lesson-1",
            device_id="north-101",
            trigger=Trigger.BUTTON,
            started_at=now,
            ended_at=now + timedelta(seconds=10),
            status=RecordingStatus.COMPLETE,
            end_reason=EndReason.BUTTON,
            segments=1,
            video="h264",
        ),
    )
    grant = stack.catalogue.on_announcement(
        "north-101",
        SegmentAnnouncement(
            recording_id="rec-lesson-1",
            sequence=0,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            started_at=now,
            ended_at=now + timedelta(seconds=10),
        ),
    )
    assert isinstance(grant, UploadGrant)
    request = urllib.request.Request(grant.url, data=data, method="PUT", headers=grant.headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    confirmation = stack.catalogue.on_upload_result(
        "north-101",
        UploadResult(recording_id="rec-lesson-1", sequence=0, key=grant.key, ok=True),
    )
    assert confirmation.verified
    return grant.key


def test_recordings_page_links_every_segment(browser: Browser, site: WebStack) -> None:
    data = b"fragmented mp4 bytes " * 4096
    _stored_recording(site, data)
    page = _page(browser, site, "watcher")
    page.get_by_role("link", name="Recordings").click()
    expect(page.locator("table tbody tr")).to_have_count(1)
    expect(page.locator("table tbody tr")).to_contain_text("complete")
    expect(page.locator("table tbody tr")).to_contain_text("1 / 1")
    page.locator("table tbody tr a").first.click()
    expect(page.get_by_role("heading", name="rec-lesson-1")).to_be_visible()
    link = page.locator("#segments").get_by_role("link", name="seg-00000.mp4")
    expect(link).to_be_visible()
    href = link.get_attribute("href")
    assert href is not None and href.startswith(site.base_url + "/storage/objects/")
    download = page.request.get(href)
    assert download.status == 200 and download.body() == data


def test_admin_creates_a_token_shown_once(browser: Browser, site: WebStack) -> None:
    site.user("root", "admin")  # type: ignore[arg-type]
    page = _page(browser, site, "root")
    page.get_by_role("link", name="Users & tokens").click()
    form = page.locator("form", has_text="Create a token")
    form.get_by_label("Name").fill("district-sis")
    form.get_by_label("Role").select_option("viewer")
    page.get_by_role("button", name="Create token").click()
    token = page.locator("#new-token").inner_text().strip()
    assert token.startswith("cct_")
    answer = page.request.get("/api/v1/schools", headers={"Authorization": f"Bearer {token}"})
    assert answer.status == 200 and answer.json()["items"][0]["school"] == "North High"
    page.get_by_role("link", name="Users & tokens").click()
    expect(page.locator("#new-token")).to_have_count(0)
    expect(page.locator("table").last).to_contain_text("district-sis")

"""The scheduling API and its dashboard forms on real services, on SQLite and PostgreSQL.

Dates are in next year's spring so they stay in the future; the schedule service runs on
a clock set to the Monday before the coach's plan, so its pushed horizon covers it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from flask.testing import FlaskClient

from controller.alerts import AlertEngine
from controller.catalogue import Catalogue
from controller.commands import CommandService
from controller.db import Database
from controller.registry import Registry
from controller.schedule_service import ScheduleService
from controller.schedules import ScheduleStore
from controller.storage.local import LocalStorage
from controller.web import WebConfig, WebServices, create_app
from controller.web.auth import Role
from tests.controller.conftest import FakeClock
from tests.support.web import WebStack, enrol

YEAR = date.today().year + 1
ZONE = "America/New_York"
NEW_YORK = ZoneInfo(ZONE)
BELLS_CSV = (
    "schedule,period,start,end\n"
    "Regular,Period 1,08:00,08:50\n"
    "Regular,Period 2,08:55,09:45\n"
    "Regular,Period 3,09:50,10:40\n"
    "Regular,Period 4,11:20,12:10\n"
    "Regular,Period 5,12:15,13:05\n"
    "Early release,Period 1,08:00,08:30\n"
    "Early release,Period 2,08:35,09:05\n"
    "Early release,Period 5,10:20,10:50\n"
)
REGULAR = [
    {"name": "Period 1", "start": "08:00", "end": "08:50"},
    {"name": "Period 2", "start": "08:55", "end": "09:45"},
    {"name": "Period 5", "start": "12:15", "end": "13:05"},
]
HOLIDAY = date(YEAR, 3, 15)


def weekdays_between(first: date, last: date, skip: set[date]) -> list[date]:
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    return [d for d in days if d.isoweekday() <= 5 and d not in skip]


# The coach's plan runs from March 3; the weekdays move with the year.
PLAN_DAYS = weekdays_between(date(YEAR, 3, 3), date(YEAR, 3, 28), {HOLIDAY})
FIRST = PLAN_DAYS[0]


def day(month: int, number: int) -> str:
    return date(YEAR, month, number).isoformat()


def scheduled(stack: WebStack, clock: FakeClock) -> tuple[ScheduleStore, ScheduleService]:
    """Builds ``stack``'s app with a schedule store and service (the service not started)."""
    store = ScheduleStore(stack.db)
    service = ScheduleService(
        stack.db,
        store,
        stack.registry,
        lambda device_id, desired: stack.desired_published.append((device_id, desired)),
        clock=clock,
    )
    stack.app = create_app(
        WebServices(
            db=stack.db,
            registry=stack.registry,
            commands=stack.commands,
            catalogue=stack.catalogue,
            alerts=stack.alerts,
            storage=stack.storage,
            publish_command=stack.published.append,
            publish_desired=lambda device_id, desired: stack.desired_published.append(
                (device_id, desired)
            ),
            schedule_store=store,
            schedules=service,
        ),
        WebConfig(secret_key=secrets.token_bytes(32), refresh_interval_s=1),
    )
    return store, service


def service_clock() -> FakeClock:
    return FakeClock(datetime(YEAR, 3, 1, 13, 0, tzinfo=UTC))


@dataclass
class Api:
    stack: WebStack
    store: ScheduleStore
    client: FlaskClient
    tech: dict[str, str]
    viewer: dict[str, str]

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> Any:
        if body is not None:
            options["json"] = body
        answer = self.client.open(
            f"/api/v1{path}", method=method, headers=headers or self.tech, **options
        )
        assert answer.status_code == status, answer.get_data(as_text=True)
        return answer.get_json() if answer.is_json else answer.get_data(as_text=True)

    def schedules_of(self, device_id: str) -> list[list[str]]:
        """The window ids of each desired state published to the unit, in order."""
        return [
            [w.window_id for w in desired.schedule or []]
            for unit, desired in self.stack.desired_published
            if unit == device_id
        ]


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[Api]:
    alerts = AlertEngine(db)
    base_url = "http://127.0.0.1:9"  # never served: these tests use the Flask client
    storage = LocalStorage(tmp_path / "objects", base_url, secrets.token_bytes(32))
    stack = WebStack(
        root=tmp_path,
        base_url=base_url,
        port=9,
        db=db,
        alerts=alerts,
        registry=Registry(db, alerts),
        commands=CommandService(db),
        catalogue=Catalogue(db, storage),
        storage=storage,
    )
    store, _ = scheduled(stack, service_clock())
    yield Api(
        stack, store, stack.client(), stack.bearer(Role.TECHNICIAN), stack.bearer(Role.VIEWER)
    )


def lincoln(api: Api, **extra: Any) -> int:
    """A school with a regular bell schedule, its day type, a spring term and Room 204."""
    created = api.call(
        "POST",
        "/scheduling/schools",
        {"name": "Lincoln Middle", "timezone": ZONE, **extra},
        status=201,
    )
    school_id = int(created["id"])
    api.call("PUT", f"/scheduling/schools/{school_id}/bell-schedules/Regular", {"periods": REGULAR})
    api.call(
        "PUT",
        f"/scheduling/schools/{school_id}/day-types",
        {"day_types": [{"name": "Regular", "bell_schedule": "Regular"}]},
    )
    api.call(
        "PUT",
        f"/scheduling/schools/{school_id}/calendar",
        {
            "first_day": day(1, 4),
            "last_day": day(6, 18),
            "default_day_type": "Regular",
            "days": [{"date": HOLIDAY.isoformat(), "holiday": True, "note": "Spring break"}],
        },
    )
    return school_id


def coach_plan(school_id: int, **changes: Any) -> dict[str, Any]:
    return {
        "school_id": school_id,
        "name": "Coaching Ms Rivera",
        "rooms": ["Room 204"],
        "periods": ["Period 2", "Period 5"],
        "first_day": day(3, 3),
        "last_day": day(3, 28),
        "teacher": "Ms Rivera",
        **changes,
    }


# --- the coach's story ---------------------------------------------------------------------------


def test_coach_plan_becomes_windows_on_the_rooms_unit(api: Api) -> None:
    enrol(api.stack, "depot-7", "Depot", "Shelf")
    school_id = lincoln(api)
    school = api.call(
        "PUT", f"/scheduling/schools/{school_id}/rooms/Room 204", {"device_id": "depot-7"}
    )
    assert school["rooms"] == [{"name": "Room 204", "device_id": "depot-7"}]
    unit = api.stack.registry.get("depot-7")
    assert unit is not None and (unit.school, unit.room) == ("Lincoln Middle", "Room 204")

    plan = api.call("POST", "/scheduling/plans", coach_plan(school_id), status=201)
    assert plan["school"] == "Lincoln Middle" and plan["created_by"] == "token:test-technician"

    preview = api.call(
        "GET", f"/scheduling/schools/{school_id}/preview?first={day(3, 1)}&last={day(3, 31)}"
    )
    windows = preview["items"]
    assert len(windows) == 2 * len(PLAN_DAYS)
    assert {w["date"] for w in windows} == {d.isoformat() for d in PLAN_DAYS}
    first = windows[0]
    assert first["window_id"] == f"lincoln-middle.room-204.{FIRST:%Y%m%d}.period-2"
    assert first["device_id"] == "depot-7" and first["teacher"] == "Ms Rivera"
    # Bell times are New York wall-clock times on both sides of the March DST change.
    starts = {datetime.fromisoformat(w["start"]).astimezone(NEW_YORK) for w in windows}
    assert {(s.hour, s.minute) for s in starts} == {(8, 55), (12, 15)}
    assert datetime.fromisoformat(first["start"]) == datetime.combine(FIRST, time(8, 55), NEW_YORK)

    # The unit had its windows pushed when the plan was stored, without waiting.
    pushed = api.schedules_of("depot-7")
    assert pushed and pushed[-1][0] == first["window_id"]

    timeline = api.call(
        "GET", f"/scheduling/schools/{school_id}/timeline?first={day(3, 1)}&last={day(3, 31)}"
    )
    assert timeline["timezone"] == ZONE
    assert [e["window_id"] for e in timeline["items"]] == [w["window_id"] for w in windows]
    assert {e["status"] for e in timeline["items"]} == {"planned"}

    ics = api.client.get("/api/v1/devices/depot-7/captures.ics", headers=api.viewer)
    assert ics.status_code == 200 and ics.mimetype == "text/calendar"
    text = ics.get_data(as_text=True)
    assert f"UID:{first['window_id']}@classcap" in text and text.count("BEGIN:VEVENT") >= 2
    assert api.call("GET", "/devices/nobody/captures.ics", status=404)["error"] == "unknown unit"


def test_bell_schedule_change_moves_every_window(api: Api) -> None:
    enrol(api.stack, "lin-204", "Lincoln Middle", "Room 204")
    school_id = lincoln(api)  # the room comes from the enrolled unit
    api.call("POST", "/scheduling/plans", coach_plan(school_id), status=201)
    later = [dict(p, start="09:00", end="09:50") if p["name"] == "Period 2" else p for p in REGULAR]
    api.call("PUT", f"/scheduling/schools/{school_id}/bell-schedules/Regular", {"periods": later})
    windows = api.call(
        "GET", f"/scheduling/schools/{school_id}/preview?first={FIRST}&last={FIRST}"
    )["items"]
    assert datetime.fromisoformat(windows[0]["start"]) == datetime.combine(
        FIRST, time(9, 0), NEW_YORK
    )
    assert len(api.schedules_of("lin-204")) == 2  # the plan, then the new bell times


def test_unit_taken_out_of_its_room_loses_its_windows(api: Api) -> None:
    enrol(api.stack, "lin-204", "Lincoln Middle", "Room 204")
    school_id = lincoln(api)
    api.call("POST", "/scheduling/plans", coach_plan(school_id), status=201)
    assert api.schedules_of("lin-204")[-1]
    api.call("PUT", f"/scheduling/schools/{school_id}/rooms/Room 204", {"device_id": None})
    assert api.schedules_of("lin-204")[-1] == []


def test_rename_follows_into_plans_and_delete_needs_no_plans(api: Api) -> None:
    school_id = lincoln(api)
    api.call("PUT", f"/scheduling/schools/{school_id}/rooms/Room 204", {})
    plan = api.call("POST", "/scheduling/plans", coach_plan(school_id), status=201)
    api.call("PUT", f"/scheduling/schools/{school_id}", {"name": "Lincoln Academy"})
    assert api.call("GET", f"/scheduling/plans/{plan['id']}")["school"] == "Lincoln Academy"
    listed = api.call("GET", f"/scheduling/plans?school_id={school_id}")["items"]
    assert [p["id"] for p in listed] == [plan["id"]]

    refused = api.call("DELETE", f"/scheduling/schools/{school_id}", status=409)
    assert "plan" in refused["detail"]
    in_use = api.call("DELETE", f"/scheduling/schools/{school_id}/rooms/Room 204", status=409)
    assert "Coaching Ms Rivera" in in_use["detail"]
    api.call("DELETE", f"/scheduling/plans/{plan['id']}")
    api.call("DELETE", f"/scheduling/schools/{school_id}")
    api.call("GET", f"/scheduling/schools/{school_id}", status=404)
    assert api.call("GET", "/scheduling/schools")["items"] == []


def test_plan_edits_and_what_a_plan_may_name(api: Api) -> None:
    school_id = lincoln(api)
    api.call("PUT", f"/scheduling/schools/{school_id}/rooms/Room 204", {})
    plan = api.call("POST", "/scheduling/plans", coach_plan(school_id), status=201)
    body = {k: v for k, v in coach_plan(school_id).items() if k != "school_id"}
    edited = api.call(
        "PUT",
        f"/scheduling/plans/{plan['id']}",
        {**body, "periods": ["Period 1"], "pre_roll_s": 120},
    )
    assert edited["periods"] == ["Period 1"] and edited["pre_roll_s"] == 120

    wrong = api.call(
        "POST",
        "/scheduling/plans",
        coach_plan(school_id, name="Other", rooms=["Room 999"], periods=["Period 9"]),
        status=422,
    )
    assert "Room 999" in wrong["detail"] and "Period 9" in wrong["detail"]
    twice = api.call("POST", "/scheduling/plans", coach_plan(school_id), status=409)
    assert "Coaching Ms Rivera" in twice["detail"]
    backwards = api.call(
        "POST",
        "/scheduling/plans",
        coach_plan(school_id, name="Backwards", first_day=day(3, 28), last_day=day(3, 3)),
        status=422,
    )
    assert "before" in str(backwards["detail"])
    assert api.call("POST", "/scheduling/plans", coach_plan(999), status=404)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/scheduling/schools", "{not json", 400, "JSON"),
        ("POST", "/scheduling/schools", {"name": 7, "timezone": ZONE}, 422, "name"),
        (
            "POST",
            "/scheduling/schools",
            {"name": "X", "timezone": ZONE, "colour": 1},
            422,
            "colour",
        ),
        ("POST", "/scheduling/schools", {"name": "X", "timezone": "Mars/Olympus"}, 422, "timezone"),
        (
            "PUT",
            "/scheduling/schools/{id}/bell-schedules/Regular",
            {"periods": [REGULAR[0], {"name": "Late", "start": "08:30", "end": "09:00"}]},
            422,
            "overlap",
        ),
        (
            "PUT",
            "/scheduling/schools/{id}/bell-schedules/Regular",
            {"periods": [{"name": "P1", "start": "09:00", "end": "08:00"}]},
            422,
            "end after it starts",
        ),
        ("PUT", "/scheduling/schools/{id}", {"timezone": "Nowhere/Town"}, 422, "unknown timezone"),
        ("PUT", "/scheduling/schools/{id}", {}, 422, "name, timezone or both"),
        (
            "PUT",
            "/scheduling/schools/{id}/day-types",
            {"day_types": [{"name": "Odd", "bell_schedule": "Missing"}]},
            422,
            "Missing",
        ),
        (
            "PUT",
            "/scheduling/schools/{id}/calendar",
            {"first_day": day(6, 1), "last_day": day(1, 1), "default_day_type": "Regular"},
            422,
            "before its first",
        ),
        ("PUT", "/scheduling/schools/{id}/rooms/Room 1", {"device_id": "ghost-1"}, 422, "ghost-1"),
        (
            "GET",
            "/scheduling/schools/{id}/timeline?first=2030-01-10&last=2030-01-01",
            None,
            422,
            "before",
        ),
        (
            "GET",
            "/scheduling/schools/{id}/timeline?first=2030-01-01&last=2030-03-31",
            None,
            422,
            "62",
        ),
        ("GET", "/scheduling/schools/{id}/preview?first=someday", None, 422, "first"),
    ],
)
def test_bad_requests_say_why_and_change_nothing(
    api: Api, method: str, path: str, body: Any, status: int, says: str
) -> None:
    school_id = lincoln(api)
    before = api.call("GET", f"/scheduling/schools/{school_id}")
    options: dict[str, Any] = (
        {"data": body, "content_type": "application/json"}
        if isinstance(body, str)
        else ({"json": body} if body is not None else {})
    )
    answer = api.client.open(
        "/api/v1" + path.format(id=school_id), method=method, headers=api.tech, **options
    )
    assert answer.status_code == status, answer.get_data(as_text=True)
    error = answer.get_json()
    assert error["error"] and says in str(error["detail"])
    assert api.call("GET", f"/scheduling/schools/{school_id}") == before


def test_deleting_a_bell_schedule_in_use_names_the_day_type(api: Api) -> None:
    school_id = lincoln(api)
    refused = api.call(
        "DELETE", f"/scheduling/schools/{school_id}/bell-schedules/Regular", status=409
    )
    assert "day type 'Regular'" in refused["detail"]
    api.call("DELETE", f"/scheduling/schools/{school_id}/bell-schedules/Nope", status=404)


def test_unknown_ids_are_404(api: Api) -> None:
    for method, path, body in [
        ("GET", "/scheduling/schools/999", None),
        ("PUT", "/scheduling/schools/999", {"name": "X"}),
        ("DELETE", "/scheduling/schools/999", None),
        ("PUT", "/scheduling/schools/999/bell-schedules/Regular", {"periods": REGULAR}),
        ("PUT", "/scheduling/schools/999/rooms/A", {}),
        ("DELETE", "/scheduling/schools/999/calendar", None),
        ("GET", "/scheduling/schools/999/timeline", None),
        ("GET", "/scheduling/schools/999/preview", None),
        ("GET", "/scheduling/plans/999", None),
        ("DELETE", "/scheduling/plans/999", None),
        ("GET", "/scheduling/plans?school_id=999", None),
    ]:
        error = api.call(method, path, body, status=404)
        assert "999" in error["detail"], (method, path)


def test_viewer_reads_but_cannot_write(api: Api) -> None:
    school_id = lincoln(api)
    for method, path, body in [
        ("POST", "/scheduling/schools", {"name": "X", "timezone": ZONE}),
        ("PUT", f"/scheduling/schools/{school_id}/rooms/A", {}),
        ("DELETE", f"/scheduling/schools/{school_id}", None),
        ("POST", "/scheduling/plans", coach_plan(school_id)),
    ]:
        api.call(method, path, body, status=403, headers=api.viewer)
    assert api.call("GET", "/scheduling/schools", headers=api.viewer)["items"][0]["name"] == (
        "Lincoln Middle"
    )
    assert api.call("GET", f"/scheduling/schools/{school_id}", headers=api.viewer)["rooms"] == []


def test_unit_in_another_schools_room_is_a_conflict(api: Api) -> None:
    enrol(api.stack, "lin-204", "Lincoln Middle", "Room 204")
    lincoln(api)
    other = api.call("POST", "/scheduling/schools", {"name": "Oak", "timezone": ZONE}, status=201)
    refused = api.call(
        "PUT", f"/scheduling/schools/{other['id']}/rooms/Gym", {"device_id": "lin-204"}, status=409
    )
    assert "Lincoln Middle" in refused["detail"]


def test_timeline_defaults_to_the_coming_week_in_the_schools_zone(api: Api) -> None:
    school_id = lincoln(api)
    answer = api.call("GET", f"/scheduling/schools/{school_id}/timeline")
    today = datetime.now(UTC).astimezone(NEW_YORK).date()
    # Around local midnight the request may see the next day.
    assert date.fromisoformat(answer["first"]) in (today, today + timedelta(days=1))
    assert date.fromisoformat(answer["last"]) - date.fromisoformat(answer["first"]) == timedelta(
        days=7
    )


# --- imports -------------------------------------------------------------------------------------


def test_import_bell_schedules_from_csv(api: Api) -> None:
    school_id = lincoln(api)
    answer = api.call(
        "POST",
        f"/scheduling/schools/{school_id}/import/bell-schedules",
        data=BELLS_CSV,
        content_type="text/csv",
    )
    assert answer["bell_schedules"] == ["Regular", "Early release"]
    schedules = {b["name"]: b for b in answer["school"]["bell_schedules"]}
    assert [p["name"] for p in schedules["Regular"]["periods"]][3:] == ["Period 4", "Period 5"]
    assert answer["skipped"] == [] and answer["calendar_days"] is None


def test_bad_csv_names_its_line_and_imports_nothing(api: Api) -> None:
    school_id = lincoln(api)
    before = api.call("GET", f"/scheduling/schools/{school_id}")
    bad = BELLS_CSV.replace("Regular,Period 3,09:50,10:40", "Regular,Period 3,10:40,09:50")
    refused = api.call(
        "POST",
        f"/scheduling/schools/{school_id}/import/bell-schedules",
        data=bad,
        content_type="text/csv",
        status=422,
    )
    assert refused["error"] == "import failed"
    assert refused["detail"]["line"] == 4 and "Period 3" in refused["detail"]["reason"]
    assert api.call("GET", f"/scheduling/schools/{school_id}") == before

    for content_type, status in [("application/pdf", 415), ("text/calendar", 422)]:
        api.call(
            "POST",
            f"/scheduling/schools/{school_id}/import/bell-schedules",
            data="BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n",
            content_type=content_type,
            status=status,
        )


def test_import_bell_schedule_from_icalendar_needs_a_name(api: Api) -> None:
    school_id = lincoln(api)
    ics = "\r\n".join(
        [
            "BEGIN:VCALENDAR",
            "VERSION:2.0",
            "PRODID:-//test//EN",
            "BEGIN:VEVENT",
            "UID:p1@test",
            "DTSTAMP:20240101T000000Z",
            "SUMMARY:Period 1",
            "DTSTART;TZID=America/New_York:20240903T080000",
            "DTEND;TZID=America/New_York:20240903T083000",
            "END:VEVENT",
            "END:VCALENDAR",
            "",
        ]
    )
    path = f"/scheduling/schools/{school_id}/import/bell-schedules"
    assert "name" in str(
        api.call("POST", path, data=ics, content_type="text/calendar", status=422)["detail"]
    )
    answer = api.call("POST", f"{path}?name=Exam day", data=ics, content_type="text/calendar")
    assert answer["bell_schedules"] == ["Exam day"]


def test_import_calendar_from_csv_and_icalendar(api: Api) -> None:
    school_id = lincoln(api)
    csv_text = f"date,day_type,note\n{day(3, 16)},holiday,Teacher day\n{day(3, 17)},Regular,\n"
    answer = api.call(
        "POST",
        f"/scheduling/schools/{school_id}/import/calendar",
        data=csv_text,
        content_type="text/csv",
    )
    days = answer["school"]["calendar"]["days"]
    assert [d["date"] for d in days] == [day(3, 16), day(3, 17)]
    assert answer["calendar_days"] == 2

    ics = "\r\n".join(
        [
            "BEGIN:VCALENDAR",
            "VERSION:2.0",
            "PRODID:-//test//EN",
            "BEGIN:VEVENT",
            "UID:break@test",
            "DTSTAMP:20240101T000000Z",
            "SUMMARY:Spring Break - No School",
            f"DTSTART;VALUE=DATE:{YEAR}0405",
            f"DTEND;VALUE=DATE:{YEAR}0406",
            "END:VEVENT",
            "BEGIN:VEVENT",
            "UID:concert@test",
            "DTSTAMP:20240101T000000Z",
            "SUMMARY:Band concert",
            f"DTSTART;VALUE=DATE:{YEAR}0407",
            f"DTEND;VALUE=DATE:{YEAR}0408",
            "END:VEVENT",
            "END:VCALENDAR",
            "",
        ]
    )
    answer = api.call(
        "POST",
        f"/scheduling/schools/{school_id}/import/calendar",
        data=ics,
        content_type="text/calendar",
    )
    assert [d["date"] for d in answer["school"]["calendar"]["days"]] == [day(4, 5)]
    (skipped,) = answer["skipped"]
    assert skipped["summary"] == "Band concert" and skipped["line"] == 11


# --- the rest of the API -------------------------------------------------------------------------


def test_openapi_describes_the_scheduling_routes(api: Api) -> None:
    doc = api.call("GET", "/openapi.json")
    paths = doc["paths"]
    assert paths["/api/v1/scheduling/plans"]["post"]["x-required-role"] == "technician"
    ics = paths["/api/v1/devices/{device_id}/captures.ics"]["get"]
    assert "text/calendar" in ics["responses"]["200"]["content"]
    school = paths["/api/v1/scheduling/schools/{school_id}"]
    assert set(school) == {"get", "put", "delete"}


def test_session_writes_need_the_csrf_token(api: Api) -> None:
    api.stack.user("tess", Role.TECHNICIAN)
    client = api.stack.client()
    token = api.stack.login(client, "tess")
    body = {"name": "Oak", "timezone": ZONE}
    assert client.post("/api/v1/scheduling/schools", json=body).status_code == 400
    answer = client.post("/api/v1/scheduling/schools", json=body, headers={"X-CSRF-Token": token})
    assert answer.status_code == 201


# --- dashboard forms -----------------------------------------------------------------------------


@pytest.fixture
def browser_session(api: Api) -> tuple[FlaskClient, str]:
    api.stack.user("tess", Role.TECHNICIAN)
    client = api.stack.client()
    return client, api.stack.login(client, "tess")


def flashes(html: str) -> list[str]:
    return re.findall(r'<p class="flash flash-\w+" role="status">([^<]*)</p>', html)


def test_dashboard_forms_build_the_coach_plan(
    api: Api, browser_session: tuple[FlaskClient, str]
) -> None:
    client, csrf = browser_session
    enrol(api.stack, "depot-7", "Depot", "Shelf")

    def post(path: str, **form: Any) -> str:
        answer = client.post(path, data={"csrf_token": csrf, **form}, follow_redirects=True)
        assert answer.status_code == 200, answer.get_data(as_text=True)
        return answer.get_data(as_text=True)

    page = post("/schedules", name="Lincoln Middle", timezone=ZONE)
    assert "School Lincoln Middle created" in page
    school_id = api.store.schools()[0].id
    base = f"/schedules/{school_id}"
    post(
        f"{base}/bell-schedules",
        name="Regular",
        periods="\n".join(f"{p['name']}, {p['start']}, {p['end']}" for p in REGULAR),
    )
    post(f"{base}/day-types", name="Regular", bell_schedule="Regular")
    post(
        f"{base}/calendar",
        first_day=day(1, 4),
        last_day=day(6, 18),
        weekdays=["1", "2", "3", "4", "5"],
        default_day_type="Regular",
        rotation="",
    )
    post(f"{base}/calendar/days", date=HOLIDAY.isoformat(), holiday="on", note="Spring break")
    post(f"{base}/rooms", name="Room 204", device_id="depot-7")
    page = post(
        f"{base}/plans",
        name="Coaching",
        rooms=["Room 204"],
        periods=["Period 2", "Period 5"],
        first_day=day(3, 3),
        last_day=day(3, 28),
        pre_roll_min="1",
        post_roll_min="0.5",
        teacher="",
    )
    assert "Plan Coaching created." in flashes(page)
    (plan,) = api.store.plans(school_id)
    assert (plan.plan.pre_roll_s, plan.plan.post_roll_s, plan.plan.teacher) == (60, 30, None)
    assert plan.created_by == "tess"

    page = client.get(f"{base}?first={day(3, 10)}&last={day(3, 20)}").get_data(as_text=True)
    rows = re.findall(r'<tr data-window="([^"]+)" data-status="(\w+)">', page)
    shown = [d for d in PLAN_DAYS if date(YEAR, 3, 10) <= d <= date(YEAR, 3, 20)]
    assert [status for _, status in rows] == ["planned"] * 2 * len(shown)
    assert rows[0][0].endswith(f"{shown[0]:%Y%m%d}.period-2")
    assert "08:54\u201309:45" in page  # a minute of pre-roll, half a minute of post-roll, local


@pytest.mark.parametrize(
    ("path", "form", "says"),
    [
        ("bell-schedules", {"name": "Bad", "periods": "P1, 09:00, 08:00"}, "line 1"),
        ("bell-schedules", {"name": "Bad", "periods": "P1 09:00 08:00"}, "line 1"),
        ("bell-schedules/delete", {"name": "Regular"}, "day type"),
        ("day-types", {"name": "Odd", "bell_schedule": "Missing"}, "Missing"),
        ("calendar/days", {"date": "1999-01-01", "holiday": "on"}, "outside the term"),
        ("rooms", {"name": "Gym", "device_id": "ghost-1"}, "ghost-1"),
        ("plans", {"name": "P", "rooms": ["Nowhere"], "periods": ["Period 1"]}, "first_day"),
        ("settings", {"name": "Lincoln Middle", "timezone": "Mars/Base"}, "unknown timezone"),
        ("delete", {}, ""),
    ],
)
def test_dashboard_shows_refusals_on_the_page(
    api: Api, browser_session: tuple[FlaskClient, str], path: str, form: dict[str, Any], says: str
) -> None:
    client, csrf = browser_session
    school_id = lincoln(api)
    if path == "delete":
        api.call("PUT", f"/scheduling/schools/{school_id}/rooms/Room 204", {})
        api.call("POST", "/scheduling/plans", coach_plan(school_id), status=201)
        says = "plan"
    answer = client.post(
        f"/schedules/{school_id}/{path}",
        data={"csrf_token": csrf, **form},
        follow_redirects=True,
    )
    assert answer.status_code == 200
    (message,) = flashes(answer.get_data(as_text=True))
    assert says in message.replace("&#39;", "'")


def test_dashboard_pages_for_viewers_and_unknown_schools(api: Api) -> None:
    school_id = lincoln(api)
    api.stack.user("val", Role.VIEWER)
    client = api.stack.client()
    api.stack.login(client, "val")
    listing = client.get("/schedules").get_data(as_text=True)
    assert "Lincoln Middle" in listing and "Add a school" not in listing
    page = client.get(f"/schedules/{school_id}")
    assert page.status_code == 200
    assert "Create plan" not in page.get_data(as_text=True)
    assert client.get("/schedules/999").status_code == 404
    assert client.post(f"/schedules/{school_id}/delete").status_code in (400, 403)

"""Dashboard pages for scheduled capture: schools, bell schedules, calendars, rooms, plans and
the timeline of what was and will be recorded.

Forms post and redirect back (post/redirect/get) with the outcome flashed: a refused
edit shows the store's reason on the page instead of failing the request.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from zoneinfo import available_timezones

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from pydantic import ValidationError

from controller.schedule_import import MAX_IMPORT_BYTES, decode_upload
from controller.schedule_service import TimelineEntry
from controller.schedules import (
    ScheduleError,
    ScheduleNotFound,
    revalidated,
    validation_reason,
    with_bell_schedule,
    with_calendar,
    with_day_types,
    with_room,
    without_bell_schedule,
    without_room,
)
from controller.web.auth import Role, requires
from controller.web.errors import ApiError
from controller.web.openapi import parse_query
from controller.web.schedule_api import (
    CSV,
    ICS,
    REFUSALS,
    add_plan,
    add_school,
    change_plan,
    date_range,
    edit_school,
    import_bell_schedules,
    import_calendar,
    remove_plan,
    remove_school,
    schedule_store,
    timeline,
)
from controller.web.schedule_schemas import DateRangeQuery, PlanFieldsIn
from controller.web.services import services
from shared.schedule import (
    BellSchedule,
    CalendarDay,
    DayType,
    Period,
    Room,
    School,
    SchoolCalendar,
)

log = logging.getLogger(__name__)

bp = Blueprint("schedules", __name__, url_prefix="/schedules")

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
STATUS_LABELS = {
    "planned": "planned",
    "recording": "recording",
    "completed": "completed",
    "partial": "partial",
    "missed": "missed",
    "stopped_by_teacher": "stopped by teacher",
}


@functools.cache
def _zones() -> list[str]:
    return sorted(available_timezones())


# --- reading forms -------------------------------------------------------------------------------


def _field(name: str) -> str:
    return request.form.get(name, "").strip()


def _optional(name: str) -> str | None:
    return _field(name) or None


def _minutes(name: str, label: str) -> int:
    raw = _field(name) or "0"
    try:
        return round(float(raw) * 60)
    except ValueError:
        raise ScheduleError(f"{label}: {raw!r} is not a number of minutes") from None


def _periods(text: str) -> list[Period]:
    """One period a line: ``name, start, end`` (e.g. ``Period 2, 08:55, 09:45``)."""
    periods = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            raise ScheduleError(
                f"line {number}: write name, start, end (e.g. Period 1, 08:00, 08:50)"
            )
        try:
            periods.append(
                Period.model_validate(dict(zip(("name", "start", "end"), parts, strict=True)))
            )
        except ValidationError as exc:
            raise ScheduleError(f"line {number}: {reason(exc)}") from None
    return periods


def _minutes_text(seconds: int) -> str:
    return f"{seconds / 60:g}"


def _periods_text(schedule: BellSchedule) -> str:
    return "\n".join(f"{p.name}, {p.start:%H:%M}, {p.end:%H:%M}" for p in schedule.periods)


def _upload() -> tuple[str, str]:
    """The uploaded file as (media type by its name, text)."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise ScheduleError("choose a file")
    kind = ICS if upload.filename.lower().endswith((".ics", ".ical", ".ifb")) else CSV
    return kind, decode_upload(upload.stream.read(MAX_IMPORT_BYTES + 1))


def reason(exc: Exception) -> str:
    """One readable line for a refused edit."""
    if isinstance(exc, ValidationError):
        return validation_reason(exc)
    if isinstance(exc, ApiError):
        return exc.detail if isinstance(exc.detail, str) else exc.error
    return str(exc)


def _attempt(
    anchor: str, action: Callable[[], str], school_id: Callable[[], int | None]
) -> ResponseReturnValue:
    """Runs ``action``, flashes its message or why it was refused, and goes back to the school
    (its id asked after the action, since a deleted plan no longer knows it)."""
    try:
        done = action()
    except (*REFUSALS, ApiError) as exc:
        log.info("schedule edit refused path=%s reason=%s", request.path, reason(exc))
        flash(reason(exc), "error")
    else:
        flash(done, "ok")
    target = school_id()
    if target is None:
        return redirect(url_for("schedules.schools"))
    return redirect(url_for("schedules.school", school_id=target, _anchor=anchor))


def _edit(
    school_id: int, anchor: str, edit: Callable[[School], School], done: str
) -> ResponseReturnValue:
    def action() -> str:
        edit_school(school_id, edit)
        return done

    return _attempt(anchor, action, lambda: school_id)


# --- schools -------------------------------------------------------------------------------------


@bp.get("")
@requires(Role.VIEWER)
def schools() -> ResponseReturnValue:
    store = schedule_store()
    plans: dict[int, int] = {}
    for plan in store.plans():
        plans[plan.school_id] = plans.get(plan.school_id, 0) + 1
    return render_template(
        "schedule_schools.html", records=store.schools(), plans=plans, zones=_zones()
    )


@bp.post("")
@requires(Role.TECHNICIAN)
def create_school() -> ResponseReturnValue:
    created: list[int] = []

    def action() -> str:
        school = School.model_validate({"name": _field("name"), "timezone": _field("timezone")})
        record = add_school(school)
        created.append(record.id)
        return f"School {record.school.name} created with {len(record.school.rooms)} rooms."

    return _attempt("", action, lambda: created[0] if created else None)


@dataclass(frozen=True)
class TimelineRow:
    entry: TimelineEntry
    start: datetime
    end: datetime
    label: str


def _timeline(school_id: int, school: School) -> dict[str, Any]:
    query: DateRangeQuery = parse_query(DateRangeQuery)
    first, last = date_range(school, query.first, query.last)
    rows = None
    if services().schedules is not None:
        zone = school.zone
        rows = [
            TimelineRow(
                e,
                e.start.astimezone(zone),
                e.end.astimezone(zone),
                STATUS_LABELS.get(e.status.value, e.status.value),
            )
            for e in timeline(school_id, school, first, last)
        ]
    return {"first": first, "last": last, "timeline": rows}


def _unit_choices(school: School) -> list[str]:
    """Units enrolled at this school (plus those its rooms have); every unit if it has none."""
    registry = services().registry
    own = set(registry.device_ids(school.name))
    own |= {r.device_id for r in school.rooms if r.device_id is not None}
    return sorted(own) if own else registry.device_ids()


@bp.get("/<int:school_id>")
@requires(Role.VIEWER)
def school(school_id: int) -> ResponseReturnValue:
    store = schedule_store()
    try:
        record = store.school(school_id)
    except ScheduleNotFound as exc:
        raise ApiError(404, "unknown school", str(exc)) from None
    current = record.school
    periods = list(dict.fromkeys(p.name for b in current.bell_schedules for p in b.periods))
    return render_template(
        "schedule_school.html",
        record=record,
        school=current,
        plans=store.plans(school_id),
        periods=periods,
        rotation=current.calendar.rotation if current.calendar else [],
        units=_unit_choices(current),
        zones=_zones(),
        weekdays=WEEKDAYS,
        periods_text=_periods_text,
        minutes=_minutes_text,
        **_timeline(school_id, current),
    )


@bp.post("/<int:school_id>/settings")
@requires(Role.TECHNICIAN)
def school_settings(school_id: int) -> ResponseReturnValue:
    name, zone = _field("name"), _field("timezone")
    return _edit(
        school_id,
        "settings",
        lambda s: revalidated(s, name=name, timezone=zone),
        f"School {name} saved.",
    )


@bp.post("/<int:school_id>/delete")
@requires(Role.TECHNICIAN)
def delete_school(school_id: int) -> ResponseReturnValue:
    deleted: list[bool] = []

    def action() -> str:
        remove_school(school_id)
        deleted.append(True)
        return "School deleted."

    return _attempt("", action, lambda: None if deleted else school_id)


# --- bell schedules and day types ----------------------------------------------------------------


@bp.post("/<int:school_id>/bell-schedules")
@requires(Role.TECHNICIAN)
def save_bell_schedule(school_id: int) -> ResponseReturnValue:
    name = _field("name")

    def edit(current: School) -> School:
        schedule = BellSchedule.model_validate(
            {"name": name, "periods": _periods(request.form.get("periods", ""))}
        )
        return with_bell_schedule(current, schedule)

    return _edit(school_id, "bell-schedules", edit, f"Bell schedule {name} saved.")


@bp.post("/<int:school_id>/bell-schedules/delete")
@requires(Role.TECHNICIAN)
def delete_bell_schedule(school_id: int) -> ResponseReturnValue:
    name = _field("name")
    return _edit(
        school_id,
        "bell-schedules",
        lambda s: without_bell_schedule(s, name),
        f"Bell schedule {name} deleted.",
    )


@bp.post("/<int:school_id>/bell-schedules/import")
@requires(Role.TECHNICIAN)
def import_bell_schedule_file(school_id: int) -> ResponseReturnValue:
    def action() -> str:
        kind, text = _upload()
        imported = import_bell_schedules(school_id, kind, text, _optional("name"))
        names = ", ".join(imported.bell_schedules) or "nothing new"
        return f"Imported bell schedules: {names}."

    return _attempt("bell-schedules", action, lambda: school_id)


@bp.post("/<int:school_id>/day-types")
@requires(Role.TECHNICIAN)
def save_day_type(school_id: int) -> ResponseReturnValue:
    name = _field("name")

    def edit(current: School) -> School:
        day_type = DayType.model_validate({"name": name, "bell_schedule": _field("bell_schedule")})
        others = [d for d in current.day_types if d.name != day_type.name]
        return with_day_types(current, [*others, day_type])

    return _edit(school_id, "day-types", edit, f"Day type {name} saved.")


@bp.post("/<int:school_id>/day-types/delete")
@requires(Role.TECHNICIAN)
def delete_day_type(school_id: int) -> ResponseReturnValue:
    name = _field("name")

    def edit(current: School) -> School:
        return with_day_types(current, [d for d in current.day_types if d.name != name])

    return _edit(school_id, "day-types", edit, f"Day type {name} deleted.")


# --- calendar ------------------------------------------------------------------------------------


@bp.post("/<int:school_id>/calendar")
@requires(Role.TECHNICIAN)
def save_calendar(school_id: int) -> ResponseReturnValue:
    def edit(current: School) -> School:
        calendar = SchoolCalendar.model_validate(
            {
                "first_day": _field("first_day"),
                "last_day": _field("last_day"),
                "weekdays": request.form.getlist("weekdays"),
                "default_day_type": _field("default_day_type"),
                "rotation": [r.strip() for r in _field("rotation").split(",") if r.strip()],
                "days": current.calendar.days if current.calendar else [],
            }
        )
        return with_calendar(current, calendar)

    return _edit(school_id, "calendar", edit, "Calendar saved.")


@bp.post("/<int:school_id>/calendar/delete")
@requires(Role.TECHNICIAN)
def delete_calendar(school_id: int) -> ResponseReturnValue:
    return _edit(school_id, "calendar", lambda s: with_calendar(s, None), "Calendar removed.")


def _with_days(current: School, change: Callable[[list[CalendarDay]], list[CalendarDay]]) -> School:
    if current.calendar is None:
        raise ScheduleError("set the term first")
    calendar = SchoolCalendar.model_validate(
        {**current.calendar.model_dump(), "days": change(list(current.calendar.days))}
    )
    return with_calendar(current, calendar)


@bp.post("/<int:school_id>/calendar/days")
@requires(Role.TECHNICIAN)
def save_calendar_day(school_id: int) -> ResponseReturnValue:
    def edit(current: School) -> School:
        day = CalendarDay.model_validate(
            {
                "date": _field("date"),
                "holiday": request.form.get("holiday") == "on",
                "day_type": _optional("day_type"),
                "rotation": _optional("rotation"),
                "note": _field("note"),
            }
        )
        return _with_days(
            current,
            lambda days: sorted(
                [d for d in days if d.date != day.date] + [day], key=lambda d: d.date
            ),
        )

    return _edit(school_id, "calendar", edit, f"Day {_field('date')} saved.")


@bp.post("/<int:school_id>/calendar/days/delete")
@requires(Role.TECHNICIAN)
def delete_calendar_day(school_id: int) -> ResponseReturnValue:
    text = _field("date")

    def edit(current: School) -> School:
        try:
            when = date.fromisoformat(text)
        except ValueError:
            raise ScheduleError(f"{text!r} is not a date") from None
        return _with_days(current, lambda days: [d for d in days if d.date != when])

    return _edit(school_id, "calendar", edit, f"Day {text} removed.")


@bp.post("/<int:school_id>/calendar/import")
@requires(Role.TECHNICIAN)
def import_calendar_file(school_id: int) -> ResponseReturnValue:
    def action() -> str:
        kind, text = _upload()
        imported = import_calendar(school_id, kind, text)
        assert imported.calendar is not None
        skipped = imported.calendar.skipped
        message = f"Calendar imported: {imported.calendar.days} days."
        if skipped:
            message += " Skipped: " + "; ".join(
                f"line {s.line} {s.summary!r} ({s.reason})" for s in skipped
            )
        return message

    return _attempt("calendar", action, lambda: school_id)


# --- rooms ---------------------------------------------------------------------------------------


@bp.post("/<int:school_id>/rooms")
@requires(Role.TECHNICIAN)
def save_room(school_id: int) -> ResponseReturnValue:
    name = _field("name")

    def edit(current: School) -> School:
        room = Room.model_validate({"name": name, "device_id": _optional("device_id")})
        return with_room(current, room)

    return _edit(school_id, "rooms", edit, f"Room {name} saved.")


@bp.post("/<int:school_id>/rooms/delete")
@requires(Role.TECHNICIAN)
def delete_room(school_id: int) -> ResponseReturnValue:
    name = _field("name")
    return _edit(school_id, "rooms", lambda s: without_room(s, name), f"Room {name} removed.")


# --- plans ---------------------------------------------------------------------------------------


def _plan_fields() -> PlanFieldsIn:
    return PlanFieldsIn.model_validate(
        {
            "name": _field("name"),
            "rooms": request.form.getlist("rooms"),
            "periods": request.form.getlist("periods"),
            "first_day": _field("first_day"),
            "last_day": _field("last_day"),
            "rotation_days": request.form.getlist("rotation_days"),
            "pre_roll_s": _minutes("pre_roll_min", "pre-roll"),
            "post_roll_s": _minutes("post_roll_min", "post-roll"),
            "teacher": _optional("teacher"),
        }
    )


@bp.post("/<int:school_id>/plans")
@requires(Role.TECHNICIAN)
def create_plan(school_id: int) -> ResponseReturnValue:
    def action() -> str:
        record = add_plan(school_id, _plan_fields())
        return f"Plan {record.plan.name} created."

    return _attempt("plans", action, lambda: school_id)


def _plan_school(plan_id: int) -> int | None:
    try:
        return schedule_store().plan(plan_id).school_id
    except REFUSALS:
        return None


@bp.post("/plans/<int:plan_id>")
@requires(Role.TECHNICIAN)
def save_plan(plan_id: int) -> ResponseReturnValue:
    def action() -> str:
        record = change_plan(plan_id, _plan_fields())
        return f"Plan {record.plan.name} saved."

    return _attempt("plans", action, lambda: _plan_school(plan_id))


@bp.post("/plans/<int:plan_id>/delete")
@requires(Role.TECHNICIAN)
def delete_plan(plan_id: int) -> ResponseReturnValue:
    school_id = _plan_school(plan_id)

    def action() -> str:
        remove_plan(plan_id)
        return "Plan deleted."

    return _attempt("plans", action, lambda: school_id)

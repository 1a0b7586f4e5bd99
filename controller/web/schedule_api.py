"""The scheduling API under /api/v1/scheduling, and the edits the dashboard shares with it.

Every successful edit asks the schedule service to recompute the affected units'
windows at once, so a changed bell schedule or plan reaches the units without
waiting for the periodic refresh. A refresh that fails is logged and left to that
periodic refresh: the edit itself is stored either way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import date, timedelta
from typing import ParamSpec, TypeVar

from flask import Response, request
from flask.typing import ResponseReturnValue
from pydantic import ValidationError

from controller.schedule_export import unit_calendar
from controller.schedule_import import (
    MAX_IMPORT_BYTES,
    CalendarImport,
    ImportProblem,
    decode_upload,
    import_bell_schedule_ics,
    import_bell_schedules_csv,
    import_calendar_csv,
    import_calendar_ics,
)
from controller.schedule_service import ScheduleService, TimelineEntry, WindowStatus
from controller.schedules import (
    PlanRecord,
    ScheduleConflict,
    ScheduleError,
    ScheduleNotFound,
    ScheduleStore,
    SchoolRecord,
    revalidated,
    with_bell_schedule,
    with_calendar,
    with_day_types,
    with_room,
    without_bell_schedule,
    without_room,
)
from controller.web.api import table
from controller.web.auth import Role, current_principal
from controller.web.errors import ApiError, validation_detail
from controller.web.schedule_schemas import (
    DEFAULT_RANGE_DAYS,
    MAX_RANGE_DAYS,
    BellScheduleIn,
    DateRangeQuery,
    DayTypesIn,
    ImportOut,
    ImportQuery,
    PlanFieldsIn,
    PlanIn,
    PlanOut,
    PlanQuery,
    PlansOut,
    PreviewOut,
    RoomIn,
    ScheduleSchoolOut,
    ScheduleSchoolsOut,
    SchoolEditIn,
    SkippedOut,
    TimelineEntryOut,
    TimelineOut,
    WindowOut,
    plan_out,
    school_out,
    school_summary,
)
from controller.web.schemas import OkOut
from controller.web.services import services
from shared.clock import utcnow
from shared.schedule import BellSchedule, PlannedWindow, Room, School, SchoolCalendar

log = logging.getLogger(__name__)

CSV = "text/csv"
ICS = "text/calendar"

# What the store and the schedule models refuse; each has an API answer and a readable reason.
REFUSALS = (ScheduleNotFound, ScheduleConflict, ImportProblem, ScheduleError, ValidationError)

P = ParamSpec("P")
R = TypeVar("R")


def refusal(exc: Exception) -> ApiError:
    if isinstance(exc, ScheduleNotFound):
        return ApiError(404, "not found", str(exc))
    if isinstance(exc, ScheduleConflict):
        return ApiError(409, "conflict", str(exc))
    if isinstance(exc, ImportProblem):
        return ApiError(422, "import failed", {"line": exc.line, "reason": exc.reason})
    if isinstance(exc, ValidationError):
        return ApiError(422, "invalid schedule", validation_detail(exc))
    return ApiError(422, "invalid schedule", str(exc))


def _refusals_answered(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def view(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except REFUSALS as exc:
            raise refusal(exc) from None

    return view


def schedule_store() -> ScheduleStore:
    store = services().schedule_store
    if store is None:
        raise ApiError(503, "scheduling not configured", "this controller has no schedule store")
    return store


def schedule_service() -> ScheduleService:
    service = services().schedules
    if service is None:
        raise ApiError(503, "scheduling not running", "this controller has no schedule service")
    return service


# --- edits shared with the dashboard ---------------------------------------------------------


def refresh(school_ids: Iterable[int], devices: Iterable[str] = ()) -> None:
    """Pushes the schools' (and the named units') new windows now, when the service runs."""
    service = services().schedules
    if service is None:
        return
    ids, units = list(school_ids), sorted(set(devices))
    try:
        result = service.refresh(school_ids=ids, devices=units)
    except Exception:
        log.exception("schedule refresh failed, left to the periodic one schools=%s", ids)
        return
    log.info(
        "schedule refreshed schools=%s windows=%d pushed=%s",
        ids,
        result.windows,
        ",".join(result.pushed) or "-",
    )


def _moved_units(before: School, after: School) -> set[str]:
    """Units that left a room or joined one: those that left need their windows withdrawn."""
    old = {(r.name, r.device_id) for r in before.rooms if r.device_id is not None}
    new = {(r.name, r.device_id) for r in after.rooms if r.device_id is not None}
    return {device for _, device in old ^ new if device is not None}


def edit_school(school_id: int, edit: Callable[[School], School]) -> SchoolRecord:
    seen: list[School] = []

    def tracked(current: School) -> School:
        seen.append(current)
        return edit(current)

    record = schedule_store().update_school(school_id, tracked)
    refresh([school_id], _moved_units(seen[-1], record.school) if seen else ())
    log.info("school edited school_id=%d name=%s by=%s", school_id, record.school.name, _by())
    return record


def add_school(school: School) -> SchoolRecord:
    record = schedule_store().create_school(school)
    refresh([record.id])
    log.info("school created school_id=%d name=%s by=%s", record.id, school.name, _by())
    return record


def remove_school(school_id: int) -> None:
    store = schedule_store()
    units = {r.device_id for r in store.school(school_id).school.rooms if r.device_id}
    store.delete_school(school_id)
    refresh([], units)
    log.info("school deleted school_id=%d by=%s", school_id, _by())


def add_plan(school_id: int, given: PlanFieldsIn) -> PlanRecord:
    store = schedule_store()
    plan = given.plan(store.school(school_id).school.name)
    record = store.create_plan(school_id, plan, _by())
    refresh([school_id])
    log.info("plan created plan_id=%d school_id=%d by=%s", record.id, school_id, _by())
    return record


def change_plan(plan_id: int, given: PlanFieldsIn) -> PlanRecord:
    store = schedule_store()
    record = store.update_plan(plan_id, given.plan(store.plan(plan_id).plan.school))
    refresh([record.school_id])
    log.info("plan edited plan_id=%d by=%s", plan_id, _by())
    return record


def remove_plan(plan_id: int) -> None:
    store = schedule_store()
    school_id = store.plan(plan_id).school_id
    store.delete_plan(plan_id)
    refresh([school_id])
    log.info("plan deleted plan_id=%d by=%s", plan_id, _by())


@dataclass(frozen=True)
class Imported:
    record: SchoolRecord
    bell_schedules: list[str]
    calendar: CalendarImport | None = None


def import_bell_schedules(school_id: int, kind: str, text: str, name: str | None) -> Imported:
    """``kind`` is CSV or ICS; an iCalendar file holds one bell schedule, called ``name``."""
    if kind == ICS and name is None:
        raise ApiError(422, "name required", "name the bell schedule the iCalendar file holds")
    before: list[School] = []

    def imported(current: School) -> School:
        before.append(current)
        if kind == ICS:
            assert name is not None
            return import_bell_schedule_ics(current, text, name)
        return import_bell_schedules_csv(current, text)

    record = edit_school(school_id, imported)
    changed = [b.name for b in record.school.bell_schedules if b not in before[-1].bell_schedules]
    return Imported(record, changed)


def import_calendar(school_id: int, kind: str, text: str) -> Imported:
    result: list[CalendarImport] = []

    def imported(current: School) -> School:
        found = (
            import_calendar_ics(current, text)
            if kind == ICS
            else import_calendar_csv(current, text)
        )
        result.append(found)
        return found.school

    return Imported(edit_school(school_id, imported), [], result[-1])


def date_range(school: School, first: date | None, last: date | None) -> tuple[date, date]:
    """The asked range, by default today (in the school's zone) and the week after."""
    if first is None:
        today = utcnow().astimezone(school.zone).date()
        first = last - timedelta(days=DEFAULT_RANGE_DAYS) if last else today
    if last is None:
        last = first + timedelta(days=DEFAULT_RANGE_DAYS)
    if last < first:
        raise ApiError(422, "invalid range", "last is before first")
    if (last - first).days >= MAX_RANGE_DAYS:
        raise ApiError(422, "invalid range", f"ask for at most {MAX_RANGE_DAYS} days at once")
    return first, last


def timeline(school_id: int, school: School, first: date, last: date) -> list[TimelineEntry]:
    """What was and will be recorded: the stored windows with their outcome, and the plans'
    windows from today on that are beyond the horizon pushed to units so far (planned)."""
    service = schedule_service()
    entries = service.timeline(school_id, first, last)
    today = utcnow().astimezone(school.zone).date()
    if last >= today:
        known = {e.window_id for e in entries}
        entries += [
            TimelineEntry(
                **{f.name: getattr(w, f.name) for f in fields(PlannedWindow)},
                status=WindowStatus.PLANNED,
                recording_id=None,
                reason=None,
            )
            for w in service.preview(school_id, max(first, today), last)
            if w.window_id not in known
        ]
    return sorted(entries, key=lambda e: (e.start, e.room))


def _by() -> str | None:
    principal = current_principal()
    return principal.name if principal is not None else None


# --- schools -----------------------------------------------------------------------------------


@table.route(
    "GET",
    "/scheduling/schools",
    summary="Schools with bell schedules, calendars and rooms, by name",
    access=Role.VIEWER,
    response=ScheduleSchoolsOut,
)
def scheduling_schools() -> ScheduleSchoolsOut:
    return ScheduleSchoolsOut(items=[school_summary(r) for r in schedule_store().schools()])


@table.route(
    "POST",
    "/scheduling/schools",
    summary="Create a school; without rooms, its enrolled units' rooms are taken",
    access=Role.TECHNICIAN,
    body=School,
    response=ScheduleSchoolOut,
    status=201,
    errors=(400, 409, 415),
)
@_refusals_answered
def create_scheduling_school(body: School) -> ScheduleSchoolOut:
    return school_out(add_school(body))


@table.route(
    "GET",
    "/scheduling/schools/<int:school_id>",
    summary="One school's whole schedule document",
    access=Role.VIEWER,
    response=ScheduleSchoolOut,
    errors=(404,),
)
@_refusals_answered
def get_scheduling_school(school_id: int) -> ScheduleSchoolOut:
    return school_out(schedule_store().school(school_id))


@table.route(
    "PUT",
    "/scheduling/schools/<int:school_id>",
    summary="Rename a school or change its timezone",
    access=Role.TECHNICIAN,
    body=SchoolEditIn,
    response=ScheduleSchoolOut,
    errors=(400, 404, 409, 415),
)
@_refusals_answered
def edit_scheduling_school(school_id: int, body: SchoolEditIn) -> ScheduleSchoolOut:
    changes = body.model_dump(exclude_none=True)
    return school_out(edit_school(school_id, lambda school: revalidated(school, **changes)))


@table.route(
    "DELETE",
    "/scheduling/schools/<int:school_id>",
    summary="Delete a school that has no plans",
    access=Role.TECHNICIAN,
    response=OkOut,
    errors=(404, 409),
)
@_refusals_answered
def delete_scheduling_school(school_id: int) -> OkOut:
    remove_school(school_id)
    return OkOut()


@table.route(
    "PUT",
    "/scheduling/schools/<int:school_id>/bell-schedules/<path:name>",
    summary="Add or replace a bell schedule",
    access=Role.TECHNICIAN,
    body=BellScheduleIn,
    response=ScheduleSchoolOut,
    errors=(400, 404, 409, 415),
)
@_refusals_answered
def put_bell_schedule(school_id: int, name: str, body: BellScheduleIn) -> ScheduleSchoolOut:
    schedule = BellSchedule(name=name, periods=body.periods)
    return school_out(edit_school(school_id, lambda s: with_bell_schedule(s, schedule)))


@table.route(
    "DELETE",
    "/scheduling/schools/<int:school_id>/bell-schedules/<path:name>",
    summary="Delete a bell schedule no day type uses",
    access=Role.TECHNICIAN,
    response=ScheduleSchoolOut,
    errors=(404, 409),
)
@_refusals_answered
def delete_bell_schedule(school_id: int, name: str) -> ScheduleSchoolOut:
    return school_out(edit_school(school_id, lambda s: without_bell_schedule(s, name)))


@table.route(
    "PUT",
    "/scheduling/schools/<int:school_id>/day-types",
    summary="Replace the school's day types",
    access=Role.TECHNICIAN,
    body=DayTypesIn,
    response=ScheduleSchoolOut,
    errors=(400, 404, 409, 415),
)
@_refusals_answered
def put_day_types(school_id: int, body: DayTypesIn) -> ScheduleSchoolOut:
    return school_out(edit_school(school_id, lambda s: with_day_types(s, body.day_types)))


@table.route(
    "PUT",
    "/scheduling/schools/<int:school_id>/calendar",
    summary="Set the school's calendar (term, weekdays, day types, rotation, exception days)",
    access=Role.TECHNICIAN,
    body=SchoolCalendar,
    response=ScheduleSchoolOut,
    errors=(400, 404, 409, 415),
)
@_refusals_answered
def put_calendar(school_id: int, body: SchoolCalendar) -> ScheduleSchoolOut:
    return school_out(edit_school(school_id, lambda s: with_calendar(s, body)))


@table.route(
    "DELETE",
    "/scheduling/schools/<int:school_id>/calendar",
    summary="Remove the school's calendar: no school days, so nothing is recorded",
    access=Role.TECHNICIAN,
    response=ScheduleSchoolOut,
    errors=(404, 409),
)
@_refusals_answered
def delete_calendar(school_id: int) -> ScheduleSchoolOut:
    return school_out(edit_school(school_id, lambda s: with_calendar(s, None)))


@table.route(
    "PUT",
    "/scheduling/schools/<int:school_id>/rooms/<path:name>",
    summary="Add a room or change the unit assigned to it (null: none)",
    access=Role.TECHNICIAN,
    body=RoomIn,
    response=ScheduleSchoolOut,
    errors=(400, 404, 409, 415),
)
@_refusals_answered
def put_room(school_id: int, name: str, body: RoomIn) -> ScheduleSchoolOut:
    room = Room(name=name, device_id=body.device_id)
    return school_out(edit_school(school_id, lambda s: with_room(s, room)))


@table.route(
    "DELETE",
    "/scheduling/schools/<int:school_id>/rooms/<path:name>",
    summary="Remove a room that no plan names",
    access=Role.TECHNICIAN,
    response=ScheduleSchoolOut,
    errors=(404, 409),
)
@_refusals_answered
def delete_room(school_id: int, name: str) -> ScheduleSchoolOut:
    return school_out(edit_school(school_id, lambda s: without_room(s, name)))


# --- imports -----------------------------------------------------------------------------------


def _uploaded() -> tuple[str, str]:
    """The request body as (media type, text)."""
    kind = request.mimetype
    if kind not in (CSV, ICS):
        raise ApiError(415, "unsupported media type", f"send the file as {CSV} or {ICS}")
    # One byte more than allowed is enough for decode_upload to refuse an oversized file.
    return kind, decode_upload(request.stream.read(MAX_IMPORT_BYTES + 1))


def import_out(imported: Imported) -> ImportOut:
    calendar = imported.calendar
    return ImportOut(
        school=school_out(imported.record),
        bell_schedules=imported.bell_schedules,
        calendar_days=calendar.days if calendar else None,
        skipped=[SkippedOut.model_validate(s) for s in calendar.skipped] if calendar else [],
    )


@table.route(
    "POST",
    "/scheduling/schools/<int:school_id>/import/bell-schedules",
    summary="Import bell schedules: a text/csv body, or a text/calendar one with ?name=",
    access=Role.TECHNICIAN,
    query=ImportQuery,
    response=ImportOut,
    errors=(404, 409, 415),
    files=(CSV, ICS),
)
@_refusals_answered
def import_bell_schedules_file(school_id: int, query: ImportQuery) -> ImportOut:
    kind, text = _uploaded()
    return import_out(import_bell_schedules(school_id, kind, text, query.name))


@table.route(
    "POST",
    "/scheduling/schools/<int:school_id>/import/calendar",
    summary="Import the calendar from a text/csv or text/calendar body",
    access=Role.TECHNICIAN,
    response=ImportOut,
    errors=(404, 409, 415),
    files=(CSV, ICS),
)
@_refusals_answered
def import_calendar_file(school_id: int) -> ImportOut:
    kind, text = _uploaded()
    return import_out(import_calendar(school_id, kind, text))


# --- what will be and was recorded ----------------------------------------------------------------


@table.route(
    "GET",
    "/scheduling/schools/<int:school_id>/timeline",
    summary="Capture windows of a date range with their status (at most 62 days)",
    access=Role.VIEWER,
    query=DateRangeQuery,
    response=TimelineOut,
    errors=(404,),
)
@_refusals_answered
def school_timeline(school_id: int, query: DateRangeQuery) -> TimelineOut:
    school = schedule_store().school(school_id).school
    first, last = date_range(school, query.first, query.last)
    entries = timeline(school_id, school, first, last)
    return TimelineOut(
        school_id=school_id,
        timezone=school.timezone,
        first=first,
        last=last,
        items=[TimelineEntryOut.model_validate(e) for e in entries],
    )


@table.route(
    "GET",
    "/scheduling/schools/<int:school_id>/preview",
    summary="The windows the school's plans give in a date range, without storing them",
    access=Role.VIEWER,
    query=DateRangeQuery,
    response=PreviewOut,
    errors=(404,),
)
@_refusals_answered
def school_preview(school_id: int, query: DateRangeQuery) -> PreviewOut:
    school = schedule_store().school(school_id).school
    first, last = date_range(school, query.first, query.last)
    windows = schedule_service().preview(school_id, first, last)
    return PreviewOut(
        school_id=school_id,
        first=first,
        last=last,
        items=[WindowOut.model_validate(w) for w in windows],
    )


@table.route(
    "GET",
    "/devices/<device_id>/captures.ics",
    summary="The unit's upcoming scheduled captures as iCalendar",
    access=Role.VIEWER,
    media_type=ICS,
    errors=(404,),
)
@_refusals_answered
def device_captures(device_id: str) -> ResponseReturnValue:
    if not services().registry.known(device_id):
        raise ApiError(404, "unknown unit", f"no unit {device_id!r}")
    text = unit_calendar(device_id, schedule_service().upcoming(device_id), utcnow())
    response = Response(text, mimetype=ICS)
    response.headers["Content-Disposition"] = f'inline; filename="{device_id}-captures.ics"'
    response.cache_control.no_cache = True
    return response


# --- plans -------------------------------------------------------------------------------------


@table.route(
    "GET",
    "/scheduling/plans",
    summary="Capture plans, of one school or all",
    access=Role.VIEWER,
    query=PlanQuery,
    response=PlansOut,
    errors=(404,),
)
@_refusals_answered
def list_plans(query: PlanQuery) -> PlansOut:
    return PlansOut(items=[plan_out(r) for r in schedule_store().plans(query.school_id)])


@table.route(
    "POST",
    "/scheduling/plans",
    summary="Plan captures: rooms, periods, a date range, optional rotation days and rolls",
    access=Role.TECHNICIAN,
    body=PlanIn,
    response=PlanOut,
    status=201,
    errors=(400, 404, 409, 415),
)
@_refusals_answered
def create_plan(body: PlanIn) -> PlanOut:
    given = PlanFieldsIn.model_validate(body.model_dump(exclude={"school_id"}))
    return plan_out(add_plan(body.school_id, given))


@table.route(
    "GET",
    "/scheduling/plans/<int:plan_id>",
    summary="One capture plan",
    access=Role.VIEWER,
    response=PlanOut,
    errors=(404,),
)
@_refusals_answered
def get_plan(plan_id: int) -> PlanOut:
    return plan_out(schedule_store().plan(plan_id))


@table.route(
    "PUT",
    "/scheduling/plans/<int:plan_id>",
    summary="Replace a capture plan (its school stays)",
    access=Role.TECHNICIAN,
    body=PlanFieldsIn,
    response=PlanOut,
    errors=(400, 404, 409, 415),
)
@_refusals_answered
def put_plan(plan_id: int, body: PlanFieldsIn) -> PlanOut:
    return plan_out(change_plan(plan_id, body))


@table.route(
    "DELETE",
    "/scheduling/plans/<int:plan_id>",
    summary="Delete a capture plan; its future windows are withdrawn from the units",
    access=Role.TECHNICIAN,
    response=OkOut,
    errors=(404,),
)
@_refusals_answered
def delete_plan(plan_id: int) -> OkOut:
    remove_plan(plan_id)
    return OkOut()

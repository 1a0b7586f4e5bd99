"""Request and response bodies of the scheduling API (schools, bell schedules, plans, timeline).

School content itself is the shared model (``shared.schedule``), so the API validates
exactly what the store keeps and the OpenAPI document shows the same rules.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from controller.schedules import PlanRecord, SchoolRecord
from shared.schedule import (
    MAX_ROLL_S,
    BellSchedule,
    CapturePlan,
    DayType,
    Name,
    Period,
    Room,
    SchoolCalendar,
)

# The longest timeline or preview one request may ask for.
MAX_RANGE_DAYS = 62
DEFAULT_RANGE_DAYS = 7


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


# --- query parameters --------------------------------------------------------------------


class DateRangeQuery(_In):
    first: Annotated[date, Field(description="first local date; default today")] | None = None
    last: (
        Annotated[date, Field(description=f"last local date; default first + {DEFAULT_RANGE_DAYS}")]
        | None
    ) = None


class PlanQuery(_In):
    school_id: Annotated[int, Field(ge=1)] | None = None


class ImportQuery(_In):
    name: Annotated[Name, Field(description="bell schedule name (iCalendar files only)")] | None = (
        None
    )


# --- request bodies ---------------------------------------------------------------------------


class SchoolEditIn(_In):
    name: Name | None = None
    timezone: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _something(self) -> SchoolEditIn:
        if self.name is None and self.timezone is None:
            raise ValueError("give name, timezone or both")
        return self


class BellScheduleIn(_In):
    periods: Annotated[list[Period], Field(min_length=1, max_length=30)]


class DayTypesIn(_In):
    day_types: list[DayType]


class RoomIn(_In):
    device_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class PlanFieldsIn(_In):
    """A capture plan as a caller gives it; its school comes from the school id."""

    name: Name
    rooms: Annotated[list[Name], Field(min_length=1, max_length=500)]
    periods: Annotated[list[Name], Field(min_length=1, max_length=30)]
    first_day: date
    last_day: date
    rotation_days: list[Name] = Field(default_factory=list)
    pre_roll_s: Annotated[int, Field(ge=0, le=MAX_ROLL_S)] = 0
    post_roll_s: Annotated[int, Field(ge=0, le=MAX_ROLL_S)] = 0
    teacher: Annotated[str, Field(max_length=120)] | None = None

    def plan(self, school: str) -> CapturePlan:
        """Raises pydantic's ValidationError for what only the whole plan can check."""
        return CapturePlan.model_validate({**self.model_dump(), "school": school})


class PlanIn(PlanFieldsIn):
    school_id: Annotated[int, Field(ge=1)]


# --- responses -----------------------------------------------------------------------------------


class ScheduleSchoolSummaryOut(BaseModel):
    id: int
    name: str
    timezone: str
    rooms: int
    units: int
    bell_schedules: list[str]
    has_calendar: bool
    updated_at: datetime


class ScheduleSchoolsOut(BaseModel):
    items: list[ScheduleSchoolSummaryOut]


class ScheduleSchoolOut(BaseModel):
    id: int
    name: str
    timezone: str
    bell_schedules: list[BellSchedule]
    day_types: list[DayType]
    calendar: SchoolCalendar | None
    rooms: list[Room]
    created_at: datetime
    updated_at: datetime


class PlanOut(_Out):
    id: int
    school_id: int
    school: str
    name: str
    rooms: list[str]
    periods: list[str]
    first_day: date
    last_day: date
    rotation_days: list[str]
    pre_roll_s: int
    post_roll_s: int
    teacher: str | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime


class PlansOut(BaseModel):
    items: list[PlanOut]


class WindowOut(_Out):
    window_id: str
    school: str
    room: str
    device_id: str | None
    date: date
    period: str
    start: datetime
    end: datetime
    title: str
    teacher: str | None
    plans: list[str]


class PreviewOut(BaseModel):
    school_id: int
    first: date
    last: date
    items: list[WindowOut]


class TimelineEntryOut(WindowOut):
    status: Annotated[
        str,
        Field(description="planned, recording, completed, partial, missed or stopped_by_teacher"),
    ]
    recording_id: str | None
    reason: str | None


class TimelineOut(BaseModel):
    school_id: int
    timezone: str
    first: date
    last: date
    items: list[TimelineEntryOut]


class SkippedOut(_Out):
    line: int
    summary: str
    reason: str


class ImportOut(BaseModel):
    school: ScheduleSchoolOut
    bell_schedules: Annotated[list[str], Field(description="bell schedules added or changed")]
    calendar_days: Annotated[
        int | None, Field(description="exception days in the imported calendar")
    ]
    skipped: list[SkippedOut]


def school_out(record: SchoolRecord) -> ScheduleSchoolOut:
    school = record.school
    return ScheduleSchoolOut(
        id=record.id,
        name=school.name,
        timezone=school.timezone,
        bell_schedules=school.bell_schedules,
        day_types=school.day_types,
        calendar=school.calendar,
        rooms=school.rooms,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def school_summary(record: SchoolRecord) -> ScheduleSchoolSummaryOut:
    school = record.school
    return ScheduleSchoolSummaryOut(
        id=record.id,
        name=school.name,
        timezone=school.timezone,
        rooms=len(school.rooms),
        units=sum(1 for room in school.rooms if room.device_id is not None),
        bell_schedules=[b.name for b in school.bell_schedules],
        has_calendar=school.calendar is not None,
        updated_at=record.updated_at,
    )


def plan_out(record: PlanRecord) -> PlanOut:
    return PlanOut(
        **record.plan.model_dump(),
        id=record.id,
        school_id=record.school_id,
        created_by=record.created_by,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )

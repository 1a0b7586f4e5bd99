"""The controller's state as SQLAlchemy 2 models; the schema itself is owned by the Alembic
migrations in ``controller/migrations`` (a test checks the two agree)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# Named constraints let later migrations (SQLite's batch mode included) find them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_OPEN = text("cleared_at IS NULL")
_MANIFEST_PENDING = text("revision > manifest_revision")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    school: Mapped[str] = mapped_column(String(200))
    room: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]
    # presence: the highest epoch seen wins (a stale will never marks a live unit offline)
    online: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=-1)
    online_changed_at: Mapped[datetime | None]
    last_seen_at: Mapped[datetime | None]
    agent_version: Mapped[str | None] = mapped_column(String(64))
    capabilities: Mapped[list[Any]] = mapped_column(default=list)
    # latest health
    state: Mapped[str | None] = mapped_column(String(16), index=True)
    recording_id: Mapped[str | None] = mapped_column(String(128))
    health: Mapped[dict[str, Any] | None]
    health_at: Mapped[datetime | None]
    # desired / reported
    desired_version: Mapped[int] = mapped_column(Integer, default=0)
    desired: Mapped[dict[str, Any] | None]
    reported_version: Mapped[int] = mapped_column(Integer, default=0)
    reported_error: Mapped[str | None] = mapped_column(Text)
    # latest snapshot
    snapshot_jpeg: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    snapshot_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_devices_school_room", "school", "room"),)


class HealthSample(Base):
    __tablename__ = "health_samples"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[datetime]
    data: Mapped[dict[str, Any]]

    __table_args__ = (Index("ix_health_device_ts", "device_id", "ts"),)


class Alert(Base):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    raised_at: Mapped[datetime]
    cleared_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_alerts_open", "device_id", "kind", "cleared_at"),
        Index("ix_alerts_raised", "raised_at"),
        # at most one open alert of a kind per unit, whichever controller raises it
        Index(
            "uq_alerts_open_kind",
            "device_id",
            "kind",
            unique=True,
            sqlite_where=_OPEN,
            postgresql_where=_OPEN,
        ),
    )


class CommandRecord(Base):
    __tablename__ = "commands"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # queued → sent → accepted → done / failed / rejected / expired
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    accepted_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    recording_id: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (Index("ix_commands_device_created", "device_id", "created_at"),)


class Recording(Base):
    __tablename__ = "recordings"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # No foreign key: recordings outlive the unit that made them (school and room are copied).
    device_id: Mapped[str] = mapped_column(String(63))
    school: Mapped[str] = mapped_column(String(200), index=True)
    room: Mapped[str] = mapped_column(String(200))
    # None until the unit's manifest arrives (a segment may be announced first)
    trigger: Mapped[str | None] = mapped_column(String(16))
    window_id: Mapped[str | None] = mapped_column(String(128), index=True)
    started_at: Mapped[datetime] = mapped_column(index=True)
    ended_at: Mapped[datetime | None]
    # recording / complete / partial / interrupted, as the unit reports it
    status: Mapped[str] = mapped_column(String(16))
    end_reason: Mapped[str | None] = mapped_column(String(16))
    bookmarks: Mapped[list[Any]] = mapped_column(default=list)
    gaps: Mapped[list[Any]] = mapped_column(default=list)
    video: Mapped[str | None] = mapped_column(String(32))
    audio: Mapped[str | None] = mapped_column(String(32))
    segments_reported: Mapped[int] = mapped_column(Integer, default=0)
    manifest_key: Mapped[str | None] = mapped_column(String(512))
    # bumped on every change; the manifest in storage is current when the two agree
    revision: Mapped[int] = mapped_column(Integer, default=0)
    manifest_revision: Mapped[int] = mapped_column(Integer, default=0)

    segments: Mapped[list[Segment]] = relationship(
        back_populates="recording", order_by="Segment.sequence", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("ix_recordings_device_started", "device_id", "started_at"),
        Index(
            "ix_recordings_manifest_pending",
            "id",
            sqlite_where=_MANIFEST_PENDING,
            postgresql_where=_MANIFEST_PENDING,
        ),
    )


class Segment(Base):
    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    recording_id: Mapped[str] = mapped_column(ForeignKey("recordings.id", ondelete="CASCADE"))
    sequence: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(512), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime]
    recovered: Mapped[bool] = mapped_column(Boolean, default=False)
    # announced → granted → uploaded → stored
    state: Mapped[str] = mapped_column(String(16), index=True)
    grants: Mapped[int] = mapped_column(Integer, default=0)
    announced_at: Mapped[datetime]
    stored_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)

    recording: Mapped[Recording] = relationship(back_populates="segments")

    __table_args__ = (UniqueConstraint("recording_id", "sequence", name="uq_segment_seq"),)


class DeviceEvent(Base):
    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(40))
    severity: Mapped[str] = mapped_column(String(16))
    recording_id: Mapped[str | None] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (Index("ix_events_device_ts", "device_id", "ts"),)


class User(Base):
    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(200), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    # sha256 of the secret; the secret itself is shown once at creation
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class SchoolRow(Base):
    """One school as a single validated ``shared.schedule.School`` document, so an edit
    revalidates the whole aggregate and its references never dangle."""

    __tablename__ = "schools"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    document: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class CapturePlanRow(Base):
    __tablename__ = "capture_plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # RESTRICT: a school's plans are deleted deliberately, never along with it.
    school_id: Mapped[int] = mapped_column(ForeignKey("schools.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(200))
    document: Mapped[dict[str, Any]]
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("school_id", "name"),)


class CaptureWindowRow(Base):
    """A window of the rolling horizon as last expanded; rows a recording points to stay as
    history after their window is gone from the plans."""

    __tablename__ = "capture_windows"

    window_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    school_id: Mapped[int] = mapped_column(ForeignKey("schools.id", ondelete="CASCADE"))
    # No foreign key, like recordings: the history outlives the unit.
    device_id: Mapped[str | None] = mapped_column(String(63))
    room: Mapped[str] = mapped_column(String(200))
    date: Mapped[date] = mapped_column(Date)
    period: Mapped[str] = mapped_column(String(200))
    start: Mapped[datetime]
    end: Mapped[datetime]
    title: Mapped[str] = mapped_column(Text)
    teacher: Mapped[str | None] = mapped_column(String(200))
    plans: Mapped[list[Any]] = mapped_column(default=list)
    missed_at: Mapped[datetime | None]
    missed_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_capture_windows_device_start", "device_id", "start"),
        Index("ix_capture_windows_school_start", "school_id", "start"),
        # the missed and at-risk checks look at every unit's windows near now
        Index("ix_capture_windows_start", "start"),
    )

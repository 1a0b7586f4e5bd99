"""Initial schema: units, health, alerts, commands, recordings, segments, events, users, tokens.

Revision ID: 0001
Revises:
Created: 2026-03-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Autoincrementing ids: SQLite only autoincrements an INTEGER PRIMARY KEY.
_BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_OPEN = sa.text("cleared_at IS NULL")
_MANIFEST_PENDING = sa.text("revision > manifest_revision")


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _device_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["device_id"], ["devices.id"], name=f"fk_{table}_device_id_devices", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("school", sa.String(200), nullable=False),
        sa.Column("room", sa.String(200), nullable=False),
        _ts("created_at"),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        _ts("online_changed_at", nullable=True),
        _ts("last_seen_at", nullable=True),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=True),
        sa.Column("recording_id", sa.String(128), nullable=True),
        sa.Column("health", sa.JSON(), nullable=True),
        _ts("health_at", nullable=True),
        sa.Column("desired_version", sa.Integer(), nullable=False),
        sa.Column("desired", sa.JSON(), nullable=True),
        sa.Column("reported_version", sa.Integer(), nullable=False),
        sa.Column("reported_error", sa.Text(), nullable=True),
        sa.Column("snapshot_jpeg", sa.LargeBinary(), nullable=True),
        _ts("snapshot_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )
    op.create_index("ix_devices_online", "devices", ["online"])
    op.create_index("ix_devices_school_room", "devices", ["school", "room"])
    op.create_index("ix_devices_state", "devices", ["state"])

    op.create_table(
        "health_samples",
        sa.Column("id", _BIGID, nullable=False),
        sa.Column("device_id", sa.String(63), nullable=False),
        _ts("ts"),
        sa.Column("data", sa.JSON(), nullable=False),
        _device_fk("health_samples"),
        sa.PrimaryKeyConstraint("id", name="pk_health_samples"),
    )
    op.create_index("ix_health_device_ts", "health_samples", ["device_id", "ts"])

    op.create_table(
        "alerts",
        sa.Column("id", _BIGID, nullable=False),
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _ts("raised_at"),
        _ts("cleared_at", nullable=True),
        _device_fk("alerts"),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_open", "alerts", ["device_id", "kind", "cleared_at"])
    op.create_index("ix_alerts_raised", "alerts", ["raised_at"])
    op.create_index(
        "uq_alerts_open_kind",
        "alerts",
        ["device_id", "kind"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )

    op.create_table(
        "commands",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=True),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("sent_at", nullable=True),
        _ts("accepted_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.Column("recording_id", sa.String(128), nullable=True),
        _device_fk("commands"),
        sa.PrimaryKeyConstraint("id", name="pk_commands"),
    )
    op.create_index("ix_commands_device_created", "commands", ["device_id", "created_at"])
    op.create_index("ix_commands_status", "commands", ["status"])

    op.create_table(
        "recordings",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("device_id", sa.String(63), nullable=False),
        sa.Column("school", sa.String(200), nullable=False),
        sa.Column("room", sa.String(200), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=True),
        sa.Column("window_id", sa.String(128), nullable=True),
        _ts("started_at"),
        _ts("ended_at", nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("end_reason", sa.String(16), nullable=True),
        sa.Column("bookmarks", sa.JSON(), nullable=False),
        sa.Column("gaps", sa.JSON(), nullable=False),
        sa.Column("video", sa.String(32), nullable=True),
        sa.Column("audio", sa.String(32), nullable=True),
        sa.Column("segments_reported", sa.Integer(), nullable=False),
        sa.Column("manifest_key", sa.String(512), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("manifest_revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_recordings"),
    )
    op.create_index("ix_recordings_device_started", "recordings", ["device_id", "started_at"])
    op.create_index("ix_recordings_school", "recordings", ["school"])
    op.create_index("ix_recordings_started_at", "recordings", ["started_at"])
    op.create_index(
        "ix_recordings_manifest_pending",
        "recordings",
        ["id"],
        sqlite_where=_MANIFEST_PENDING,
        postgresql_where=_MANIFEST_PENDING,
    )

    op.create_table(
        "segments",
        sa.Column("id", _BIGID, nullable=False),
        sa.Column("recording_id", sa.String(128), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _ts("started_at"),
        _ts("ended_at"),
        sa.Column("recovered", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("grants", sa.Integer(), nullable=False),
        _ts("announced_at"),
        _ts("stored_at", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["recording_id"],
            ["recordings.id"],
            name="fk_segments_recording_id_recordings",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_segments"),
        sa.UniqueConstraint("key", name="uq_segments_key"),
        sa.UniqueConstraint("recording_id", "sequence", name="uq_segment_seq"),
    )
    op.create_index("ix_segments_state", "segments", ["state"])

    op.create_table(
        "device_events",
        sa.Column("id", _BIGID, nullable=False),
        sa.Column("device_id", sa.String(63), nullable=False),
        _ts("ts"),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("recording_id", sa.String(128), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        _device_fk("device_events"),
        sa.PrimaryKeyConstraint("id", name="pk_device_events"),
    )
    op.create_index("ix_events_device_ts", "device_events", ["device_id", "ts"])

    op.create_table(
        "users",
        sa.Column("username", sa.String(200), nullable=False),
        sa.Column("password_hash", sa.String(300), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("username", name="pk_users"),
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
    )


def downgrade() -> None:
    for table in (
        "api_tokens",
        "users",
        "device_events",
        "segments",
        "recordings",
        "commands",
        "alerts",
        "health_samples",
        "devices",
    ):
        op.drop_table(table)

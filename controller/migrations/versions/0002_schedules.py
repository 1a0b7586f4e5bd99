"""Schedules: schools, capture plans and the capture windows of the rolling horizon.

Revision ID: 0002
Revises: 0001
Created: 2026-03-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "schools",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_schools"),
        sa.UniqueConstraint("name", name="uq_schools_name"),
    )

    op.create_table(
        "capture_plans",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("school_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["school_id"],
            ["schools.id"],
            name="fk_capture_plans_school_id_schools",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_capture_plans"),
        sa.UniqueConstraint("school_id", "name", name="uq_capture_plans_school_id_name"),
    )

    op.create_table(
        "capture_windows",
        sa.Column("window_id", sa.String(128), nullable=False),
        sa.Column("school_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(63), nullable=True),
        sa.Column("room", sa.String(200), nullable=False),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("period", sa.String(200), nullable=False),
        _ts("start"),
        _ts("end"),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("teacher", sa.String(200), nullable=True),
        sa.Column("plans", sa.JSON(), nullable=False),
        _ts("missed_at", nullable=True),
        sa.Column("missed_reason", sa.Text(), nullable=True),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["school_id"],
            ["schools.id"],
            name="fk_capture_windows_school_id_schools",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("window_id", name="pk_capture_windows"),
    )
    op.create_index("ix_capture_windows_device_start", "capture_windows", ["device_id", "start"])
    op.create_index("ix_capture_windows_school_start", "capture_windows", ["school_id", "start"])
    op.create_index("ix_capture_windows_start", "capture_windows", ["start"])

    # Timelines and missed-capture checks look recordings up by their window.
    op.create_index("ix_recordings_window_id", "recordings", ["window_id"])


def downgrade() -> None:
    op.drop_index("ix_recordings_window_id", table_name="recordings")
    for table in ("capture_windows", "capture_plans", "schools"):
        op.drop_table(table)

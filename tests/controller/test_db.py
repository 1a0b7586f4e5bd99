"""The database layer: migrations that build exactly the models' schema, SQLite's settings,
transactions, and writers that wait for each other instead of failing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from controller.db import Database
from controller.models import Base, Device, HealthSample
from shared.clock import utcnow


def _schema_diff(database: Database) -> list[object]:
    with database.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


def _add_device(database: Database, device_id: str) -> None:
    with database.session() as session:
        session.add(
            Device(
                id=device_id,
                school="North High",
                room="204",
                created_at=utcnow(),
                online=False,
                epoch=-1,
                capabilities=[],
                desired_version=0,
                reported_version=0,
            )
        )


def test_migrations_build_exactly_the_models_schema(empty_db_url: str) -> None:
    database = Database(empty_db_url)
    try:
        database.migrate()
        assert _schema_diff(database) == []
        tables = set(inspect(database.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert "alembic_version" in tables
        # a second run finds nothing to do
        database.migrate()
        assert _schema_diff(database) == []
    finally:
        database.dispose()


def test_schema_comparison_notices_a_missing_index(empty_db_url: str) -> None:
    database = Database(empty_db_url)
    try:
        database.migrate()
        with database.engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_devices_school_room"))
        diff = _schema_diff(database)
        assert [entry[0] for entry in diff] == ["add_index"]  # type: ignore[index]
    finally:
        database.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'deep' / 'dir' / 'c.sqlite3'}")
    try:
        with database.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        database.dispose()
    assert (tmp_path / "deep" / "dir" / "c.sqlite3").exists()


def test_session_commits_on_success_and_rolls_back_on_error(db: Database) -> None:
    _add_device(db, "room-101")
    with pytest.raises(RuntimeError), db.session() as session:
        device = session.get(Device, "room-101")
        assert device is not None
        device.room = "999"
        session.flush()
        raise RuntimeError("boom")
    with db.session(readonly=True) as session:
        assert session.scalar(select(Device.room).where(Device.id == "room-101")) == "204"


def test_foreign_keys_are_enforced(db: Database) -> None:
    with pytest.raises(IntegrityError), db.session() as session:
        session.add(HealthSample(device_id="nobody", ts=utcnow(), data={}))


def test_concurrent_read_then_write_transactions_all_commit(db: Database) -> None:
    """Each writer reads a counter and writes it back plus one: none may fail or be lost."""
    _add_device(db, "room-101")
    errors: list[BaseException] = []

    def bump(times: int) -> None:
        try:
            for _ in range(times):
                with db.session() as session:
                    device = session.get(Device, "room-101", with_for_update=True)
                    assert device is not None
                    device.desired_version += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with db.session(readonly=True) as session:
        assert session.scalar(select(Device.desired_version)) == 150


@pytest.mark.parametrize(
    "url", ["mysql://root@127.0.0.1/x", "postgresql+psycopg2://postgres@127.0.0.1/x"]
)
def test_unsupported_database_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"psycopg|only sqlite"):
        Database(url)


def test_telemetry_sessions_do_not_wait_for_a_flush_at_commit(db: Database) -> None:
    if db.dialect == "sqlite":
        # WAL with synchronous=NORMAL: commits never wait for a flush, whatever the session
        with db.session(durable=False) as session:
            assert session.scalar(text("PRAGMA synchronous")) == 1
        return
    with db.session(durable=False) as session:
        assert session.scalar(text("SHOW synchronous_commit")) == "off"
    with db.session() as session:
        assert session.scalar(text("SHOW synchronous_commit")) == "on"

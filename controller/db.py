"""The controller's database: one engine, sessions that commit or roll back, migrations.

SQLite (the embedded default) runs in WAL mode with foreign keys on. Its
writers are serialised with ``BEGIN IMMEDIATE`` so a transaction that reads
and then writes waits for the lock (``busy_timeout``) instead of failing when
another writer got there first; read-only sessions use a plain deferred
``BEGIN`` and never wait. PostgreSQL goes through psycopg 3.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Select, create_engine, event, func, select, text
from sqlalchemy.engine import URL, CursorResult, Result, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_BEGIN_OPTION = "classcap_sqlite_begin"


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or "mode=memory" in str(url)


def affected(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE executed through a Session touched."""
    return int(cast(CursorResult[Any], result).rowcount or 0)


class Database:
    def __init__(
        self,
        url: str,
        *,
        busy_timeout_ms: int = 30_000,
        pool_size: int = 10,
        max_overflow: int = 20,
        echo: bool = False,
    ) -> None:
        self.url = make_url(url)
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite":
            self.engine = self._sqlite_engine(busy_timeout_ms, echo)
        elif self.dialect == "postgresql":
            if self.url.get_driver_name() not in ("psycopg", ""):
                raise ValueError(
                    f"database url {self.url.render_as_string(hide_password=True)}: "
                    "use the psycopg 3 driver (postgresql+psycopg://...)"
                )
            self.engine = create_engine(
                self.url.set(drivername="postgresql+psycopg"),
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_pre_ping=True,
                echo=echo,
            )
        else:
            raise ValueError(
                f"database url {self.url.render_as_string(hide_password=True)}: "
                "only sqlite:///PATH and postgresql+psycopg://... are supported"
            )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            self.engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"}),
            expire_on_commit=False,
        )

    def _sqlite_engine(self, busy_timeout_ms: int, echo: bool) -> Engine:
        kwargs: dict[str, Any] = {"echo": echo}
        if _is_memory(self.url):
            # One connection, or every session would see its own empty database.
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            assert self.url.database is not None
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self.url, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # The driver's own implicit BEGIN would be deferred; we issue ours in "begin".
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                cursor.execute("PRAGMA foreign_keys = ON")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            mode = connection.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine

    @contextmanager
    def session(self, *, readonly: bool = False, durable: bool = True) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises.

        ``readonly`` sessions do not take SQLite's write lock; writing in one may
        fail with "database is locked" under load, so only read in them.
        ``durable=False`` is for telemetry a crash may lose (the next sample
        replaces it): PostgreSQL then commits without waiting for its WAL flush,
        which halves the cost of a small transaction. SQLite in WAL mode with
        ``synchronous=NORMAL`` never waits for a flush at commit anyway.
        """
        factory = self._read_sessions if readonly else self._sessions
        with factory() as session:
            try:
                if not durable and self.dialect == "postgresql":
                    session.execute(text("SET LOCAL synchronous_commit TO OFF"))
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def migrate(self) -> None:
        """Brings the schema to the newest revision (``alembic upgrade head``)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        log.info("database migrated url=%s", self.url.render_as_string(hide_password=True))

    def dispose(self) -> None:
        self.engine.dispose()


MAX_PER_PAGE = 1000
# Keeps IN (...) lists well inside every backend's parameter limit.
IN_CHUNK = 500

T = TypeVar("T")


def in_chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in slices short enough for one ``IN (...)`` each."""
    for start in range(0, len(items), IN_CHUNK):
        yield items[start : start + IN_CHUNK]


# Any select, whatever its row shape.
Q = TypeVar("Q", bound="Select[*tuple[Any, ...]]")


@dataclass(frozen=True)
class PageQuery(Generic[Q]):
    """One page of a listing: the clamped page numbers, the total and the page's query."""

    page: int
    per_page: int
    total: int
    query: Q


def paginate(
    session: Session, query: Q, order_by: Sequence[Any], page: int, per_page: int
) -> PageQuery[Q]:
    """Counts ``query``'s rows and returns it ordered and cut to one page."""
    page, per_page = max(1, page), max(1, min(per_page, MAX_PER_PAGE))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    limited = query.order_by(*order_by).limit(per_page).offset((page - 1) * per_page)
    return PageQuery(page, per_page, int(total), limited)

"""Alembic's environment: always given an open connection by ``Database.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from controller.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters tables by copying them; batch mode does that for later revisions.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "controller migrations run through controller.db.Database.migrate(), "
            "which passes its connection; there is no alembic.ini"
        )
    _run(connection)


_main()

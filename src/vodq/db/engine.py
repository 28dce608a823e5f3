"""Engine set-up: SQLite pragmas and transaction mode, the PostgreSQL pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

# How long a SQLite writer waits for another writer's lock, in milliseconds.
SQLITE_BUSY_TIMEOUT_MS = 10_000


def make_engine(dsn: str) -> Engine:
    """Create the engine for ``dsn``, creating the SQLite file's folder if needed."""
    url = make_url(dsn)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(dsn, url.database)
    return create_engine(
        dsn,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        pool_timeout=10,
        connect_args={"connect_timeout": 5},
    )


def _sqlite_engine(dsn: str, database: str | None) -> Engine:
    if not database or database == ":memory:":
        raise ValueError(
            f"DB_DSN={dsn!r} is not a file; use sqlite:///path/to/vodq.db, "
            "because an in-memory database is lost on restart"
        )
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        dsn,
        connect_args={
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
        },
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event issue BEGIN itself, so that every
        # transaction can take the write lock up front (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that reads and then writes cannot wait for
        # the write lock (SQLite answers SQLITE_BUSY at once), so writes take
        # it at BEGIN. Read-only callers pass sqlite_begin="DEFERRED".
        mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine

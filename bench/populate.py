"""Fill a vodq database with many queued VODs quickly, with SQL.

The database generates the rows itself, with ``INSERT ... SELECT`` from a
recursive CTE on SQLite (in batches) and from ``generate_series`` on
PostgreSQL.
The ``vod_counts`` triggers fire for every row on SQLite. On PostgreSQL
they are skipped during the INSERT (``session_replication_role = replica``),
and ``vod_counts`` is rebuilt afterwards with one ``GROUP BY``, as the
migration that created it does. Every URL points at 127.0.0.1 port 9, where
nothing listens, so a VOD that a benchmark did not mean to download fails
at once without traffic leaving the machine.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime

from common import sqlalchemy_dsn
from sqlalchemy.engine import make_url

COLUMNS = (
    "vod_id",
    "source_url",
    "title",
    "date",
    "channel",
    "priority",
    "state",
    "created_at",
    "updated_at",
)
SQLITE_BATCH_ROWS = 100_000

# Each row's fields come from a multiplicative hash of its row number, so the
# same count always gives the same data. Priorities are 0 to 4, there are 20
# channels, 5% of rows have no date and the others fall in 2020 to 2024.
_HASH = "((i + :seed) * 2654435761 % 4294967296)"
_DATE_S = f"({_HASH} / 2000 * 73 % 157680000)"
SQLITE_INSERT = f"""
INSERT INTO vods ({", ".join(COLUMNS)})
WITH RECURSIVE n(i) AS (
    SELECT :first UNION ALL SELECT i + 1 FROM n WHERE i < :last
)
SELECT printf('b%07d', i), printf('http://127.0.0.1:9/bulk/b%07d.mp4', i),
    'Recording ' || i,
    CASE WHEN {_HASH} / 100 % 20 = 0 THEN NULL
        ELSE datetime(1577836800 + {_DATE_S}, 'unixepoch') || '.000000' END,
    'channel' || ({_HASH} / 5 % 20), {_HASH} % 5, 'queued', :now, :now
FROM n
"""
POSTGRES_INSERT = f"""
INSERT INTO vods ({", ".join(COLUMNS)})
SELECT format('b%s', lpad(i::text, 7, '0')),
    format('http://127.0.0.1:9/bulk/b%s.mp4', lpad(i::text, 7, '0')),
    'Recording ' || i,
    CASE WHEN {_HASH} / 100 % 20 = 0 THEN NULL
        ELSE timestamptz '2020-01-01 00:00:00+00'
            + make_interval(secs => {_DATE_S}) END,
    'channel' || ({_HASH} / 5 % 20), {_HASH} % 5, 'queued', :now, :now
FROM generate_series(0, :last) AS s(i)
"""


def bulk_id(index: int) -> str:
    return f"b{index:07d}"


def migrate(dsn: str) -> None:
    from vodq.db.engine import make_engine
    from vodq.db.migrate import upgrade

    engine = make_engine(sqlalchemy_dsn(dsn))
    upgrade(engine)
    engine.dispose()


def populate(dsn: str, count: int, *, seed: int = 1) -> float:
    """Migrate ``dsn``, add ``count`` queued VODs and return the seconds it took."""
    started = time.monotonic()
    migrate(dsn)
    if dsn.startswith("sqlite"):
        _populate_sqlite(make_url(dsn).database or "", count, seed)
    else:
        _populate_postgres(dsn, count, seed)
    return time.monotonic() - started


def _populate_sqlite(path: str, count: int, seed: int) -> None:
    now = datetime.now(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        for first in range(0, count, SQLITE_BATCH_ROWS):
            last = min(count, first + SQLITE_BATCH_ROWS) - 1
            with conn:
                conn.execute(
                    SQLITE_INSERT,
                    {"first": first, "last": last, "seed": seed, "now": now},
                )
        # No ANALYZE: vodq never runs it, so a real database has no statistics.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _populate_postgres(dsn: str, count: int, seed: int) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(sqlalchemy_dsn(dsn))
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(
                text(POSTGRES_INSERT),
                {"last": count - 1, "seed": seed, "now": datetime.now(UTC)},
            )
            conn.execute(text("SET LOCAL session_replication_role = origin"))
            conn.execute(text("DELETE FROM vod_counts"))
            conn.execute(
                text(
                    "INSERT INTO vod_counts (state, priority, count) SELECT state, "
                    "priority, COUNT(*) FROM vods GROUP BY state, priority"
                )
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE vods"))
    finally:
        engine.dispose()


def set_paused(dsn: str, paused: bool) -> None:
    """Pause claiming for every worker, as ``POST /admin/queue/pause`` does."""
    from vodq.db.engine import make_engine
    from vodq.queue import VodQueue

    engine = make_engine(sqlalchemy_dsn(dsn))
    VodQueue(engine).set_paused(paused)
    engine.dispose()

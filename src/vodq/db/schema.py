"""The tables that vodq owns, as SQLAlchemy Core metadata.

Operators read and change these tables with SQL (the guide resets the
breaker in ``kv`` and bumps priorities in ``vods``), so column names are part
of the public contract. Migrations under ``migrations/versions`` create the
same schema; this module is what the code queries against.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator

from vodq.models import VodState


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so the value is
    stored as naive UTC text, which still sorts and compares with literals
    such as ``'2024-10-01'`` in operators' SQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {value!r}")
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC time")
        utc: datetime = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
        if not isinstance(parsed, datetime):
            raise TypeError(f"expected a timestamp from the database, got {value!r}")
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)


metadata = MetaData()

STATES_SQL = ", ".join(f"'{state.value}'" for state in VodState)

vods = Table(
    "vods",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("vod_id", Text, nullable=False, unique=True),
    Column("source_url", Text, nullable=False),
    Column("title", Text),
    Column("date", UTCDateTime),
    Column("channel", Text),
    Column("priority", BigInteger, nullable=False, server_default=text("0")),
    Column("state", Text, nullable=False, server_default=text("'queued'")),
    # Derived by the database itself, so an operator's UPDATE of ``state``
    # can never leave it out of step.
    Column(
        "processed",
        Boolean,
        Computed(f"state = '{VodState.DONE.value}'", persisted=True),
    ),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", UTCDateTime),
    Column("last_error", Text),
    Column("error_class", Text),
    Column("bytes_done", BigInteger, nullable=False, server_default=text("0")),
    Column("bytes_total", BigInteger),
    Column("speed_bps", BigInteger),
    # What a running download can use of DOWNLOAD_TOTAL_RATE_LIMIT, in bytes
    # per second, written with each lease renewal; NULL for as much as the
    # pool gives. Read only for downloads with a live lease.
    Column("rate_demand_bps", BigInteger),
    Column("file_path", Text),
    Column("lease_owner", Text),
    Column("lease_expires_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("download_ms", BigInteger),
    Column("skip_upload", Boolean, nullable=False, server_default=text("false")),
    # The upload stage's own attempts and retry time; lease_owner and
    # lease_expires_at serve both stages, because a VOD is never in both.
    Column("upload_attempts", Integer, nullable=False, server_default=text("0")),
    Column("upload_next_at", UTCDateTime),
    # What the uploader stored to resume or verify an interrupted upload.
    Column("upload_session", Text),
    # Set by each upload claim, so that a result write names its claim.
    Column("upload_started_at", UTCDateTime),
    Column("remote_id", Text),
    Column("remote_url", Text),
    Column("uploaded_at", UTCDateTime),
    Column("uploader", Text),
    Column("upload_ms", BigInteger),
    CheckConstraint(f"state IN ({STATES_SQL})", name="ck_vods_state"),
    CheckConstraint("attempts >= 0", name="ck_vods_attempts"),
    CheckConstraint("upload_attempts >= 0", name="ck_vods_upload_attempts"),
)

# Serves the claim query: eligible VODs in priority order, ties oldest first.
Index(
    "ix_vods_claim",
    vods.c.priority.desc(),
    vods.c.date.is_(None),
    vods.c.date.asc(),
    vods.c.id.asc(),
    sqlite_where=vods.c.state == VodState.QUEUED.value,
    postgresql_where=vods.c.state == VodState.QUEUED.value,
)
# Serves lease expiry and the count of running downloads.
Index(
    "ix_vods_running",
    vods.c.lease_expires_at,
    sqlite_where=vods.c.state == VodState.DOWNLOADING.value,
    postgresql_where=vods.c.state == VodState.DOWNLOADING.value,
)
# Serves the upload claim, in the same order as the download claim.
Index(
    "ix_vods_upload_claim",
    vods.c.priority.desc(),
    vods.c.date.is_(None),
    vods.c.date.asc(),
    vods.c.id.asc(),
    sqlite_where=vods.c.state == VodState.DOWNLOADED.value,
    postgresql_where=vods.c.state == VodState.DOWNLOADED.value,
)
Index("ix_vods_state", vods.c.state, vods.c.priority)
# Serves the release of a path that another VOD's record still names.
Index(
    "ix_vods_file_path",
    vods.c.file_path,
    sqlite_where=vods.c.file_path.is_not(None),
    postgresql_where=vods.c.file_path.is_not(None),
)

workers = Table(
    "workers",
    metadata,
    Column("worker_id", Text, primary_key=True),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    Column("slots", Integer, nullable=False),
)

# Maintained by database triggers (migration 0004); never written by vodq.
vod_counts = Table(
    "vod_counts",
    metadata,
    Column("state", Text, primary_key=True),
    Column("priority", BigInteger, primary_key=True),
    Column("count", BigInteger, nullable=False),
)

kv = Table(
    "kv",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

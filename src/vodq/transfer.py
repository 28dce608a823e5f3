"""Copy a vodq queue from one database to another, such as SQLite to PostgreSQL.

``copy_queue`` migrates both databases to the current schema, then copies
the ``vods`` and ``kv`` tables in batches of rows. It reads the source in one
transaction (a consistent snapshot) and writes the target in one transaction,
so a failure leaves the target's rows as they were. It expects every vodq
process on the source to be stopped, and queues again each VOD that was
downloading there.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Table,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from vodq.config import _dsn as normalize_dsn
from vodq.config import _redact_dsn
from vodq.db.engine import make_engine
from vodq.db.migrate import upgrade
from vodq.db.schema import kv, vods
from vodq.errors import InvalidInput, StorageUnavailable
from vodq.models import VodState

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000

# Values per IN (...) list when looking up which rows the target has. SQLite
# before 3.32.0 allows at most 999 bound parameters in one statement.
LOOKUP_CHUNK = 500

# Every column the copy writes. ``processed`` is a generated column, so the
# target database computes it from ``state``.
VOD_COLUMNS = [column for column in vods.c if column.computed is None]

# Columns cleared when a VOD that was downloading in the source is queued
# again, as VodQueue does when a lease expires.
RELEASED_VALUES: dict[str, Any] = {
    "state": VodState.QUEUED.value,
    "lease_owner": None,
    "lease_expires_at": None,
    "speed_bps": None,
}

SET_ID_SEQUENCE = text(
    "SELECT setval(pg_get_serial_sequence('vods', 'id'), (SELECT MAX(id) FROM vods))"
)


@dataclass(frozen=True)
class CopyReport:
    """Row counts of one copy, and its duration in seconds."""

    vods_copied: int
    vods_skipped: int
    leases_released: int
    kv_copied: int
    kv_skipped: int
    seconds: float


@dataclass
class _Counts:
    vods_copied: int = 0
    vods_skipped: int = 0
    leases_released: int = 0
    unexpired_leases: int = 0
    kv_copied: int = 0
    kv_skipped: int = 0


def copy_queue(
    source_dsn: str,
    target_dsn: str,
    *,
    merge: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> CopyReport:
    """Copy every ``vods`` and ``kv`` row from ``source_dsn`` into ``target_dsn``.

    Both DSNs take the forms that DB_DSN accepts. Rows keep their ``id``, so
    the claim order stays the same. A VOD that was downloading in the source
    arrives queued with its lease cleared. The target must have no VODs,
    unless ``merge`` is true. Then VODs whose ``vod_id`` the target already
    contains are skipped, the copied VODs get new ids after the target's
    highest one, and ``kv`` keys the target contains keep its values.
    Without ``merge``, the source's value of such a key replaces the target's.

    Raises InvalidInput for an invalid DSN or batch size, a missing source
    file, the same database on both sides, or a target that has VODs without
    ``merge``. Raises StorageUnavailable when a database fails.
    """
    source = _parse_dsn(source_dsn, "source")
    target = _parse_dsn(target_dsn, "target")
    if batch_size < 1:
        raise InvalidInput(f"batch size {batch_size} is invalid; use 1 or more")
    if _same_database(source, target):
        raise InvalidInput(
            f"source and target are the same database ({_shown(target)}); "
            "pass the DSN of another database as the target"
        )
    _check_source_exists(source)

    started = time.monotonic()
    source_engine = _engine(source, "source")
    target_engine = _engine(target, "target")
    try:
        _migrate(source_engine, source, "source")
        _migrate(target_engine, target, "target")
        try:
            counts = _copy(source_engine, target_engine, target, merge, batch_size)
        except SQLAlchemyError as exc:
            raise StorageUnavailable(
                f"copying the queue from {_shown(source)} to {_shown(target)} "
                f"failed: {_reason(exc)}; the target's rows were left unchanged"
            ) from exc
    finally:
        source_engine.dispose()
        target_engine.dispose()

    report = CopyReport(
        vods_copied=counts.vods_copied,
        vods_skipped=counts.vods_skipped,
        leases_released=counts.leases_released,
        kv_copied=counts.kv_copied,
        kv_skipped=counts.kv_skipped,
        seconds=round(time.monotonic() - started, 3),
    )
    _log_report(report, counts, source, target)
    return report


# -- checks before the copy ---------------------------------------------


def _parse_dsn(dsn: str, role: str) -> URL:
    try:
        return make_url(normalize_dsn(dsn.strip()))
    except ValueError as exc:
        raise InvalidInput(
            f"{role} database {_redact_dsn(dsn)!r} is invalid: {exc}; use for "
            "example postgres://vod:PASSWORD@127.0.0.1:5432/vod or "
            "sqlite:///data/vodq.db"
        ) from None


def _same_database(source: URL, target: URL) -> bool:
    if source.get_backend_name() != target.get_backend_name():
        return False
    if source.get_backend_name() == "sqlite":
        source_path = Path(source.database or "")
        target_path = Path(target.database or "")
        if source_path.exists() and target_path.exists():
            return os.path.samefile(source_path, target_path)
        return source_path.resolve() == target_path.resolve()
    return _server_address(source) == _server_address(target)


def _server_address(url: URL) -> tuple[str, int, str]:
    # A DSN without a host connects to the local socket, which libpq may also
    # take from ?host=. The user and password do not change the database.
    host = url.host or str(url.query.get("host") or "")
    return host.lower(), url.port or 5432, url.database or ""


def _check_source_exists(source: URL) -> None:
    # Opening a missing SQLite file would create an empty database and copy
    # nothing, which hides a mistyped path.
    if source.get_backend_name() != "sqlite":
        return
    path = source.database or ""
    if path != ":memory:" and not Path(path).is_file():
        raise InvalidInput(
            f"source database file {path!r} was not found; pass the path of "
            "vodq's SQLite file, by default DATA_DIR/vodq.db"
        )


def _engine(url: URL, role: str) -> Engine:
    try:
        return make_engine(url.render_as_string(hide_password=False))
    except ValueError as exc:
        raise InvalidInput(f"{role} database is invalid: {exc}") from None


def _migrate(engine: Engine, url: URL, role: str) -> None:
    try:
        upgrade(engine)
    except SQLAlchemyError as exc:
        raise StorageUnavailable(
            f"migrating the {role} database {_shown(url)} failed: {_reason(exc)}"
        ) from exc
    except CommandError as exc:
        raise InvalidInput(
            f"migrating the {role} database {_shown(url)} failed: {exc}; a "
            "database that a newer vodq migrated needs that vodq version"
        ) from exc


# -- the copy -----------------------------------------------------------


def _copy(
    source_engine: Engine,
    target_engine: Engine,
    target: URL,
    merge: bool,
    batch_size: int,
) -> _Counts:
    with _snapshot(source_engine) as src, target_engine.begin() as dst:
        is_postgres = dst.dialect.name == "postgresql"
        if is_postgres:
            # Keeps other writers out until commit, so the row count and the
            # highest id read below stay true for the whole copy.
            dst.execute(text("LOCK TABLE vods, kv IN SHARE ROW EXCLUSIVE MODE"))
        existing = int(dst.execute(select(func.count()).select_from(vods)).scalar_one())
        if existing and not merge:
            raise InvalidInput(
                f"target database {_shown(target)} already contains {existing} "
                f"{'VOD' if existing == 1 else 'VODs'}; copy into an empty database, "
                "or pass --merge to add only the VODs whose vod_id it does not "
                "contain"
            )
        writer = _TargetWriter(dst, merge=merge)
        if existing:
            writer.renumber_after(
                int(dst.execute(select(func.max(vods.c.id))).scalar_one())
            )

        for rows in _batches(src, vods, vods.c.id, VOD_COLUMNS, batch_size):
            writer.add_vods(rows)
        for rows in _batches(src, kv, kv.c.key, list(kv.c), batch_size):
            writer.add_kv(rows)

        if is_postgres:
            dst.execute(SET_ID_SEQUENCE)
    return writer.counts


def _snapshot(engine: Engine) -> Connection:
    """Open a read-only connection whose reads all see one snapshot."""
    connection = engine.connect()
    if engine.dialect.name == "postgresql":
        return connection.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
    # A deferred SQLite transaction in WAL mode reads one snapshot without
    # taking the write lock.
    return connection.execution_options(sqlite_begin="DEFERRED")


def _batches(
    conn: Connection,
    table: Table,
    key: Column[Any],
    columns: Sequence[Column[Any]],
    batch_size: int,
) -> Iterator[list[dict[str, Any]]]:
    """Yield the rows of ``table`` in ``key`` order, ``batch_size`` at a time."""
    last: Any = None
    while True:
        query = select(*columns).order_by(key).limit(batch_size)
        if last is not None:
            query = query.where(key > last)
        rows = [dict(row._mapping) for row in conn.execute(query)]
        if not rows:
            return
        last = rows[-1][key.name]
        yield rows


class _TargetWriter:
    """Write batches of source rows into the target's open transaction."""

    def __init__(self, dst: Connection, *, merge: bool) -> None:
        self.dst = dst
        self.merge = merge
        self.counts = _Counts()
        self.now = datetime.now(UTC)
        # The id of the next copied VOD, or None to keep the source's ids.
        self.next_id: int | None = None
        self.skip_keys: set[str] = set()

    def renumber_after(self, max_id: int) -> None:
        """Give copied VODs new ids after ``max_id``, in source order.

        They are then claimed after the target's own VODs of the same
        priority and date.
        """
        self.next_id = max_id + 1
        # circuit_trial stores a source row id, which names another VOD in
        # the target. The breaker reads a missing trial as "none running".
        self.skip_keys = {"circuit_trial"}

    def add_vods(self, rows: list[dict[str, Any]]) -> None:
        present: set[Any] = set()
        if self.merge:
            present = _present(self.dst, vods.c.vod_id, [row["vod_id"] for row in rows])
        new_rows = []
        for row in rows:
            if row["vod_id"] in present:
                self.counts.vods_skipped += 1
                continue
            if row["state"] == VodState.DOWNLOADING.value:
                self._release(row)
            if self.next_id is not None:
                row["id"] = self.next_id
                self.next_id += 1
            new_rows.append(row)
        if new_rows:
            self.dst.execute(insert(vods), new_rows)
            self.counts.vods_copied += len(new_rows)

    def _release(self, row: dict[str, Any]) -> None:
        self.counts.leases_released += 1
        expires = row["lease_expires_at"]
        if expires is not None and expires > self.now:
            self.counts.unexpired_leases += 1
        row.update(RELEASED_VALUES, updated_at=self.now)

    def add_kv(self, rows: list[dict[str, Any]]) -> None:
        """Insert kv rows, or update the target's rows of the same keys.

        With ``merge`` the target keeps its own values instead.
        """
        present = _present(self.dst, kv.c.key, [row["key"] for row in rows])
        new_rows = []
        for row in rows:
            key = row["key"]
            if key in self.skip_keys or (self.merge and key in present):
                self.counts.kv_skipped += 1
            elif key in present:
                self.dst.execute(
                    update(kv)
                    .where(kv.c.key == key)
                    .values(value=row["value"], updated_at=row["updated_at"])
                )
                self.counts.kv_copied += 1
            else:
                new_rows.append(row)
        if new_rows:
            self.dst.execute(insert(kv), new_rows)
            self.counts.kv_copied += len(new_rows)


def _present(dst: Connection, column: Column[Any], values: list[Any]) -> set[Any]:
    """Return which of ``values`` the target contains in ``column``."""
    found: set[Any] = set()
    for start in range(0, len(values), LOOKUP_CHUNK):
        chunk = values[start : start + LOOKUP_CHUNK]
        found.update(dst.execute(select(column).where(column.in_(chunk))).scalars())
    return found


# -- reporting ----------------------------------------------------------


def _log_report(report: CopyReport, counts: _Counts, source: URL, target: URL) -> None:
    if counts.unexpired_leases:
        log.warning(
            "%d VODs were downloading in the source under unexpired leases; "
            "stop every vodq process that still uses %s, because it keeps "
            "downloading VODs that the target has queued again",
            counts.unexpired_leases,
            _shown(source),
            extra={"unexpired_leases": counts.unexpired_leases, "action": "copy_db"},
        )
    log.info(
        "copied the queue from %s to %s: %d VODs copied, %d skipped, "
        "%d leases released, %d kv rows copied, %d kv rows skipped, in %.3f s",
        _shown(source),
        _shown(target),
        report.vods_copied,
        report.vods_skipped,
        report.leases_released,
        report.kv_copied,
        report.kv_skipped,
        report.seconds,
        extra={
            "action": "copy_db",
            "vods_copied": report.vods_copied,
            "vods_skipped": report.vods_skipped,
            "leases_released": report.leases_released,
            "kv_copied": report.kv_copied,
            "kv_skipped": report.kv_skipped,
            "duration_s": report.seconds,
        },
    )


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _reason(exc: SQLAlchemyError) -> str:
    # The driver's message, without the SQL and the parameters of a whole batch.
    return str(getattr(exc, "orig", None) or exc).strip()

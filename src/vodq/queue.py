"""The persistent VOD queue: add, claim with a lease, renew, finish, fail, reprioritise.

Every state change is one short transaction. Claims are atomic: on SQLite the
transaction takes the write lock at BEGIN, on PostgreSQL it takes a
transaction-level advisory lock and then locks candidate rows with
``FOR UPDATE SKIP LOCKED``. Either way, counting the running downloads and
claiming new ones happen under the same lock, so the concurrency limit holds
for every process that shares the database. Only ``downloading`` VODs count
against that limit, because the upload stage (``downloaded``, ``uploading``)
has a limit of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ARRAY,
    Connection,
    Engine,
    Row,
    Text,
    and_,
    bindparam,
    case,
    column,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from vodq import breaker
from vodq.breaker import Admission, BreakerPolicy, BreakerState
from vodq.db.schema import UTCDateTime, kv, vod_counts, vods
from vodq.errors import InvalidTransition, StorageUnavailable, VodNotFound
from vodq.models import QUOTA_ERROR_CLASS, Progress, Vod, VodState

log = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock that serialises claims across workers.
CLAIM_LOCK_KEY = 0x766F6471  # "vodq"
# Seconds without a lease renewal after which a running download no longer
# counts in the bandwidth pool. Workers renew every second, and a download
# process whose worker is silent this long stops reading (see
# vodq.download.process HOLD_AFTER_S).
STALE_LEASE_S = 3.0

# The claim and lease queries compare state with a literal, not a bound
# parameter: only then can SQLite (and PostgreSQL's generic plans for
# prepared statements) prove that the partial indexes ix_vods_claim and
# ix_vods_running apply.
IS_QUEUED = vods.c.state == literal_column(f"'{VodState.QUEUED.value}'")
IS_DOWNLOADING = vods.c.state == literal_column(f"'{VodState.DOWNLOADING.value}'")

# The claim order: highest priority first, then oldest date, VODs without a
# date after those with one, then the order of insertion. ix_vods_claim
# indexes the same expressions so the query stops after the first rows.
CLAIM_ORDER = (
    vods.c.priority.desc(),
    vods.c.date.is_(None),
    vods.c.date.asc(),
    vods.c.id.asc(),
)


# The kv key that pauses claiming for every worker ("true" or "false").
PAUSED_KEY = "queue_paused"


# Keep in step with CLAIM_ORDER and the definition of ix_vods_claim.
SQLITE_CANDIDATES = text(
    "SELECT id FROM vods INDEXED BY ix_vods_claim "
    "WHERE state = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= :now) "
    "ORDER BY priority DESC, date IS NULL, date ASC, id ASC LIMIT :room"
).bindparams(bindparam("now", type_=UTCDateTime()), bindparam("room"))

# Raw ``circuit_state`` values that the PostgreSQL claim statement takes for
# a closed breaker: none stored, or exactly "closed". Any other value goes
# through ``breaker.admit``, which also reads what an operator may have typed.
BREAKER_CLOSED_VALUES = (None, BreakerState.CLOSED.value)

_VOD_COLUMNS = ", ".join(f"claimed.{col.name}" for col in vods.c)

# The whole PostgreSQL claim in the common case, as one statement run after
# the advisory lock. It releases expired leases, reads the pause flag and the
# breaker state, counts running downloads, and locks and claims as many
# candidates as leave :max_active running. It returns one row when it claims
# nothing, or one row per claimed VOD. It claims nothing when the queue is
# paused, when the breaker is not plainly closed (``breaker.admit`` decides
# then), or when it released a lease. Every CTE reads the same snapshot, so
# only a later statement can claim the released VODs in claim order. The
# UPDATE matches ``id = ANY (ARRAY(...))`` because with a join the generic
# plan, which psycopg's prepared statement gets after five runs, hashed every
# queued row (PostgreSQL 15). Keep the state literals, key names and order
# in step with IS_QUEUED, IS_DOWNLOADING, PAUSED_KEY, breaker.STATE_KEY and
# CLAIM_ORDER.
POSTGRES_CLAIM = (
    text(
        f"""
WITH expired AS (
    UPDATE vods
    SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL,
        speed_bps = NULL, updated_at = :now
    WHERE state = 'downloading'
        AND (lease_expires_at IS NULL OR lease_expires_at <= :now)
    RETURNING vod_id
), flags AS (
    SELECT
        (SELECT value FROM kv WHERE key = '{PAUSED_KEY}') AS paused,
        (SELECT value FROM kv WHERE key = '{breaker.STATE_KEY}') AS circuit_state,
        (SELECT count(*) FROM vods
            WHERE state = 'downloading' AND lease_expires_at > :now) AS active
), room AS (
    SELECT CASE
        WHEN paused IS DISTINCT FROM 'true'
            AND (circuit_state IS NULL OR circuit_state = 'closed')
            AND NOT EXISTS (SELECT 1 FROM expired)
        THEN GREATEST(0, LEAST(:wanted, :max_active - active))
        ELSE 0
    END AS n
    FROM flags
), candidates AS (
    SELECT id FROM vods
    WHERE state = 'queued'
        AND (next_attempt_at IS NULL OR next_attempt_at <= :now)
    ORDER BY priority DESC, date IS NULL, date ASC, id ASC
    LIMIT (SELECT n FROM room)
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE vods
    SET state = 'downloading', lease_owner = :owner,
        lease_expires_at = :lease_until, started_at = :now, updated_at = :now,
        speed_bps = NULL, rate_demand_bps = NULL
    WHERE id = ANY (ARRAY(SELECT id FROM candidates)) AND state = 'queued'
    RETURNING vods.*
)
SELECT flags.paused, flags.circuit_state,
    ARRAY(SELECT vod_id FROM expired) AS expired, {_VOD_COLUMNS}
FROM flags LEFT JOIN claimed ON true
"""
    )
    .bindparams(
        bindparam("now", type_=UTCDateTime()),
        bindparam("lease_until", type_=UTCDateTime()),
        bindparam("owner", type_=Text()),
        bindparam("wanted"),
        bindparam("max_active"),
    )
    .columns(
        column("paused", Text()),
        column("circuit_state", Text()),
        column("expired", ARRAY(Text())),
        *(column(col.name, col.type) for col in vods.c),
    )
)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class QueueCounts:
    """Counts that ``/status`` reports; ``by_priority`` covers queued VODs only."""

    by_state: dict[str, int]
    by_priority: list[tuple[int, int]]
    active: int


class VodQueue:
    """Queue operations over one SQLAlchemy engine, SQLite or PostgreSQL."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], datetime] = utcnow,
        breaker_policy: BreakerPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.is_postgres = engine.dialect.name == "postgresql"
        self.breaker_policy = breaker_policy or BreakerPolicy(
            threshold=5, cooldown_s=300
        )
        # Called with "open", "half-open" or "closed" after the transaction
        # that changed the breaker has committed.
        self.on_breaker_change: Callable[[str], None] | None = None

    # -- reading --------------------------------------------------------

    def get(self, vod_id: str) -> Vod:
        """Return the VOD with ``vod_id``; raise VodNotFound when there is none."""
        with self._read() as conn:
            row = conn.execute(select(vods).where(vods.c.vod_id == vod_id)).first()
        if row is None:
            raise VodNotFound(vod_id)
        return to_vod(row)

    def list_vods(
        self, *, state: VodState | None = None, limit: int = 50, after_id: int = 0
    ) -> list[Vod]:
        """List VODs in insertion order, ``limit`` at a time after row ``after_id``."""
        query = select(vods).where(vods.c.id > after_id)
        if state is not None:
            query = query.where(vods.c.state == state.value)
        query = query.order_by(vods.c.id).limit(limit)
        with self._read() as conn:
            return [to_vod(row) for row in conn.execute(query)]

    def counts(self, conn: Connection | None = None) -> QueueCounts:
        """Count VODs by state, queued VODs by priority, and unexpired claims.

        Reads ``vod_counts``, which triggers keep, so the cost depends on the
        number of distinct priorities, not on the number of VODs. Reads
        through ``conn`` when given (see ``connect_read``).
        """
        if conn is None:
            with self._read() as own:
                return self._counts(own)
        return self._counts(conn)

    def _counts(self, conn: Connection) -> QueueCounts:
        now = self.clock()
        by_state: dict[str, int] = {}
        by_priority: list[tuple[int, int]] = []
        rows = conn.execute(
            select(vod_counts.c.state, vod_counts.c.priority, vod_counts.c.count)
            .where(vod_counts.c.count > 0)
            .order_by(vod_counts.c.priority.desc())
        ).all()
        active = self._count_active(conn, now)
        for state, priority, count in rows:
            by_state[str(state)] = by_state.get(str(state), 0) + int(count)
            if state == VodState.QUEUED.value:
                by_priority.append((int(priority), int(count)))
        return QueueCounts(by_state=by_state, by_priority=by_priority, active=active)

    def next_eligible_at(self) -> datetime | None:
        """Return when the earliest VOD waiting for a retry becomes eligible."""
        with self._read() as conn:
            value = conn.execute(
                select(func.min(vods.c.next_attempt_at)).where(
                    vods.c.state == VodState.QUEUED.value
                )
            ).scalar_one_or_none()
        return value if isinstance(value, datetime) else None

    # -- adding and changing --------------------------------------------

    def add(
        self,
        *,
        vod_id: str,
        source_url: str,
        title: str | None = None,
        date: datetime | None = None,
        channel: str | None = None,
        priority: int = 0,
    ) -> tuple[Vod, bool]:
        """Insert a queued VOD; return it and whether it was new.

        Adding an id that exists changes nothing and returns the stored VOD.
        """
        now = self.clock()
        values = {
            "vod_id": vod_id,
            "source_url": source_url,
            "title": title,
            "date": date,
            "channel": channel,
            "priority": priority,
            "state": VodState.QUEUED.value,
            "created_at": now,
            "updated_at": now,
        }
        try:
            with self._write() as conn:
                row = conn.execute(insert(vods).values(values).returning(vods)).one()
        except IntegrityError:
            return self.get(vod_id), False
        log.info(
            "queued VOD %s at priority %d",
            vod_id,
            priority,
            extra={"vod_id": vod_id, "priority": priority, "action": "add"},
        )
        return to_vod(row), True

    def set_priority(self, vod_id: str, priority: int) -> Vod:
        """Set a VOD's priority, leaving its attempts and retry clocks alone."""
        with self._write() as conn:
            row = conn.execute(
                update(vods)
                .where(vods.c.vod_id == vod_id)
                .values(priority=priority, updated_at=self.clock())
                .returning(vods)
            ).first()
        if row is None:
            raise VodNotFound(vod_id)
        return to_vod(row)

    def requeue(self, vod_id: str) -> Vod:
        """Put a failed, cancelled or finished VOD back in the queue, attempts reset."""
        allowed = (VodState.FAILED.value, VodState.CANCELLED.value, VodState.DONE.value)
        with self._write() as conn:
            row = conn.execute(
                update(vods)
                .where(vods.c.vod_id == vod_id, vods.c.state.in_(allowed))
                .values(
                    state=VodState.QUEUED.value,
                    attempts=0,
                    next_attempt_at=None,
                    last_error=None,
                    error_class=None,
                    updated_at=self.clock(),
                )
                .returning(vods)
            ).first()
        if row is None:
            vod = self.get(vod_id)
            raise InvalidTransition(
                f"VOD {vod_id!r} is {vod.state}; only failed, cancelled or done "
                "VODs can be reprocessed"
            )
        return to_vod(row)

    def cancel(self, vod_id: str) -> tuple[Vod, VodState]:
        """Cancel a VOD that is queued or in a stage; return it and its old state.

        A download or upload on another worker stops at that worker's next
        heartbeat, when renewing its lease finds the VOD in another state. A
        downloaded file stays where it is, for a later reprocess to upload.
        A cancel ends a wait for the upload destination's quota, so it clears
        that wait and its error. The error of a failed attempt stays.
        """
        vod = self.get(vod_id)
        active = (
            VodState.QUEUED.value,
            VodState.DOWNLOADING.value,
            VodState.DOWNLOADED.value,
            VodState.UPLOADING.value,
        )
        quota_wait = vods.c.error_class == QUOTA_ERROR_CLASS
        with self._write() as conn:
            row = conn.execute(
                update(vods)
                .where(vods.c.vod_id == vod_id, vods.c.state.in_(active))
                .values(
                    state=VodState.CANCELLED.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    speed_bps=None,
                    next_attempt_at=None,
                    upload_next_at=None,
                    last_error=case((quota_wait, None), else_=vods.c.last_error),
                    error_class=case((quota_wait, None), else_=vods.c.error_class),
                    updated_at=self.clock(),
                )
                .returning(vods)
            ).first()
        if row is None:
            raise InvalidTransition(
                f"VOD {vod_id!r} is {vod.state}; only queued, downloading, "
                "downloaded or uploading VODs can be cancelled"
            )
        return to_vod(row), vod.state

    def delete(self, vod_id: str) -> Vod:
        """Delete a VOD's row and return what it held."""
        with self._write() as conn:
            row = conn.execute(
                vods.delete().where(vods.c.vod_id == vod_id).returning(vods)
            ).first()
        if row is None:
            raise VodNotFound(vod_id)
        return to_vod(row)

    def set_priorities(
        self,
        priority: int,
        *,
        vod_ids: list[str] | None = None,
        date_from: datetime | None = None,
        date_to: datetime | None = None,
        channel: str | None = None,
        states: list[VodState] | None = None,
    ) -> int:
        """Set the priority of every VOD that matches; return how many matched.

        ``date_from`` is inclusive and ``date_to`` exclusive. With no filter at
        all nothing changes, so a mistyped request never re-prioritises the
        whole archive.
        """
        conditions: list[Any] = []
        if vod_ids is not None:
            conditions.append(vods.c.vod_id.in_(vod_ids))
        if date_from is not None:
            conditions.append(vods.c.date >= date_from)
        if date_to is not None:
            conditions.append(vods.c.date < date_to)
        if channel is not None:
            conditions.append(vods.c.channel == channel)
        if states is not None:
            conditions.append(vods.c.state.in_([state.value for state in states]))
        if not conditions:
            return 0
        with self._write() as conn:
            result = conn.execute(
                update(vods)
                .where(*conditions)
                .values(priority=priority, updated_at=self.clock())
            )
        return int(result.rowcount)

    def set_skip_upload(self, vod_id: str, skip: bool) -> Vod:
        """Mark whether the upload stage skips this VOD.

        A VOD whose upload runs cannot be marked: the upload would go on and
        leave a remote copy that the flag denies.
        """
        with self._write() as conn:
            query = update(vods).where(vods.c.vod_id == vod_id)
            if skip:
                query = query.where(vods.c.state != VodState.UPLOADING.value)
            row = conn.execute(
                query.values(skip_upload=skip, updated_at=self.clock()).returning(vods)
            ).first()
            if row is None:
                current = conn.execute(
                    select(vods.c.state).where(vods.c.vod_id == vod_id)
                ).scalar_one_or_none()
        if row is None:
            if current is None:
                raise VodNotFound(vod_id)
            raise InvalidTransition(
                f"VOD {vod_id!r} is uploading now, so its upload cannot be "
                "skipped; cancel it first (POST /admin/vod/cancel), or let it "
                "finish"
            )
        return to_vod(row)

    def set_paused(self, paused: bool, *, stop_running: bool = False) -> int:
        """Pause or resume claiming for every worker; return downloads stopped.

        With ``stop_running`` the running downloads go back to the queue, and
        their workers stop them at the next heartbeat, keeping partial files.
        """
        now = self.clock()
        stopped = 0
        with self._write() as conn:
            self._upsert_kv(conn, {PAUSED_KEY: "true" if paused else "false"}, now)
            if paused and stop_running:
                result = conn.execute(
                    update(vods)
                    .where(vods.c.state == VodState.DOWNLOADING.value)
                    .values(**_back_to_queue(now))
                )
                stopped = int(result.rowcount)
        return stopped

    def is_paused(self) -> bool:
        """Return whether an operator paused the queue."""
        return self.get_kv([PAUSED_KEY]).get(PAUSED_KEY) == "true"

    # -- the worker's side ----------------------------------------------

    def claim(
        self, owner: str, *, wanted: int, limit: int, lease_s: float
    ) -> list[Vod]:
        """Claim up to ``wanted`` eligible VODs for ``owner``, in claim order.

        Expired leases are released first, and no more VODs are claimed than
        leave ``limit`` downloads running in the whole database.
        """
        if wanted < 1:
            return []
        now = self.clock()
        lease_until = now + timedelta(seconds=lease_s)
        with self._write() as conn:
            if self.is_postgres:
                rows, transition = self._claim_postgres(
                    conn, owner, now, lease_until, wanted=wanted, limit=limit
                )
            else:
                rows, transition = self._claim_sqlite(
                    conn, owner, now, lease_until, wanted=wanted, limit=limit
                )
        self._notify_breaker(transition)
        return sorted((to_vod(row) for row in rows), key=_claim_order)

    def _claim_postgres(
        self,
        conn: Connection,
        owner: str,
        now: datetime,
        lease_until: datetime,
        *,
        wanted: int,
        limit: int,
    ) -> tuple[list[Row[Any]], str | None]:
        # The lock needs a statement of its own. Under READ COMMITTED each
        # statement reads a snapshot taken when it starts, so a count in the
        # statement that waited for the lock could miss a claim committed
        # meanwhile. Two workers could then pass the limit together.
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY}
        )
        result = conn.execute(
            POSTGRES_CLAIM,
            {
                "now": now,
                "lease_until": lease_until,
                "owner": owner,
                "wanted": wanted,
                "max_active": limit,
            },
        ).all()
        flags = result[0]
        expired = list(flags.expired)
        _log_expired(expired)
        if flags.paused == "true":
            return [], None
        closed = flags.circuit_state in BREAKER_CLOSED_VALUES
        if closed and not expired:
            return [row for row in result if row.id is not None], None

        # The statement claimed nothing, because the breaker needs ``admit``
        # or because the leases it released made VODs claimable.
        return self._admit_and_claim(
            conn,
            owner,
            now,
            lease_until,
            room=min(wanted, limit - self._count_active(conn, now)),
            check_breaker=not closed,
        )

    def _claim_sqlite(
        self,
        conn: Connection,
        owner: str,
        now: datetime,
        lease_until: datetime,
        *,
        wanted: int,
        limit: int,
    ) -> tuple[list[Row[Any]], str | None]:
        # The write lock taken at BEGIN serialises claims, so reading the
        # flags and the count first and claiming after is safe.
        flags = conn.execute(_claim_flags(now)).one()
        if flags.expired:
            self._release_expired(conn, now)
        if flags.paused == "true":
            return [], None
        return self._admit_and_claim(
            conn,
            owner,
            now,
            lease_until,
            room=min(wanted, limit - int(flags.active)),
            check_breaker=flags.circuit_state not in BREAKER_CLOSED_VALUES,
        )

    def _admit_and_claim(
        self,
        conn: Connection,
        owner: str,
        now: datetime,
        lease_until: datetime,
        *,
        room: int,
        check_breaker: bool,
    ) -> tuple[list[Row[Any]], str | None]:
        """Claim up to ``room`` VODs, as many as the breaker admits if asked.

        Returns the claimed rows and the breaker's transition, if any.
        """
        if room < 1:
            return [], None
        admission = breaker.admit(conn, now, room) if check_breaker else Admission(room)
        if admission.count < 1:
            return [], admission.transition

        if self.is_postgres:
            ids = self._lock_candidates(conn, now, admission.count)
            if not ids:
                return [], admission.transition
            chosen: Any = vods.c.id.in_(ids)
        else:
            # SQLite's planner prefers ix_vods_state and sorts every queued
            # row of the top priority; INDEXED BY makes it walk ix_vods_claim
            # in order and stop after ``room`` rows. The subquery runs to its
            # LIMIT before the UPDATE changes any row.
            chosen = vods.c.id.in_(
                SQLITE_CANDIDATES.bindparams(now=now, room=admission.count).columns(
                    vods.c.id
                )
            )
        # No state condition here: the candidates are still queued, because
        # they are locked (PostgreSQL row locks, the SQLite write lock), and
        # on SQLite a state condition makes the UPDATE scan ix_vods_state.
        rows = conn.execute(
            update(vods)
            .where(chosen)
            .values(
                state=VodState.DOWNLOADING.value,
                lease_owner=owner,
                lease_expires_at=lease_until,
                started_at=now,
                updated_at=now,
                speed_bps=None,
                rate_demand_bps=None,
            )
            .returning(vods)
        ).all()
        if admission.trial and rows:
            # The admission was for one VOD, so this is the only row.
            breaker.claim_trial(conn, now, int(rows[0].id))
        return list(rows), admission.transition

    def renew(
        self,
        owner: str,
        progress: Mapping[int, Progress],
        *,
        lease_s: float,
        started: Mapping[int, datetime | None] | None = None,
        demands: Mapping[int, float | None] | None = None,
    ) -> set[int]:
        """Extend ``owner``'s leases and record progress; return the ids still held.

        ``demands`` gives the bytes per second each download can use of the
        bandwidth pool (None: as much as it gets); see ``active_demands``.
        """
        if not progress:
            return set()
        now = self.clock()
        held: set[int] = set()
        with self._write() as conn:
            for row_id, report in progress.items():
                claimed_at = started.get(row_id) if started is not None else None
                demand = demands.get(row_id) if demands is not None else None
                result = conn.execute(
                    self._owned(row_id, owner, claimed_at).values(
                        lease_expires_at=now + timedelta(seconds=lease_s),
                        bytes_done=report.bytes_done,
                        bytes_total=report.bytes_total,
                        speed_bps=report.speed_bps,
                        rate_demand_bps=None if demand is None else int(demand),
                        updated_at=now,
                    )
                )
                if result.rowcount == 1:
                    held.add(row_id)
        return held

    def publish_demands(
        self,
        owner: str,
        demands: Mapping[int, float | None],
        *,
        started: Mapping[int, datetime | None] | None = None,
    ) -> None:
        """Record the pool demands of ``owner``'s downloads between renewals.

        The other workers read them at their next tick instead of after the
        next renewal, up to a second later. A download whose lease ``owner``
        lost is left alone.
        """
        if not demands:
            return
        with self._write() as conn:
            for row_id, demand in demands.items():
                claimed_at = started.get(row_id) if started is not None else None
                conn.execute(
                    self._owned(row_id, owner, claimed_at).values(
                        rate_demand_bps=None if demand is None else int(demand)
                    )
                )

    def finish(
        self,
        row_id: int,
        owner: str,
        *,
        file_path: str,
        size: int,
        download_ms: int,
        started_at: datetime | None = None,
    ) -> bool:
        """Hand a downloaded VOD to the upload stage; False when ``owner`` lost it.

        The VOD becomes ``downloaded`` with a fresh upload record, so an
        earlier upload of a file downloaded again is never taken for this one.
        """
        now = self.clock()
        with self._write() as conn:
            result = conn.execute(
                self._finishable(row_id, owner, started_at).values(
                    **FRESH_UPLOAD,
                    state=VodState.DOWNLOADED.value,
                    attempts=vods.c.attempts + 1,
                    file_path=file_path,
                    bytes_done=size,
                    bytes_total=size,
                    speed_bps=None,
                    next_attempt_at=None,
                    last_error=None,
                    error_class=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=now,
                    updated_at=now,
                    download_ms=download_ms,
                )
            )
            if result.rowcount != 1:
                return False
            release_path(conn, file_path, keep=row_id, now=now)
            self._record_download_time(conn, download_ms, now)
            transition = breaker.record_success(conn, now, row_id)
        self._notify_breaker(transition)
        return True

    def fail(
        self,
        row_id: int,
        owner: str,
        *,
        error: str,
        error_class: str,
        retry_at: datetime | None,
        started_at: datetime | None = None,
    ) -> VodState | None:
        """Record a failed attempt; requeue it for ``retry_at`` or fail it for good.

        Returns the new state, or None when ``owner`` no longer holds the VOD.
        """
        now = self.clock()
        state = VodState.QUEUED if retry_at is not None else VodState.FAILED
        with self._write() as conn:
            result = conn.execute(
                self._owned(row_id, owner, started_at).values(
                    state=state.value,
                    attempts=vods.c.attempts + 1,
                    next_attempt_at=retry_at,
                    last_error=error,
                    error_class=error_class,
                    speed_bps=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=now if state is VodState.FAILED else None,
                    updated_at=now,
                )
            )
            if result.rowcount != 1:
                return None
            transition = breaker.record_failure(
                conn, now, row_id, error_class, self.breaker_policy
            )
        self._notify_breaker(transition)
        return state

    def release(
        self,
        row_id: int,
        owner: str,
        *,
        state: VodState,
        started_at: datetime | None = None,
    ) -> bool:
        """Give a claimed VOD back without counting an attempt (cancel, shutdown)."""
        return self._let_go(row_id, owner, started_at, state=state.value)

    def give_up(
        self,
        row_id: int,
        owner: str,
        *,
        error: str,
        started_at: datetime | None = None,
    ) -> bool:
        """Fail a claimed VOD for good without an attempt (its attempts are used)."""
        return self._let_go(
            row_id,
            owner,
            started_at,
            state=VodState.FAILED.value,
            next_attempt_at=None,
            last_error=error,
            finished_at=self.clock(),
        )

    def _let_go(
        self, row_id: int, owner: str, started_at: datetime | None, **values: Any
    ) -> bool:
        """End ``owner``'s lease with ``values``, counting no attempt."""
        with self._write() as conn:
            result = conn.execute(
                self._owned(row_id, owner, started_at).values(
                    **values,
                    speed_bps=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=self.clock(),
                )
            )
            breaker.record_release(conn, row_id)
        return bool(result.rowcount == 1)

    # -- key-value state --------------------------------------------------

    def get_kv(
        self, keys: Iterable[str], conn: Connection | None = None
    ) -> dict[str, str]:
        """Read the values of ``keys`` that exist in the ``kv`` table.

        Reads through ``conn`` when given (see ``connect_read``).
        """
        query = select(kv.c.key, kv.c.value).where(kv.c.key.in_(list(keys)))
        if conn is None:
            with self._read() as own:
                rows = own.execute(query).all()
        else:
            rows = conn.execute(query).all()
        return {str(key): str(value) for key, value in rows}

    def connect_read(self) -> AbstractContextManager[Connection]:
        """Open one read-only connection for several reads.

        Each read through it saves a pool checkout (on PostgreSQL a pre-ping
        and a rollback, each a round trip). Failures raise StorageUnavailable.
        """
        return self._read()

    def delete_kv(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` from the ``kv`` table; missing keys are ignored."""
        names = list(keys)
        if not names:
            return
        with self._write() as conn:
            conn.execute(kv.delete().where(kv.c.key.in_(names)))

    def lease_owners(self) -> list[str]:
        """Return the distinct owners of running downloads' leases."""
        with self._read() as conn:
            rows = conn.execute(
                select(vods.c.lease_owner)
                .where(
                    vods.c.state == VodState.DOWNLOADING.value,
                    vods.c.lease_owner.is_not(None),
                )
                .distinct()
            ).scalars()
            return [str(owner) for owner in rows]

    def record_partial(
        self, row_id: int, started_at: datetime | None, bytes_done: int
    ) -> None:
        """Record the partial file's size, in bytes, of a download that stopped.

        The last heartbeat's progress is up to a second old, and a cancel from
        the API ends the lease before the download stops. Nothing changes
        once another claim has taken the VOD, which sets a new ``started_at``.
        """
        if started_at is None:
            return
        with self._write() as conn:
            conn.execute(
                update(vods)
                .where(
                    vods.c.id == row_id,
                    vods.c.started_at == started_at,
                    vods.c.lease_owner.is_(None),
                )
                .values(bytes_done=bytes_done)
            )

    def release_leases(self, owners: list[str]) -> list[str]:
        """Queue again every download leased to ``owners``; return their VOD ids."""
        if not owners:
            return []
        with self._write() as conn:
            rows = conn.execute(
                update(vods)
                .where(
                    vods.c.state == VodState.DOWNLOADING.value,
                    vods.c.lease_owner.in_(owners),
                )
                .values(**_back_to_queue(self.clock()))
                .returning(vods.c.vod_id)
            ).all()
        return [str(vod_id) for (vod_id,) in rows]

    def release_expired(self) -> None:
        """Queue again every download whose lease has expired, as a claim would.

        A read comes first, so that a worker with no free slot checks cheaply
        and takes the write lock only when a lease has expired.
        """
        now = self.clock()
        with self._read() as conn:
            expired = conn.execute(
                select(vods.c.id).where(IS_DOWNLOADING, _lease_expired(now)).limit(1)
            ).first()
        if expired is None:
            return
        with self._write() as conn:
            self._release_expired(conn, now)

    def count_active(self) -> int:
        """Count downloads with an unexpired lease, across every worker."""
        with self._read() as conn:
            return self._count_active(conn, self.clock())

    def active_demands(self) -> dict[int, float | None]:
        """Return the bandwidth demand of every download its worker still renews.

        Keys are row ids. A value is the bytes per second that the download's
        worker last renewed it with, or None for as much as it gets. A
        download not renewed since its claim has None too. A download not
        renewed for STALE_LEASE_S is left out although its lease runs on: its
        worker is dead, or paused while its download process stops reading.
        """
        now = self.clock()
        with self._read() as conn:
            rows = conn.execute(
                select(vods.c.id, vods.c.rate_demand_bps).where(
                    IS_DOWNLOADING,
                    vods.c.lease_expires_at > now,
                    vods.c.updated_at > now - timedelta(seconds=STALE_LEASE_S),
                )
            ).all()
        return {
            int(row_id): None if demand is None else float(demand)
            for row_id, demand in rows
        }

    def requeue_excess(self, limit: int, per_worker: int | None = None) -> int:
        """Return running downloads beyond ``limit`` to the queue; return how many.

        With ``per_worker``, each worker also keeps at most that many. The
        lowest-priority, most recently started ones go back first; their
        workers stop them at the next heartbeat, keeping partial files.
        """
        now = self.clock()
        with self._write() as conn:
            running = conn.execute(
                select(vods.c.id, vods.c.lease_owner)
                .where(vods.c.state == VodState.DOWNLOADING.value)
                .order_by(vods.c.priority.desc(), vods.c.started_at.asc(), vods.c.id)
            ).all()
            kept: list[int] = []
            excess: list[int] = []
            per_owner: dict[str | None, int] = {}
            for row_id, owner in running:
                held = per_owner.get(owner, 0)
                if len(kept) >= limit or (
                    per_worker is not None and held >= per_worker
                ):
                    excess.append(int(row_id))
                    continue
                per_owner[owner] = held + 1
                kept.append(int(row_id))
            if excess:
                conn.execute(
                    update(vods)
                    .where(vods.c.id.in_(excess))
                    .values(**_back_to_queue(now))
                )
        return len(excess)

    def set_kv(self, values: Mapping[str, str]) -> None:
        """Insert or replace ``values`` in the ``kv`` table."""
        with self._write() as conn:
            self._upsert_kv(conn, values, self.clock())

    # -- helpers --------------------------------------------------------

    def _notify_breaker(self, transition: str | None) -> None:
        if transition is None:
            return
        log.warning(
            "circuit breaker is now %s",
            transition,
            extra={"circuit_state": transition, "action": "breaker"},
        )
        if self.on_breaker_change is not None:
            self.on_breaker_change(transition)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """Open a read-only connection; failures raise StorageUnavailable."""
        try:
            with self.engine.connect().execution_options(
                sqlite_begin="DEFERRED"
            ) as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            raise StorageUnavailable(_unavailable(exc)) from exc

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """Open a transaction that commits on success or raises StorageUnavailable."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            raise StorageUnavailable(_unavailable(exc)) from exc

    def _finishable(self, row_id: int, owner: str, started_at: datetime | None) -> Any:
        """Like ``_owned``, but also accept the claim's row after its lease expired.

        A finished download whose lease lapsed (the database was away while it
        ran) still stands when nobody claimed the VOD since: expiry keeps
        ``started_at``, and any new claim changes it.
        """
        if started_at is None:
            return self._owned(row_id, owner)
        held = and_(
            vods.c.lease_owner == owner, vods.c.state == VodState.DOWNLOADING.value
        )
        lapsed = and_(
            vods.c.lease_owner.is_(None), vods.c.state == VodState.QUEUED.value
        )
        return update(vods).where(
            vods.c.id == row_id, vods.c.started_at == started_at, or_(held, lapsed)
        )

    def _owned(
        self, row_id: int, owner: str, started_at: datetime | None = None
    ) -> Any:
        """Update the row only while ``owner`` holds it, by this very claim.

        ``started_at`` is set by each claim, so it tells a later claim of the
        same worker from an earlier one whose thread has not yet ended.
        """
        query = update(vods).where(
            vods.c.id == row_id,
            vods.c.lease_owner == owner,
            vods.c.state == VodState.DOWNLOADING.value,
        )
        if started_at is not None:
            query = query.where(vods.c.started_at == started_at)
        return query

    def _lock_candidates(self, conn: Connection, now: datetime, room: int) -> list[int]:
        """Lock up to ``room`` eligible VODs (PostgreSQL); return their ids in order."""
        candidates = (
            select(vods.c.id)
            .where(
                IS_QUEUED,
                or_(vods.c.next_attempt_at.is_(None), vods.c.next_attempt_at <= now),
            )
            .order_by(*CLAIM_ORDER)
            .limit(room)
            .with_for_update(skip_locked=True)
        )
        return list(conn.execute(candidates).scalars())

    def _count_active(self, conn: Connection, now: datetime) -> int:
        return int(
            conn.execute(
                select(func.count()).where(
                    IS_DOWNLOADING, vods.c.lease_expires_at > now
                )
            ).scalar_one()
        )

    def _release_expired(self, conn: Connection, now: datetime) -> None:
        rows = conn.execute(
            update(vods)
            .where(IS_DOWNLOADING, _lease_expired(now))
            .values(**_back_to_queue(now))
            .returning(vods.c.vod_id)
        ).scalars()
        _log_expired([str(vod_id) for vod_id in rows])

    def _record_download_time(
        self, conn: Connection, download_ms: int, now: datetime
    ) -> None:
        stored = dict(
            conn.execute(
                select(kv.c.key, kv.c.value).where(
                    kv.c.key.in_(["avg_download_ms", "downloads_completed"])
                )
            ).all()
        )
        count = int(stored.get("downloads_completed", "0"))
        average = float(stored.get("avg_download_ms", "0"))
        average += (download_ms - average) / (count + 1)
        self._upsert_kv(
            conn,
            {
                "avg_download_ms": f"{average:.0f}",
                "downloads_completed": str(count + 1),
            },
            now,
        )

    def _upsert_kv(
        self, conn: Connection, values: Mapping[str, str], now: datetime
    ) -> None:
        for key, value in values.items():
            changed = conn.execute(
                update(kv).where(kv.c.key == key).values(value=value, updated_at=now)
            )
            if changed.rowcount == 0:
                conn.execute(insert(kv).values(key=key, value=value, updated_at=now))


# Upload columns of a VOD whose file has not been uploaded yet.
FRESH_UPLOAD: dict[str, Any] = {
    "upload_attempts": 0,
    "upload_next_at": None,
    "upload_session": None,
    "upload_started_at": None,
    "remote_id": None,
    "remote_url": None,
    "uploaded_at": None,
    "uploader": None,
    "upload_ms": None,
}


def _claim_flags(now: datetime) -> Any:
    """Build the one SELECT that the SQLite claim decides on.

    Returns ``paused`` and ``circuit_state`` (raw ``kv`` values or None),
    ``active`` (unexpired leases) and ``expired`` (whether any lease expired).
    """
    return select(
        _kv_value(PAUSED_KEY).label("paused"),
        _kv_value(breaker.STATE_KEY).label("circuit_state"),
        select(func.count())
        .where(IS_DOWNLOADING, vods.c.lease_expires_at > now)
        .scalar_subquery()
        .label("active"),
        exists()
        .where(
            IS_DOWNLOADING,
            or_(vods.c.lease_expires_at.is_(None), vods.c.lease_expires_at <= now),
        )
        .label("expired"),
    )


def _kv_value(key: str) -> Any:
    return select(kv.c.value).where(kv.c.key == key).scalar_subquery()


def _claim_order(vod: Vod) -> tuple[int, bool, datetime, int]:
    """Sort key of CLAIM_ORDER, for rows that RETURNING gives in no set order."""
    return (
        -vod.priority,
        vod.date is None,
        vod.date or datetime.min.replace(tzinfo=UTC),
        vod.id,
    )


def _lease_expired(now: datetime) -> Any:
    return or_(vods.c.lease_expires_at.is_(None), vods.c.lease_expires_at <= now)


def _log_expired(vod_ids: list[str]) -> None:
    for vod_id in vod_ids:
        log.warning(
            "lease of VOD %s expired; its worker is gone, so it is queued again",
            vod_id,
            extra={"vod_id": vod_id, "action": "lease_expired"},
        )


def release_path(conn: Connection, path: str, *, keep: int, now: datetime) -> None:
    """Clear ``path`` from every VOD but ``keep``, whose file is now at ``path``.

    An operator may move or delete an archived file, and another VOD may then
    be given the same name. The older record must not claim the new file, or
    a reprocess would take another VOD's bytes for its own and a delete with
    files would remove them.
    """
    conn.execute(
        update(vods)
        .where(vods.c.file_path == path, vods.c.id != keep)
        .values(file_path=None, updated_at=now)
    )


def _back_to_queue(now: datetime) -> dict[str, Any]:
    """Column values that return a running download to the queue, attempt uncounted."""
    return {
        "state": VodState.QUEUED.value,
        "lease_owner": None,
        "lease_expires_at": None,
        "speed_bps": None,
        "updated_at": now,
    }


def _unavailable(exc: OperationalError | InterfaceError) -> str:
    reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else exc
    return f"the database is unavailable: {reason}; retry shortly"


def to_vod(row: Row[Any]) -> Vod:
    """Build a Vod from a full row of ``vods``."""
    data = row._mapping
    return Vod(
        id=data["id"],
        vod_id=data["vod_id"],
        source_url=data["source_url"],
        title=data["title"],
        date=data["date"],
        channel=data["channel"],
        priority=int(data["priority"]),
        state=VodState(data["state"]),
        processed=bool(data["processed"]),
        attempts=int(data["attempts"]),
        next_attempt_at=data["next_attempt_at"],
        last_error=data["last_error"],
        error_class=data["error_class"],
        bytes_done=int(data["bytes_done"]),
        bytes_total=data["bytes_total"],
        speed_bps=data["speed_bps"],
        file_path=data["file_path"],
        lease_owner=data["lease_owner"],
        lease_expires_at=data["lease_expires_at"],
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        download_ms=data["download_ms"],
        skip_upload=bool(data["skip_upload"]),
        upload_attempts=int(data["upload_attempts"]),
        upload_next_at=data["upload_next_at"],
        upload_session=data["upload_session"],
        upload_started_at=data["upload_started_at"],
        remote_id=data["remote_id"],
        remote_url=data["remote_url"],
        uploaded_at=data["uploaded_at"],
        uploader=data["uploader"],
        upload_ms=data["upload_ms"],
    )

"""The upload stage's SQL: claim a downloaded VOD with a lease, record results.

It works like the download queue (vodq.queue) on the same rows. A claim runs
under the write lock on SQLite and under an advisory lock of its own on
PostgreSQL, so counting running uploads and claiming new ones happen
together and MAX_CONCURRENT_UPLOADS holds for the whole cluster. Leases use
the columns the download stage uses, because a VOD is never in both stages,
and ``upload_started_at`` distinguishes one claim from the next.

While a VOD is ``uploading``, ``bytes_done`` and ``speed_bps`` describe its
upload (as they describe a download while it runs), and every way out of
``uploading`` written here sets ``bytes_done`` back to the size of the file.

An attempt whose worker stopped without writing a result (its lease expired,
or its worker is found dead at start-up) counts as one upload attempt when
its lease is released, so the next attempt's number continues from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    case,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)

from vodq.db.schema import vods
from vodq.errors import InvalidInput, InvalidTransition, VodNotFound
from vodq.models import QUOTA_ERROR_CLASS, Progress, Vod, VodState
from vodq.queue import CLAIM_ORDER, FRESH_UPLOAD, VodQueue, release_path, to_vod

log = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock that serialises upload claims.
UPLOAD_LOCK_KEY = 0x766F6475  # "vodu"

# Literals, not bound parameters, so that the planner can use the partial
# index ix_vods_upload_claim (see vodq.queue for the same on downloads).
IS_DOWNLOADED = vods.c.state == literal_column(f"'{VodState.DOWNLOADED.value}'")
IS_UPLOADING = vods.c.state == literal_column(f"'{VodState.UPLOADING.value}'")

# States that reprocess moves back to the upload stage when the file exists.
REPROCESSABLE = (VodState.FAILED, VodState.CANCELLED, VodState.DONE)


class UploadStore:
    """The upload stage's reads and writes, in the queue's transactions."""

    def __init__(self, queue: VodQueue) -> None:
        self.queue = queue
        self.is_postgres = queue.is_postgres

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.queue.clock

    # -- the worker's side ----------------------------------------------

    def claim(
        self,
        owner: str,
        *,
        wanted: int,
        limit: int,
        lease_s: float,
        max_attempts: int | None = None,
        exclude: Collection[int] = (),
    ) -> list[Vod]:
        """Claim up to ``wanted`` downloaded VODs, leaving ``limit`` running at most.

        Expired upload leases go back to ``downloaded`` first, each counting
        its attempt (a VOD whose ``max_attempts`` are then used fails; None
        sets no limit), and VODs marked skip_upload become done without a slot.
        The row ids in ``exclude`` are not claimed.
        """
        now = self.clock()
        with self.queue._write() as conn:
            if self.is_postgres:
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPLOAD_LOCK_KEY}
                )
            expired = or_(
                vods.c.lease_expires_at.is_(None), vods.c.lease_expires_at <= now
            )
            self._end_abandoned(
                conn,
                expired,
                "its worker stopped renewing the lease",
                max_attempts,
                now,
            )
            self._skip_marked(conn, now)
            room = min(wanted, limit - self._count_active(conn, now))
            if room < 1:
                return []

            candidates = (
                select(vods.c.id)
                .where(
                    IS_DOWNLOADED,
                    vods.c.skip_upload.is_(False),
                    or_(vods.c.upload_next_at.is_(None), vods.c.upload_next_at <= now),
                )
                .order_by(*CLAIM_ORDER)
                .limit(room)
            )
            if exclude:
                candidates = candidates.where(vods.c.id.not_in(list(exclude)))
            if self.is_postgres:
                candidates = candidates.with_for_update(skip_locked=True)
            ids = list(conn.execute(candidates).scalars())
            if not ids:
                return []
            rows = conn.execute(
                update(vods)
                .where(vods.c.id.in_(ids), IS_DOWNLOADED)
                .values(
                    state=VodState.UPLOADING.value,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    upload_started_at=now,
                    updated_at=now,
                    # From here on the two count the upload, not the download.
                    bytes_done=0,
                    speed_bps=None,
                )
                .returning(vods)
            ).all()
        return sorted((to_vod(row) for row in rows), key=lambda vod: ids.index(vod.id))

    def renew(
        self,
        owner: str,
        started: Mapping[int, datetime | None],
        *,
        lease_s: float,
        progress: Mapping[int, Progress] | None = None,
    ) -> set[int]:
        """Extend ``owner``'s upload leases; return the row ids still held.

        ``progress`` records how far the uploads of those row ids got.
        """
        if not started:
            return set()
        now = self.clock()
        held: set[int] = set()
        with self.queue._write() as conn:
            for row_id, started_at in started.items():
                values: dict[str, Any] = {
                    "lease_expires_at": now + timedelta(seconds=lease_s),
                    "updated_at": now,
                }
                report = (progress or {}).get(row_id)
                if report is not None:
                    values.update(
                        bytes_done=report.bytes_done,
                        bytes_total=report.bytes_total,
                        speed_bps=report.speed_bps,
                    )
                result = conn.execute(
                    self._owned(row_id, owner, started_at).values(**values)
                )
                if result.rowcount == 1:
                    held.add(row_id)
        return held

    def save_session(
        self, row_id: int, owner: str, started_at: datetime | None, session: str
    ) -> bool:
        """Store an upload's resumable state; False when ``owner`` lost the VOD."""
        with self.queue._write() as conn:
            result = conn.execute(
                self._owned(row_id, owner, started_at).values(
                    upload_session=session, updated_at=self.clock()
                )
            )
        return bool(result.rowcount == 1)

    def finish(
        self,
        row_id: int,
        owner: str,
        started_at: datetime | None,
        *,
        uploader: str,
        remote_id: str | None,
        remote_url: str | None,
        file_path: str,
        upload_ms: int,
    ) -> bool:
        """Record the upload's result and mark the VOD done, in one transaction.

        The result is also kept when the lease lapsed but nobody claimed the
        VOD since (``upload_started_at`` unchanged): the copy exists, and
        uploading it again would make a second one. Releasing the lapsed
        lease counted the attempt already (and may have failed the VOD when
        that used its last attempt), so it is not counted again.
        """
        now = self.clock()
        held = and_(vods.c.lease_owner == owner, IS_UPLOADING)
        lapsed = and_(
            vods.c.lease_owner.is_(None),
            vods.c.state.in_([VodState.DOWNLOADED.value, VodState.FAILED.value]),
        )
        with self.queue._write() as conn:
            result = conn.execute(
                update(vods)
                .where(
                    vods.c.id == row_id,
                    vods.c.upload_started_at == started_at,
                    or_(held, lapsed),
                )
                .values(
                    state=VodState.DONE.value,
                    uploader=uploader,
                    remote_id=remote_id,
                    remote_url=remote_url,
                    uploaded_at=now,
                    file_path=file_path,
                    upload_ms=upload_ms,
                    upload_attempts=case(
                        (IS_UPLOADING, vods.c.upload_attempts + 1),
                        else_=vods.c.upload_attempts,
                    ),
                    **_FILE_COMPLETE,
                    upload_session=None,
                    upload_next_at=None,
                    last_error=None,
                    error_class=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
            if result.rowcount == 1:
                release_path(conn, file_path, keep=row_id, now=now)
        return bool(result.rowcount == 1)

    def fail(
        self,
        row_id: int,
        owner: str,
        started_at: datetime | None,
        *,
        error: str,
        retry_at: datetime | None,
    ) -> VodState | None:
        """Count a failed upload; keep it for ``retry_at`` or fail the VOD.

        The file stays either way. Returns the new state, or None when
        ``owner`` no longer owns the lease.
        """
        now = self.clock()
        state = VodState.DOWNLOADED if retry_at is not None else VodState.FAILED
        with self.queue._write() as conn:
            result = conn.execute(
                self._owned(row_id, owner, started_at).values(
                    state=state.value,
                    upload_attempts=vods.c.upload_attempts + 1,
                    upload_next_at=retry_at,
                    last_error=error,
                    error_class="upload_failed",
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                    **_FILE_COMPLETE,
                )
            )
        return state if result.rowcount == 1 else None

    def defer(
        self,
        row_id: int,
        owner: str,
        started_at: datetime | None,
        *,
        error: str,
        retry_at: datetime,
    ) -> bool:
        """Give a claimed upload back until ``retry_at``, counting no attempt.

        For a destination's limit that resets at a set time, such as a daily
        quota. The session stays for the next attempt. Returns False when
        ``owner`` no longer owns the lease.
        """
        now = self.clock()
        with self.queue._write() as conn:
            result = conn.execute(
                self._owned(row_id, owner, started_at).values(
                    state=VodState.DOWNLOADED.value,
                    upload_next_at=retry_at,
                    last_error=error,
                    error_class=QUOTA_ERROR_CLASS,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                    **_FILE_COMPLETE,
                )
            )
        return bool(result.rowcount == 1)

    def release(
        self, row_id: int, owner: str, started_at: datetime | None, state: VodState
    ) -> bool:
        """Give a claimed upload back without counting an attempt (shutdown)."""
        with self.queue._write() as conn:
            result = conn.execute(
                self._owned(row_id, owner, started_at).values(
                    state=state.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=self.clock(),
                    **_FILE_COMPLETE,
                )
            )
        return bool(result.rowcount == 1)

    def lease_owners(self) -> list[str]:
        """Return the distinct owners of running uploads' leases."""
        with self.queue._read() as conn:
            rows = conn.execute(
                select(vods.c.lease_owner)
                .where(IS_UPLOADING, vods.c.lease_owner.is_not(None))
                .distinct()
            ).scalars()
            return [str(owner) for owner in rows]

    def release_leases(
        self, owners: list[str], *, max_attempts: int | None = None
    ) -> list[str]:
        """Release every upload leased to ``owners``, which are known to be dead.

        Each counts its attempt as ``claim`` counts an expired one, and goes
        back to ``downloaded``, or fails once ``max_attempts`` are used.
        Returns their VOD ids.
        """
        if not owners:
            return []
        with self.queue._write() as conn:
            return self._end_abandoned(
                conn,
                vods.c.lease_owner.in_(owners),
                "its worker is no longer running",
                max_attempts,
                self.clock(),
            )

    def count_active(self) -> int:
        """Count uploads with an unexpired lease, across every worker."""
        with self.queue._read() as conn:
            return self._count_active(conn, self.clock())

    # -- operators' requests --------------------------------------------

    def requeue(self, vod: Vod) -> Vod:
        """Move a failed, cancelled or done VOD with a file back to the upload stage.

        A done VOD is uploaded as new, so its earlier result is cleared. A
        failed or cancelled one keeps its session, so the next attempt
        resumes the upload it interrupted.
        """
        if vod.state not in REPROCESSABLE:
            raise InvalidTransition(
                f"VOD {vod.vod_id!r} is {vod.state}; only failed, cancelled or "
                "done VODs can be reprocessed"
            )
        values: dict[str, Any] = {
            "state": VodState.DOWNLOADED.value,
            "upload_attempts": 0,
            "upload_next_at": None,
            "last_error": None,
            "error_class": None,
            "updated_at": self.clock(),
            # A cancelled upload left its progress behind.
            **_FILE_COMPLETE,
        }
        if vod.state is VodState.DONE:
            values.update(FRESH_UPLOAD)
        with self.queue._write() as conn:
            row = conn.execute(
                update(vods)
                .where(vods.c.id == vod.id, vods.c.state == vod.state.value)
                .values(**values)
                .returning(vods)
            ).first()
        if row is None:
            raise InvalidTransition(
                f"VOD {vod.vod_id!r} changed state while it was being reprocessed; "
                "read it again with GET /vods/{vod_id} and retry"
            )
        return to_vod(row)

    def queue_not_uploaded(
        self, vod_ids: list[str] | None, has_file: Callable[[Vod], bool]
    ) -> tuple[list[str], list[str]]:
        """Send done VODs that were never uploaded to the upload stage.

        With ``vod_ids`` every listed VOD must be done, not uploaded and have
        its file, or nothing changes and the first that is not raises. With
        None every such VOD is chosen, and those whose file is gone are
        returned apart. Returns the ids queued and the ids without a file.
        """
        with self.queue._write() as conn:
            query = select(vods).where(
                vods.c.state == VodState.DONE.value, vods.c.remote_id.is_(None)
            )
            if vod_ids is not None:
                query = select(vods).where(vods.c.vod_id.in_(vod_ids))
            found = {row.vod_id: to_vod(row) for row in conn.execute(query)}
            missing: list[str] = []
            if vod_ids is not None:
                for vod_id in vod_ids:
                    _check_uploadable(found.get(vod_id), vod_id, has_file)
                chosen = list(dict.fromkeys(vod_ids))
            else:
                chosen = [vod_id for vod_id, vod in found.items() if has_file(vod)]
                missing = [vod_id for vod_id in found if vod_id not in chosen]
            if chosen:
                conn.execute(
                    update(vods)
                    .where(
                        vods.c.vod_id.in_(chosen),
                        vods.c.state == VodState.DONE.value,
                        vods.c.remote_id.is_(None),
                    )
                    .values(
                        **FRESH_UPLOAD,
                        state=VodState.DOWNLOADED.value,
                        skip_upload=False,
                        updated_at=self.clock(),
                    )
                )
        return chosen, missing

    # -- retention ------------------------------------------------------

    def uploaded_before(self, before: datetime, limit: int) -> list[Vod]:
        """List done VODs uploaded before ``before`` that still have a file."""
        with self.queue._read() as conn:
            rows = conn.execute(
                select(vods)
                .where(
                    vods.c.state == VodState.DONE.value,
                    vods.c.remote_id.is_not(None),
                    vods.c.file_path.is_not(None),
                    vods.c.uploaded_at <= before,
                )
                .order_by(vods.c.uploaded_at)
                .limit(limit)
            )
            return [to_vod(row) for row in rows]

    def forget_file(self, vod: Vod) -> bool:
        """Clear the file path of a confirmed upload before its file is deleted.

        Returns False, and the file must stay, unless the VOD is still done
        with its remote id and that same path.
        """
        with self.queue._write() as conn:
            result = conn.execute(
                update(vods)
                .where(
                    vods.c.id == vod.id,
                    vods.c.state == VodState.DONE.value,
                    vods.c.remote_id.is_not(None),
                    vods.c.file_path == vod.file_path,
                )
                .values(file_path=None, updated_at=self.clock())
            )
        return bool(result.rowcount == 1)

    # -- helpers --------------------------------------------------------

    def _owned(self, row_id: int, owner: str, started_at: datetime | None) -> Any:
        """Update the row only while ``owner`` holds its upload, by this claim."""
        return update(vods).where(
            vods.c.id == row_id,
            vods.c.lease_owner == owner,
            IS_UPLOADING,
            vods.c.upload_started_at == started_at,
        )

    def _count_active(self, conn: Connection, now: datetime) -> int:
        return int(
            conn.execute(
                select(func.count()).where(IS_UPLOADING, vods.c.lease_expires_at > now)
            ).scalar_one()
        )

    def _end_abandoned(
        self,
        conn: Connection,
        condition: ColumnElement[bool],
        reason: str,
        max_attempts: int | None,
        now: datetime,
    ) -> list[str]:
        """Release the running uploads that match ``condition``, counting attempts.

        Each VOD goes back to ``downloaded``, or fails when that attempt was
        its last of ``max_attempts``. Returns the VOD ids released.
        """
        found = conn.execute(
            select(vods.c.id, vods.c.vod_id, vods.c.upload_attempts).where(
                IS_UPLOADING, condition
            )
        ).all()
        released: list[str] = []
        for row_id, vod_id, attempts in found:
            attempt = attempts + 1
            error = f"upload attempt {attempt} ended without a result because {reason}"
            used_up = max_attempts is not None and attempt >= max_attempts
            if used_up:
                error += (
                    f". Not retried: all {max_attempts} upload attempts are used; "
                    "reprocess the VOD to upload it again"
                )
            state = VodState.FAILED if used_up else VodState.DOWNLOADED
            # ``condition`` again, because the owner may have renewed the lease
            # since the SELECT (PostgreSQL renewals take no advisory lock).
            result = conn.execute(
                update(vods)
                .where(vods.c.id == row_id, IS_UPLOADING, condition)
                .values(
                    state=state.value,
                    upload_attempts=vods.c.upload_attempts + 1,
                    last_error=error,
                    error_class="upload_failed",
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                    **_FILE_COMPLETE,
                )
            )
            if result.rowcount != 1:
                continue
            released.append(str(vod_id))
            _log_abandoned(
                str(vod_id), attempt, reason, max_attempts if used_up else None
            )
        return released

    def _skip_marked(self, conn: Connection, now: datetime) -> None:
        # A skipped VOD is done, so an earlier failure or quota wait that it
        # was waiting out is no longer its error.
        rows = conn.execute(
            update(vods)
            .where(IS_DOWNLOADED, vods.c.skip_upload.is_(True))
            .values(
                state=VodState.DONE.value,
                upload_next_at=None,
                last_error=None,
                error_class=None,
                updated_at=now,
            )
            .returning(vods.c.vod_id)
        ).all()
        for (vod_id,) in rows:
            log.info(
                "VOD %s is marked skip_upload, so it is done without an upload",
                vod_id,
                extra={"vod_id": vod_id, "action": "upload_skip"},
            )


# Column values for a VOD that leaves ``uploading``: its progress columns
# describe the downloaded file again (bytes_total is its size since the
# download, and the upload's heartbeats keep it).
_FILE_COMPLETE: dict[str, Any] = {
    "bytes_done": func.coalesce(vods.c.bytes_total, vods.c.bytes_done),
    "speed_bps": None,
}


def _log_abandoned(vod_id: str, attempt: int, reason: str, last_of: int | None) -> None:
    """Log a released attempt; ``last_of`` is the limit that it reached, if any."""
    fields = {"vod_id": vod_id, "attempt": attempt, "action": "upload_lease_expired"}
    if last_of is not None:
        log.error(
            "upload attempt %d of VOD %s ended without a result because %s; it was "
            "the last of %d attempts, so the VOD failed (reprocess it to upload it "
            "again)",
            attempt,
            vod_id,
            reason,
            last_of,
            extra=fields,
        )
        return
    log.warning(
        "upload attempt %d of VOD %s ended without a result because %s; the VOD "
        "goes back to the upload stage and resumes from its stored session",
        attempt,
        vod_id,
        reason,
        extra=fields,
    )


def _check_uploadable(
    vod: Vod | None, vod_id: str, has_file: Callable[[Vod], bool]
) -> None:
    """Raise unless ``vod`` is done, not uploaded, and has its file."""
    if vod is None:
        raise VodNotFound(vod_id)
    if vod.state is not VodState.DONE:
        raise InvalidTransition(
            f"VOD {vod_id!r} is {vod.state}; only done VODs that were not "
            "uploaded can be uploaded with this call (reprocess a failed one)"
        )
    if vod.remote_id is not None:
        raise InvalidTransition(
            f"VOD {vod_id!r} is already uploaded as {vod.remote_id!r}; reprocess "
            "it to upload it again"
        )
    if not has_file(vod):
        shown = vod.file_path or "no path"
        raise InvalidInput(
            f"VOD {vod_id!r} has no file to upload ({shown} does not exist); "
            "reprocess it to download it again"
        )


def file_exists(vod: Vod) -> bool:
    """Tell whether ``vod``'s downloaded file is on this machine's disk."""
    return vod.file_path is not None and Path(vod.file_path).is_file()

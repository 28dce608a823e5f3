"""The upload stage of one worker: slots, leases, retries, cancel and retention.

A thread of its own claims downloaded VODs (vodq.upload.store) while this
worker has a free upload slot, renews their leases and writes their progress
every HEARTBEAT_S, and runs each upload on a thread of its own. Uploads hold
no download slot.

Exactly once: the uploader's resumable state is stored through
``on_session`` before it sends the file, and the remote id is written in the
same transaction that marks the VOD done. An attempt interrupted by a crash,
a kill or a lost lease leaves the VOD in ``uploading`` or ``downloaded``
with its session, and the next attempt gets that session back. An upload
thread checks its lease before it writes (``lease_held``), so an attempt
that resumes after a pause longer than the lease stops instead of writing
beside the attempt that took it over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from vodq.config import Settings
from vodq.errors import StorageUnavailable, UploadCancelled, UploadFailed, VodqError
from vodq.metrics import Metrics
from vodq.models import Progress, Vod, VodState
from vodq.retry import backoff_delay, store_outcome
from vodq.upload import (
    Uploader,
    UploadJob,
    UploadQuotaExceeded,
    UploadResult,
    archive,
)
from vodq.upload.retention import delete_expired_files
from vodq.upload.store import UploadStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Maximum delay before the stage notices a change made with SQL, in seconds.
POLL_INTERVAL_S = 1.0
# How often upload leases are renewed, in seconds.
HEARTBEAT_S = 1.0
# How often files of old confirmed uploads are looked for, in seconds.
RETENTION_CHECK_S = 60.0
# An upload thread checks in the database that it still holds its lease once
# less than this many seconds of the lease are known to remain. The stage's
# thread renews every HEARTBEAT_S, so this happens only when renewals fell
# behind, as after a pause of the process.
LEASE_CHECK_MARGIN_S = HEARTBEAT_S


class StopReason:
    """Why a running upload was stopped; decides the state it returns to."""

    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"


@dataclass
class RunningUpload:
    """An upload this process runs: its VOD, attempt and cancel flag."""

    vod: Vod
    attempt: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    # When the lease expires at the latest (time.monotonic()).
    lease_until: float = 0.0
    # The claim (upload_started_at) that the attempt's outcome was written
    # for, and whether it was written yet.
    outcome_claim: datetime | None = None
    outcome_written: bool = False
    # Bytes the uploader reports sent, and the size of the file (bytes).
    sent_bytes: int = 0
    size_bytes: int | None = None
    # Whether the uploader reported progress yet; a command reports none
    # until it exits.
    progress_reported: bool = False
    # (time.monotonic(), sent_bytes) at the last heartbeat, for the rate.
    rate_sample: tuple[float, int] | None = None


class UploadStage:
    """Runs up to MAX_CONCURRENT_UPLOADS uploads of downloaded VODs."""

    def __init__(
        self,
        store: UploadStore,
        uploader: Uploader | None,
        settings: Callable[[], Settings],
        metrics: Metrics,
    ) -> None:
        """Build the stage; ``uploader`` None means UPLOADER=none (rename only)."""
        self.store = store
        self.uploader = uploader
        self._settings = settings
        self.metrics = metrics
        self.worker_id = settings().worker_id
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[int, RunningUpload] = {}
        self._thread: threading.Thread | None = None
        self._last_renewal = 0.0
        self._last_retention = float("-inf")

    @property
    def settings(self) -> Settings:
        return self._settings()

    @property
    def uploader_name(self) -> str:
        return self.uploader.name if self.uploader is not None else "none"

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        """Free the upload leases of dead processes and start the stage's thread."""
        self._release_dead_leases()
        self._thread = threading.Thread(
            target=self._loop, name="vodq-uploads", daemon=True
        )
        self._thread.start()
        log.info(
            "upload stage started with uploader %s",
            self.uploader_name,
            extra={"worker_id": self.worker_id, "action": "upload_stage_start"},
        )

    def wake(self) -> None:
        """Look for uploads now: a download finished or an operator asked."""
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop claiming, stop running uploads (files stay) and wait for them.

        A shutdown counts no attempt. An upload whose thread has not ended
        within ``timeout_s`` seconds (for example, because the destination
        has not answered a request yet) gets its lease released here,
        uncounted, instead of expiring.
        """
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for entry in self.running():
            self._stop(entry, StopReason.SHUTDOWN)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

        # The stage's thread may have started an upload before it saw the stop.
        running = self.running()
        for entry in running:
            self._stop(entry, StopReason.SHUTDOWN)
        for entry in running:
            if entry.thread is not None:
                entry.thread.join(max(0.0, deadline - time.monotonic()))
        for entry in running:
            if self._is_alive(entry):
                self._release_at_shutdown(entry, timeout_s)

    def _release_at_shutdown(self, entry: RunningUpload, timeout_s: float) -> None:
        """Release the lease of an upload whose thread outlived stop(), uncounted.

        Without this, the lease would expire, and expiry counts an attempt as
        if the worker had died. The thread may still record a finished upload
        afterwards, because store.finish accepts a lapsed claim.
        """
        with self._lock:
            vod = entry.vod
        fields = {"vod_id": vod.vod_id, "attempt": entry.attempt}
        try:
            released = self.store.release(
                vod.id, self.worker_id, vod.upload_started_at, VodState.DOWNLOADED
            )
        except (StorageUnavailable, SQLAlchemyError) as exc:
            # One try only, because a shutdown must not wait for the database.
            log.warning(
                "upload of VOD %s did not stop within %.0fs and its lease could "
                "not be released, so the next start counts the attempt: %s",
                vod.vod_id,
                timeout_s,
                exc,
                extra={**fields, "action": "upload_stopped"},
            )
            return
        if released:
            log.warning(
                "upload of VOD %s did not stop within %.0fs; its lease is released "
                "without counting the attempt, and the VOD waits in downloaded "
                "for the next claim",
                vod.vod_id,
                timeout_s,
                extra={**fields, "action": "upload_stopped"},
            )

    def running(self) -> list[RunningUpload]:
        with self._lock:
            return list(self._running.values())

    def cancel_running(self, vod_id: str) -> bool:
        """Stop ``vod_id``'s upload if this process runs it; return whether it did."""
        entry = next((e for e in self.running() if e.vod.vod_id == vod_id), None)
        if entry is None:
            return False
        self._stop(entry, StopReason.CANCEL)
        return True

    def wait_stopped(self, vod_id: str, timeout_s: float) -> bool:
        """Wait until no upload of ``vod_id`` runs here; False if one still does."""
        threads = [
            entry.thread
            for entry in self.running()
            if entry.vod.vod_id == vod_id and entry.thread is not None
        ]
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    # -- the stage's thread -----------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self._renew()
                self._fill_slots()
                self._retention_if_due()
            except (StorageUnavailable, SQLAlchemyError) as exc:
                log.warning(
                    "could not claim uploads, retrying in %.0fs: %s",
                    POLL_INTERVAL_S,
                    exc,
                    extra={"worker_id": self.worker_id, "action": "upload_claim"},
                )
            self._wake.wait(min(POLL_INTERVAL_S, HEARTBEAT_S))

    def _fill_slots(self) -> None:
        settings = self.settings
        running = self.running()
        free = settings.max_concurrent_uploads - len(running)
        if free < 1:
            return
        # A VOD whose earlier attempt is still stopping here (cancelled, then
        # reprocessed at once) is claimed only once that thread has ended,
        # because the stopping thread writes no outcome for a new claim.
        stopping = [entry.vod.id for entry in running if entry.cancelled.is_set()]
        claimed_at = time.monotonic()
        for vod in self.store.claim(
            self.worker_id,
            wanted=free,
            limit=settings.max_concurrent_uploads,
            lease_s=settings.lease_duration,
            max_attempts=settings.upload_max_attempts,
            exclude=stopping,
        ):
            if self._stopping.is_set():
                # stop() may have looked at the running uploads already.
                self._release_claim(vod, "the upload stage is stopping")
                continue
            lease_until = claimed_at + settings.lease_duration
            with self._lock:
                previous = self._running.get(vod.id)
                adopted = False
                if previous is not None and not previous.cancelled.is_set():
                    # The lease lapsed while the earlier attempt's thread
                    # still runs here. A second thread would upload the same
                    # file twice, so the earlier one goes on under this
                    # claim, as the attempt that the database counts next.
                    previous.vod = vod
                    previous.lease_until = lease_until
                    previous.attempt = vod.upload_attempts + 1
                    adopted = True
            if previous is None:
                self._start_upload(vod, lease_until)
            elif adopted:
                log.warning(
                    "claimed VOD %s again while its earlier upload is still "
                    "running in this worker; that upload continues under the "
                    "new claim",
                    vod.vod_id,
                    extra={"vod_id": vod.vod_id, "action": "upload_claim"},
                )
            else:
                # Cancelled between the list of stopping uploads and the claim.
                self._release_claim(
                    vod, "its earlier upload is still stopping in this worker"
                )

    def _release_claim(self, vod: Vod, reason: str) -> None:
        """Give back a claim that no thread here runs, counting no attempt.

        The VOD goes back to ``downloaded``, so the next claim (by this
        worker or another) starts its upload afresh.
        """
        released = self._store(
            lambda: self.store.release(
                vod.id, self.worker_id, vod.upload_started_at, VodState.DOWNLOADED
            )
        )
        log.info(
            "claim of VOD %s given back without counting an attempt because %s",
            vod.vod_id,
            reason,
            extra={
                "vod_id": vod.vod_id,
                "released": bool(released),
                "action": "upload_claim",
            },
        )

    def _start_upload(self, vod: Vod, lease_until: float) -> None:
        entry = RunningUpload(
            vod=vod, attempt=vod.upload_attempts + 1, lease_until=lease_until
        )
        thread = threading.Thread(
            target=self._run, args=(entry,), name=f"vodq-upload-{vod.id}", daemon=True
        )
        entry.thread = thread
        with self._lock:
            self._running[vod.id] = entry
            active = len(self._running)
        self.metrics.active_uploads.set(active)
        thread.start()

    def _renew(self) -> None:
        """Renew this process's upload leases; stop uploads whose VOD was taken."""
        if time.monotonic() - self._last_renewal < HEARTBEAT_S:
            return
        self._last_renewal = time.monotonic()
        running = self.running()
        if not running:
            return
        lease_s = self.settings.lease_duration
        renewed_at = time.monotonic()
        try:
            held = self.store.renew(
                self.worker_id,
                {entry.vod.id: entry.vod.upload_started_at for entry in running},
                lease_s=lease_s,
                progress={entry.vod.id: self._progress(entry) for entry in running},
            )
        except (StorageUnavailable, SQLAlchemyError) as exc:
            log.warning(
                "could not renew upload leases: %s",
                exc,
                extra={"worker_id": self.worker_id, "action": "upload_heartbeat"},
            )
            # Another worker may take a VOD once its lease expires, so an
            # upload that would outlive its lease stops here.
            for entry in running:
                if entry.lease_until <= time.monotonic() + HEARTBEAT_S:
                    self._stop(entry, StopReason.LEASE_LOST)
            return
        for entry in running:
            if entry.vod.id in held:
                entry.lease_until = renewed_at + lease_s
            elif not entry.cancelled.is_set() and self._is_alive(entry):
                self._on_lease_lost(entry)

    def _on_lease_lost(self, entry: RunningUpload) -> None:
        vod_id = entry.vod.vod_id
        try:
            state: VodState | None = self.store.queue.get(vod_id).state
        except VodqError:
            state = None
        if state is VodState.DONE and entry.outcome_written:
            # This worker has just recorded the result.
            return
        reason = StopReason.CANCEL if state is VodState.CANCELLED else None
        log.warning(
            "VOD %s is %s, no longer uploading here; stopping its upload",
            vod_id,
            state,
            extra={"vod_id": vod_id, "action": "upload_lease_lost"},
        )
        self._stop(entry, reason or StopReason.LEASE_LOST)

    # -- an upload thread -------------------------------------------------

    def _run(self, entry: RunningUpload) -> None:
        vod = entry.vod
        fields = {"vod_id": vod.vod_id, "attempt": entry.attempt}
        try:
            job = self._job(entry)
            entry.size_bytes = job.size
            log.info(
                "upload started with %s: %d bytes",
                self.uploader_name,
                job.size,
                extra={**fields, "bytes": job.size, "action": "upload_start"},
            )
            if self.uploader is None:
                path = archive.place(
                    job,
                    self.settings.archive_name_template,
                    lambda session: self._save_session(entry, session),
                )
                result = None
            else:
                path = job.path
                result = self.uploader.upload(
                    job,
                    cancelled=entry.cancelled,
                    on_session=lambda session: self._save_session(entry, session),
                    on_progress=lambda sent: self._on_progress(entry, sent),
                    lease_held=lambda: self._lease_held(entry),
                )
        except UploadCancelled:
            self._after_stop(entry)
        except UploadFailed as exc:
            self._after_failure(entry, exc)
        except Exception as exc:
            log.exception("upload crashed", extra={**fields, "action": "upload_crash"})
            self._after_failure(
                entry, UploadFailed(f"unexpected error: {exc}", retryable=True)
            )
        else:
            self._after_success(entry, path, result)
        finally:
            # Counted when the attempt ends, with its outcome, as downloads are.
            self.metrics.uploads_started.inc()
            with self._lock:
                self._running.pop(vod.id, None)
                active = len(self._running)
                claim = entry.vod.upload_started_at
            self.metrics.active_uploads.set(active)
            if entry.outcome_written and claim != entry.outcome_claim:
                # A new claim came after this outcome was written; nothing
                # runs for it here, so it goes back for the next claim.
                self._store(
                    lambda: self.store.release(
                        vod.id, self.worker_id, claim, VodState.DOWNLOADED
                    )
                )
            self.wake()

    def _on_progress(self, entry: RunningUpload, sent: int) -> None:
        # Kept in memory only; the next heartbeat writes it (see _renew).
        entry.sent_bytes = sent
        entry.progress_reported = True

    def _progress(self, entry: RunningUpload) -> Progress:
        """Return ``entry``'s progress, with its rate since the last heartbeat."""
        now = time.monotonic()
        sent = entry.sent_bytes
        speed_bps = None
        then, sent_then = entry.rate_sample or (now, sent)
        # No rate before the first report and the first heartbeat, or when a
        # resume went back to the destination's offset.
        if entry.progress_reported and now > then and sent >= sent_then:
            speed_bps = round((sent - sent_then) / (now - then))
        entry.rate_sample = (now, sent)
        total = entry.size_bytes or entry.vod.bytes_total
        return Progress(bytes_done=sent, bytes_total=total, speed_bps=speed_bps)

    def _lease_held(self, entry: RunningUpload) -> bool:
        """Tell whether this worker still holds ``entry``'s lease; see Uploader.

        While the lease is known to last, no other worker can have claimed
        the VOD, so no query is needed. Past that, as after a SIGSTOP, a
        renewal in the database decides. It succeeds only while no other
        worker took the VOD over, and then keeps it for another LEASE_DURATION.
        """
        # NOTE: time.monotonic() stops while the machine is suspended, so
        # after a suspend this passes until the next heartbeat (at most
        # HEARTBEAT_S later) finds the lease lost and sets ``cancelled``.
        if time.monotonic() < entry.lease_until - LEASE_CHECK_MARGIN_S:
            return True
        lease_s = self.settings.lease_duration
        renewed_at = time.monotonic()
        vod = entry.vod
        try:
            renewed = vod.id in self.store.renew(
                self.worker_id, {vod.id: vod.upload_started_at}, lease_s=lease_s
            )
        except (StorageUnavailable, SQLAlchemyError) as exc:
            log.warning(
                "could not check the upload lease of VOD %s, so the upload stops "
                "before another worker could take it over: %s",
                vod.vod_id,
                exc,
                extra={"vod_id": vod.vod_id, "action": "upload_lease_lost"},
            )
            renewed = False
        if renewed:
            entry.lease_until = renewed_at + lease_s
            return True
        self._stop(entry, StopReason.LEASE_LOST)
        return False

    def _job(self, entry: RunningUpload) -> UploadJob:
        vod = entry.vod
        path = Path(vod.file_path) if vod.file_path else None
        if path is not None and path.is_file():
            size = path.stat().st_size
        elif path is not None and self.uploader is None and vod.upload_session:
            # The rename may have happened before the attempt was cut short;
            # archive.place looks for the file under the stored name.
            size = 0
        else:
            raise UploadFailed(
                f"the downloaded file {vod.file_path!r} is missing; reprocess "
                "the VOD to download it again",
                retryable=False,
            )
        return UploadJob(
            vod_id=vod.vod_id,
            path=path,
            size=size,
            attempt=entry.attempt,
            title=vod.title,
            channel=vod.channel,
            date=vod.date,
            source_url=vod.source_url,
            session=vod.upload_session,
        )

    def _save_session(self, entry: RunningUpload, session: str) -> None:
        """Store the uploader's resumable state before it sends any bytes.

        Raises UploadCancelled when the state cannot be stored, because an
        upload that a later attempt could not find might be sent twice.
        """
        vod = entry.vod
        saved = self._store(
            lambda: self.store.save_session(
                vod.id, self.worker_id, vod.upload_started_at, session
            )
        )
        if not saved:
            self._stop(entry, StopReason.LEASE_LOST)
            raise UploadCancelled(
                f"could not store the upload session of VOD {vod.vod_id!r}, so "
                "the upload stops before it could be sent twice"
            )

    def _after_success(
        self, entry: RunningUpload, path: Path, result: UploadResult | None
    ) -> None:
        vod = self._outcome_vod(entry)
        duration_s = time.monotonic() - entry.started_monotonic
        recorded = self._store(
            lambda: self.store.finish(
                vod.id,
                self.worker_id,
                vod.upload_started_at,
                uploader=self.uploader_name,
                remote_id=result.remote_id if result else None,
                remote_url=result.remote_url if result else None,
                file_path=str(path),
                upload_ms=round(duration_s * 1000),
            )
        )
        fields = {
            "vod_id": vod.vod_id,
            "attempt": entry.attempt,
            "duration_ms": round(duration_s * 1000),
        }
        if not recorded:
            log.warning(
                "upload finished after another worker took the VOD over; that "
                "worker's attempt verifies the upload through its session",
                extra={**fields, "action": "upload_lease_lost"},
            )
            return
        self.metrics.uploads_succeeded.inc()
        self.metrics.upload_duration.observe(duration_s)
        log.info(
            "upload finished in %.1fs: %s",
            duration_s,
            result.remote_url or result.remote_id if result else path.name,
            extra={
                **fields,
                "remote_id": result.remote_id if result else None,
                "path": str(path),
                "action": "upload_done",
            },
        )
        if result is not None and self.settings.upload_retention == 0:
            self.apply_retention()

    def _after_failure(self, entry: RunningUpload, error: UploadFailed) -> None:
        if isinstance(error, UploadQuotaExceeded):
            self._after_quota(entry, error)
            return
        vod = self._outcome_vod(entry)
        settings = self.settings
        retry_at = None
        message = str(error)
        if error.retryable and entry.attempt < settings.upload_max_attempts:
            delay_s = backoff_delay(entry.attempt, settings.upload_backoff_base)
            # A destination that names its wait (a quota that resets at a set
            # time) is not asked again before it.
            delay_s = max(delay_s, error.retry_after_s or 0.0)
            retry_at = self.store.clock() + timedelta(seconds=delay_s)
        elif error.retryable:
            message += (
                f". Not retried: all {settings.upload_max_attempts} upload attempts "
                "are used; reprocess the VOD to upload it again"
            )
        state = self._store(
            lambda: self.store.fail(
                vod.id,
                self.worker_id,
                vod.upload_started_at,
                error=message,
                retry_at=retry_at,
            )
        )
        self.metrics.uploads_failed.inc()
        fields = {"vod_id": vod.vod_id, "attempt": entry.attempt, "error": str(error)}
        if state is VodState.DOWNLOADED and retry_at is not None:
            log.warning(
                "upload failed, retrying at %s: %s",
                retry_at.isoformat(),
                error,
                extra={**fields, "retry_at": retry_at.isoformat(), "action": "retry"},
            )
        elif state is VodState.FAILED:
            reason = (
                "cannot succeed on retry"
                if not error.retryable
                else f"all {settings.upload_max_attempts} attempts used"
            )
            log.error(
                "upload failed for good (%s), file kept at %s: %s",
                reason,
                vod.file_path,
                error,
                extra={**fields, "action": "upload_failed"},
            )
        else:
            log.warning(
                "upload failed after this worker lost its lease: %s",
                error,
                extra={**fields, "action": "upload_lease_lost"},
            )

    def _after_quota(self, entry: RunningUpload, error: UploadQuotaExceeded) -> None:
        """Wait for the destination's quota to reset, counting no attempt."""
        vod = self._outcome_vod(entry)
        # The backoff is a floor, so that a destination that names no wait
        # is not asked again at once, over and over, without an attempt.
        backoff_s = backoff_delay(entry.attempt, self.settings.upload_backoff_base)
        wait_s = max(error.retry_after_s or 0.0, backoff_s)
        retry_at = self.store.clock() + timedelta(seconds=wait_s)
        deferred = self._store(
            lambda: self.store.defer(
                vod.id,
                self.worker_id,
                vod.upload_started_at,
                error=str(error),
                retry_at=retry_at,
            )
        )
        fields = {"vod_id": vod.vod_id, "attempt": entry.attempt, "error": str(error)}
        if not deferred:
            log.warning(
                "upload hit the destination's quota after this worker lost its "
                "lease: %s",
                error,
                extra={**fields, "action": "upload_lease_lost"},
            )
            return
        log.warning(
            "upload waits for the destination's quota until %s; the attempt is "
            "not counted: %s",
            retry_at.isoformat(),
            error,
            extra={
                **fields,
                "retry_at": retry_at.isoformat(),
                "action": "upload_quota",
            },
        )

    def _after_stop(self, entry: RunningUpload) -> None:
        vod = self._outcome_vod(entry)
        reason = entry.stop_reason or StopReason.SHUTDOWN
        # A cancel from the API has already written ``cancelled``; after a
        # shutdown the VOD waits in ``downloaded`` for the next start.
        if reason == StopReason.SHUTDOWN:
            self._store(
                lambda: self.store.release(
                    vod.id,
                    self.worker_id,
                    vod.upload_started_at,
                    VodState.DOWNLOADED,
                )
            )
        log.warning(
            "upload stopped (%s); the file is kept at %s",
            reason,
            vod.file_path,
            extra={
                "vod_id": vod.vod_id,
                "attempt": entry.attempt,
                "reason": reason,
                "action": "upload_stopped",
            },
        )

    def _outcome_vod(self, entry: RunningUpload) -> Vod:
        """Return the claim the outcome is written for, and note it."""
        with self._lock:
            entry.outcome_claim = entry.vod.upload_started_at
            entry.outcome_written = True
            return entry.vod

    def _stop(self, entry: RunningUpload, reason: str) -> None:
        if entry.stop_reason is None:
            entry.stop_reason = reason
        entry.cancelled.set()

    def _is_alive(self, entry: RunningUpload) -> bool:
        return entry.thread is not None and entry.thread.is_alive()

    def _store(self, write: Callable[[], T]) -> T | None:
        """Run a result write; see vodq.retry.store_outcome."""
        return store_outcome(
            write,
            within_s=self.settings.lease_duration,
            what="an upload result",
            worker_id=self.worker_id,
        )

    # -- retention --------------------------------------------------------

    def _retention_if_due(self) -> None:
        if self.settings.upload_retention is None:
            return
        if time.monotonic() - self._last_retention < RETENTION_CHECK_S:
            return
        self._last_retention = time.monotonic()
        self.apply_retention()

    def apply_retention(self) -> int:
        """Delete files of confirmed uploads older than UPLOAD_RETENTION now."""
        retention_s = self.settings.upload_retention
        if retention_s is None:
            return 0
        return delete_expired_files(
            self.store, retention_s, self.settings.data_dir / "vods"
        )

    # -- start-up ---------------------------------------------------------

    def _release_dead_leases(self) -> None:
        """Return uploads held by this worker's id or dead local pids to the stage."""
        try:
            owners = [self.worker_id]
            prefix = socket.gethostname() + "-"
            for owner in self.store.lease_owners():
                pid_text = owner.removeprefix(prefix)
                if owner != pid_text and pid_text.isdigit() and _is_dead(int(pid_text)):
                    owners.append(owner)
            released = self.store.release_leases(
                owners, max_attempts=self.settings.upload_max_attempts
            )
        except (StorageUnavailable, SQLAlchemyError) as exc:
            log.warning(
                "could not release upload leases of dead workers: %s",
                exc,
                extra={"worker_id": self.worker_id, "action": "upload_stage_start"},
            )
            return
        for vod_id in released:
            log.warning(
                "upload of VOD %s was held by a worker that is no longer running; "
                "its attempt is counted and the next one resumes from the stored "
                "session",
                vod_id,
                extra={"vod_id": vod_id, "action": "upload_lease_released"},
            )


def _is_dead(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def make_uploader(settings: Settings) -> Uploader | None:
    """Build the uploader UPLOADER names; None for ``none`` (rename only)."""
    if settings.uploader == "command":
        from vodq.upload.command import CommandUploader

        return CommandUploader(
            settings.upload_command,
            timeout_s=settings.upload_command_timeout,
            orphan_after_s=settings.lease_duration / 2,
        )
    if settings.uploader == "youtube":
        # Imported here, so that the default uploaders never need its code.
        from vodq.upload.youtube import YouTubeUploader

        assert settings.youtube_credentials_file is not None
        uploader: Uploader = YouTubeUploader(
            settings.youtube_credentials_file,
            api_url=settings.youtube_api_url,
            privacy=settings.youtube_privacy,
            title_template=settings.youtube_title_template,
            description_template=settings.youtube_description_template,
            chunk_bytes=settings.youtube_chunk_bytes,
            timeout_s=settings.youtube_timeout,
        )
        return uploader
    return None

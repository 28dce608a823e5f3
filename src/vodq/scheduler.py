"""Slots, wake-ups, lease heartbeats and shutdown for one worker process.

The scheduler thread decides what runs. It claims VODs whenever a slot is
free and it is woken: by a download that ends, by an API call that adds or
re-prioritises a VOD, or by a timer every ``POLL_INTERVAL_S`` that picks up
changes made with SQL behind the service's back and leases that expired.
Each claimed VOD downloads on a thread of its own. A heartbeat thread
measures the downloads and applies the rate limits every ``RATE_TICK_S``,
and renews the leases and writes progress to the database once per
``HEARTBEAT_S``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from vodq.bandwidth import (
    HEADROOM,
    LENT_MARGIN,
    SpareTokens,
    TokenBucket,
    demand_of,
    fair_shares,
    lent_demand,
)
from vodq.config import Settings
from vodq.download import Downloader, DownloadJob, DownloadResult
from vodq.errors import (
    DownloadCancelled,
    DownloadFailed,
    StorageUnavailable,
    VodqError,
)
from vodq.metrics import Metrics
from vodq.models import Progress, Vod, VodState
from vodq.queue import VodQueue
from vodq.retry import RetryPolicy, next_attempt_at, store_outcome
from vodq.wakeups import RATES_CHANGED
from vodq.workers import WORKER_HEARTBEAT_S, WorkerRegistry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Longest a change made with SQL waits before the scheduler sees it, in seconds.
POLL_INTERVAL_S = 1.0
# How often leases are renewed and progress written, in seconds.
HEARTBEAT_S = 1.0
# How often the downloads are measured and the rate limits applied, in
# seconds. At one tick a second, a pooled source that sends a tenth of its
# share was found 1.5 to 2.5 s after its first bytes. The first 5 s window
# from 2 s then fell up to 5.6% short.
RATE_TICK_S = 0.5
# How often last_process_run is written to the kv table, in seconds.
LAST_RUN_WRITE_S = 5.0
# A download's received rate is measured over the ticks since its limit
# last changed: at most RATE_SAMPLES of them (3 s), spanning at least
# MIN_RATE_SPAN_S seconds. The span is below 1 s because samples carry the
# report times, and a source that sends 16 KiB a second reports 0.96 s apart.
RATE_SAMPLES = 7
MIN_RATE_SPAN_S = 0.9
# Shortest span of the speed shown in the API, in seconds.
SPEED_SPAN_S = 0.5
# A download held back by its source is measured over the last
# RECENT_SAMPLES ticks (about 8 s), whatever its limit. A source that
# sends 16 KiB bursts about once a second measures within 12% over 8 s,
# below the 35% that flapping to an equal share needs (bandwidth.HEADROOM).
# Over 3 s it measured 20% either way, and flapped now and then.
# A source that sends a burst every 2 s or more can still read 25% off
# over 8 s, so it may flap between a small share and an equal one. The
# worker's other downloads borrow what it leaves meanwhile
# (bandwidth.SpareTokens).
RECENT_SAMPLES = 17
# Shortest span over which a download held back by its source must fill
# SATURATED_SHARE of its limit to get an equal share again, in seconds.
SATURATED_SPAN_S = 2.5
# Span of the rate that other workers count for a download held back by its
# source (``RunningDownload.held_rate``), in seconds. Over its last second,
# a source at 60% of its share (307K) that sends one burst a second read
# 205K to 435K. Counted at the higher readings, it left the pool 6.4% short.
# A longer span follows a source that speeds up more slowly.
LENT_SPAN_S = 2.0
# A download that received less than FAR_BELOW_SHARE of its limit over at
# least FAR_BELOW_SPAN_S seconds counts as held back before MIN_RATE_SPAN_S
# of samples are in, and a raise keeps its samples. Without this, three slow
# sources among five left the first window at 2M up to 8.9% short, because
# a raise cleared the last one's samples and it was found 3 s late. A
# download at its limit reads that low only in a stall, and then loses part
# of its share for a tick or two. Over 0.25 s a source that sends a burst
# every 0.4 s read half its rate, so the reading counts FAR_BELOW_MARGIN
# times. Taken as it was, it set a limit below what the source sent, and
# the download flapped.
FAR_BELOW_SHARE = 0.5
FAR_BELOW_SPAN_S = 0.25
FAR_BELOW_MARGIN = 2.0
# Seconds without a progress report after which a download is sampled at
# the tick's time rather than skipped.
QUIET_S = 1.0
# Seconds after a download's first progress report before it is measured,
# so that a connection still starting is not taken for a slow source. At
# 1 s a pooled slow source was found only after the first 5 s window began.
STARTUP_S = 0.5
# Smallest relative change of a download's pool share that is applied, so
# that a share measured a little differently each tick stays put.
MIN_RATE_CHANGE = 0.01
# Smallest relative change of a download's demand written to the database
# between renewals. Other workers then see a source slow down or speed up at
# their next tick, without a write at every tick.
MIN_DEMAND_CHANGE = 0.05


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The end of a classified message, which announces the next attempt.
_RETRY_PROMISE = re.compile(r"\. Retried\b.*$", re.DOTALL)


class CancelReason:
    """Why a running download was stopped; decides the state it returns to."""

    CANCEL = "cancel"
    PAUSE = "pause"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"


@dataclass
class RunningDownload:
    """A download this process runs: its VOD, cancel flag, throttle and progress."""

    vod: Vod
    attempt: int
    bucket: TokenBucket
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    progress: Progress = field(default_factory=lambda: Progress(0, None, None))
    started_monotonic: float = field(default_factory=time.monotonic)
    bytes_counted: int = 0
    resumed_bytes: int = 0
    thread: threading.Thread | None = None
    # When the lease expires at the latest (time.monotonic()), counted from
    # just before the claim or the last renewal that the database accepted.
    lease_until: float = 0.0
    # When the first and the last progress report arrived (time.monotonic()).
    first_progress_at: float | None = None
    progress_at: float = 0.0
    # (progress_at, bytes_done) at the ticks since the limit changed. The
    # report's own time, not the tick's, so that bytes arriving in read
    # blocks do not make the rate jump between ticks.
    samples: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=RATE_SAMPLES)
    )
    # The rate it can use from the pool (None: as much as it gets), kept from
    # the last measurement while the samples under a new limit build up.
    demand: float | None = None
    # The demand the other workers count (bandwidth.lent_demand), and the
    # last one written to the database, if any was (``written``).
    published: float | None = None
    written_demand: float | None = None
    written: bool = False
    # (time, bytes_done) at the last ticks, whatever the limit, for the
    # speed shown in the API and the demand of a download held back.
    recent: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=RECENT_SAMPLES)
    )
    # The time of the last sample (time.monotonic()) when the download was
    # found held back by its source; None while it is not.
    held_at: float | None = None
    # The pool's share before the cap that bounds a held-back download to
    # what the other workers count (``Scheduler._rates``), in bytes per
    # second; None while it is not capped.
    uncapped: float | None = None

    def measured_rate(self) -> float | None:
        """Return the bytes per second received under the current limit, if known."""
        return _rate_over(self.samples, MIN_RATE_SPAN_S)

    def recent_speed(self) -> int | None:
        """Return the bytes per second received over the last second or so.

        yt-dlp's own figure for a plain HTTP download averages since the
        download started, so it lags a new limit by minutes on a long VOD.
        """
        rate = self.last_second()
        return self.progress.speed_bps if rate is None else round(rate)

    def last_second(self) -> float | None:
        """Return the bytes per second received over about the last second."""
        # Over the last three samples, so that the figure follows a rate
        # change within a second or two.
        return _rate_over(deque(list(self.recent)[-3:]), SPEED_SPAN_S)

    def demand_moved(self) -> bool:
        """Return whether ``published`` moved from the demand last written.

        A move to or from None counts, and otherwise one of more than
        MIN_DEMAND_CHANGE.
        """
        old, new = self.written_demand, self.published
        if not self.written or (old is None) != (new is None):
            return True
        if old is None or new is None:
            return False
        return abs(new - old) > MIN_DEMAND_CHANGE * old

    def mark_written(self) -> None:
        """Record that the database now has ``published`` as the demand."""
        self.written_demand = self.published
        self.written = True

    def next_demand(self) -> float | None:
        """Return the rate this download can use from the pool, measured now.

        A download held back by its source is measured over the last
        RECENT_SAMPLES ticks whatever its limit, which stays above what
        it receives, and over at least SATURATED_SPAN_S. Over a shorter span
        a source that sends in bursts can look as fast as its limit, and
        flapping back to an equal share would leave that share unused. A
        download found held back under its current limit takes the larger of
        the two rates, because one second of such a source can show far less
        than it sends.
        """
        longer = _rate_over(self.recent, SATURATED_SPAN_S)
        if self.demand is not None:
            # Until the longer span is in, the rate under the current limit
            # counts. A demand from a doubled short reading is three times
            # what the source sends, and would hold that share for 2.5 s.
            measured = longer
            if measured is None:
                measured = self.measured_rate()
        else:
            measured = self.measured_rate()
            if measured is None:
                quick = self._far_below()
                if quick is not None:
                    measured = quick * FAR_BELOW_MARGIN
            held_back = demand_of(self.pool_limit(), measured) is not None
            if held_back and longer is not None and measured is not None:
                measured = max(measured, longer)
        if measured is None:
            return self.demand
        return demand_of(self.pool_limit(), measured)

    def pool_limit(self) -> float | None:
        """Return the limit the pool gives the download, before any cap (B/s).

        A capped download reads at its cap when its source comes back. Measured
        against the cap, it would count as saturated and take its equal share
        at once, before the other workers give it back.
        """
        return self.bucket.rate if self.uncapped is None else self.uncapped

    def update_demand(self) -> None:
        """Measure ``demand`` anew, and note when the download became held back."""
        demand = self.next_demand()
        if demand is None:
            self.held_at = None
        elif self.held_at is None and self.recent:
            self.held_at = self.recent[-1][0]
        self.demand = demand

    def held_rate(self) -> float | None:
        """Return the bytes per second received over the last LENT_SPAN_S
        since the download was found held back (all of that time while it
        is shorter), over MIN_RATE_SPAN_S or more; None before that.

        The demand follows the longer span, so after a source drops it keeps
        the faster seconds before the drop for several seconds. Other workers
        count this rate instead (``bandwidth.lent_demand``).
        """
        if self.held_at is None:
            return None
        held_at = self.held_at
        since = [sample for sample in list(self.recent) if sample[0] >= held_at]
        if not since:
            return None
        # The latest sample at least LENT_SPAN_S before the last one.
        last_at = since[-1][0]
        start = max(
            (
                index
                for index, (at, _) in enumerate(since)
                if last_at - at >= LENT_SPAN_S
            ),
            default=0,
        )
        return _rate_over(deque(since[start:]), MIN_RATE_SPAN_S)

    def limit_to(self, rate: float | None) -> None:
        """Set the download's limit and start measuring it afresh.

        A raise keeps the samples of a download far below its old limit,
        because a source too slow for the old limit is too slow for the new
        one as well.
        """
        old = self.bucket.rate
        raised = rate is not None and old is not None and rate > old
        keep = raised and self._far_below() is not None
        self.bucket.set_rate(rate)
        if not keep:
            self.samples.clear()

    def _far_below(self) -> float | None:
        """Return the rate received since the limit changed when it is below
        FAR_BELOW_SHARE of the limit over FAR_BELOW_SPAN_S or more, else None."""
        limit = self.bucket.rate
        received = _rate_over(self.samples, FAR_BELOW_SPAN_S)
        if limit is None or received is None or received >= FAR_BELOW_SHARE * limit:
            return None
        return received


def _rate_over(samples: deque[tuple[float, int]], min_span_s: float) -> float | None:
    """Return the bytes per second between the first and last of ``samples``.

    None when they span less than ``min_span_s`` seconds, or when the byte
    count went back (the download started over).
    """
    # A copy, because the API thread may clear the samples meanwhile.
    copied = list(samples)
    if len(copied) < 2:
        return None
    (first_at, first_bytes), (last_at, last_bytes) = copied[0], copied[-1]
    if last_at - first_at < min_span_s or last_bytes < first_bytes:
        return None
    return (last_bytes - first_bytes) / (last_at - first_at)


class Scheduler:
    """Runs up to MAX_CONCURRENT_DOWNLOADS downloads from the queue."""

    def __init__(
        self,
        queue: VodQueue,
        downloader: Downloader,
        settings: Settings | Callable[[], Settings],
        metrics: Metrics,
        *,
        registry: WorkerRegistry | None = None,
        notify: Callable[[str], None] | None = None,
        resume_offset: Callable[[str], int] | None = None,
        on_downloaded: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        # Called after a finished download is handed to the upload stage.
        self.on_downloaded = on_downloaded or (lambda: None)
        # Size of a VOD's partial file, which the next attempt resumes from and
        # includes in its progress, so those bytes are not counted again.
        self.resume_offset = resume_offset or (lambda _vod_id: 0)
        self.registry = registry
        # Wakes every worker listening, with a payload of vodq.wakeups.
        self.notify: Callable[[str], None] = notify or (lambda _payload: None)
        self.started_at = self.queue.clock()
        self.downloader = downloader
        # The settings in force, re-read on every use so that runtime
        # changes take effect at the next slot decision.
        self._settings_source: Callable[[], Settings] = (
            settings if callable(settings) else lambda: settings
        )
        self.metrics = metrics
        self.worker_id = self.settings.worker_id
        self.last_process_run: datetime | None = None
        self._last_run_written = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[int, RunningDownload] = {}
        self._threads: list[threading.Thread] = []
        # Earliest retry this process scheduled (time.monotonic()), so the
        # loop wakes for it instead of waiting for the next poll.
        self._next_retry: float | None = None
        self._had_disk_room = True
        # The pool demands of the cluster's downloads at the last read, by row id.
        self._demands: dict[int, float | None] = {}
        self._rates_lock = threading.Lock()
        # What this worker's pooled downloads leave of its part of the pool,
        # which the others may read on top of their shares.
        self._spare = SpareTokens()

    @property
    def settings(self) -> Settings:
        return self._settings_source()

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler and heartbeat threads."""
        self._release_dead_leases()
        self._beat()
        for target, name in (
            (self._loop, "vodq-scheduler"),
            (self._heartbeat, "vodq-heartbeat"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "scheduler started with %d download slots in this worker, %d in the "
            "cluster",
            self.slots(),
            self.settings.max_concurrent_downloads,
            extra={"worker_id": self.worker_id, "action": "start"},
        )

    def wake(self) -> None:
        """Look for work now: something was added, re-prioritised or finished."""
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop claiming, stop running downloads (keeping partial files) and wait."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            running = list(self._running.values())
        for entry in running:
            self._cancel(entry, CancelReason.SHUTDOWN)

        deadline = time.monotonic() + timeout_s
        for entry in running:
            if entry.thread is not None:
                entry.thread.join(max(0.0, deadline - time.monotonic()))
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.registry is not None:
            try:
                self.registry.remove(self.worker_id)
            except SQLAlchemyError as exc:
                log.warning(
                    "could not remove this worker from the registry: %s",
                    exc,
                    extra={"worker_id": self.worker_id, "action": "stop"},
                )
        log.info(
            "scheduler stopped", extra={"worker_id": self.worker_id, "action": "stop"}
        )

    def cancel_running(self, vod_id: str, reason: str = CancelReason.CANCEL) -> bool:
        """Stop ``vod_id`` if this process downloads it; return whether it did."""
        with self._lock:
            entry = next(
                (e for e in self._running.values() if e.vod.vod_id == vod_id), None
            )
        if entry is None:
            return False
        self._cancel(entry, reason)
        return True

    def wait_stopped(self, vod_id: str, timeout_s: float) -> bool:
        """Wait until no download of ``vod_id`` runs in this process.

        Returns False when one still runs after ``timeout_s``.
        """
        with self._lock:
            threads = [
                entry.thread
                for entry in self._running.values()
                if entry.vod.vod_id == vod_id and entry.thread is not None
            ]
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def stop_all_running(self, reason: str) -> int:
        """Stop every download of this process, keeping partial files."""
        running = self.running()
        for entry in running:
            self._cancel(entry, reason)
        return len(running)

    def running(self) -> list[RunningDownload]:
        """Return the downloads running in this process now."""
        with self._lock:
            return list(self._running.values())

    # -- the scheduler thread --------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self._fill_slots()
            except (StorageUnavailable, SQLAlchemyError) as exc:
                log.warning(
                    "could not claim VODs, retrying in %.0fs: %s",
                    POLL_INTERVAL_S,
                    exc,
                    extra={"worker_id": self.worker_id, "action": "claim"},
                )
            except Exception:
                # Any other fault would end the thread, and no VOD would be
                # claimed again until a restart.
                log.warning(
                    "claiming VODs failed, retrying in %.0fs",
                    POLL_INTERVAL_S,
                    exc_info=True,
                    extra={"worker_id": self.worker_id, "action": "claim"},
                )
            self._wake.wait(self._sleep_s())

    def _sleep_s(self) -> float:
        with self._lock:
            next_retry = self._next_retry
            if next_retry is not None and next_retry <= time.monotonic():
                self._next_retry = None
        if next_retry is None:
            return POLL_INTERVAL_S
        return min(POLL_INTERVAL_S, max(0.0, next_retry - time.monotonic()))

    def slots(self) -> int:
        """Return how many downloads this process may run at once."""
        settings = self.settings
        cap = settings.max_downloads_per_worker or settings.max_concurrent_downloads
        return min(cap, settings.max_concurrent_downloads)

    def _fill_slots(self) -> None:
        settings = self.settings
        with self._lock:
            free = self.slots() - len(self._running)
        if free > 0 and not self._disk_has_room():
            free = 0
        if free > 0:
            claimed_at = time.monotonic()
            claimed = self.queue.claim(
                self.worker_id,
                wanted=free,
                limit=settings.max_concurrent_downloads,
                lease_s=settings.lease_duration,
            )
            for vod in claimed:
                lease_until = claimed_at + settings.lease_duration
                with self._lock:
                    previous = self._running.get(vod.id)
                    if previous is not None:
                        previous.lease_until = lease_until
                if previous is None and vod.attempts >= settings.download_max_attempts:
                    self._give_up(vod, settings.download_max_attempts)
                    continue
                if previous is None:
                    self._start_download(vod, lease_until)
                    continue
                # Our lease expired while the database was away, and this claim
                # took the VOD back while its earlier attempt still runs here.
                # A second attempt would write the same partial file, so the
                # earlier one continues under the new lease. If it is already
                # stopping, the lease expires after it ends and the VOD is
                # claimed again.
                log.warning(
                    "claimed VOD %s again while its earlier attempt is still "
                    "running in this worker; that attempt continues alone",
                    vod.vod_id,
                    extra={"vod_id": vod.vod_id, "action": "claim"},
                )
        self._record_run()

    def _disk_has_room(self) -> bool:
        """Return whether DATA_DIR has MIN_FREE_DISK free; log when that changes."""
        try:
            free = shutil.disk_usage(self.settings.data_dir).free
        except OSError:
            return True
        has_room = free >= self.settings.min_free_disk
        if has_room != self._had_disk_room:
            self._had_disk_room = has_room
            if has_room:
                log.info(
                    "free disk space is back above MIN_FREE_DISK; downloads resume",
                    extra={"free_bytes": free, "action": "disk"},
                )
            else:
                log.warning(
                    "only %d bytes free in DATA_DIR, below MIN_FREE_DISK=%d; "
                    "no new download starts until space is freed",
                    free,
                    self.settings.min_free_disk,
                    extra={"free_bytes": free, "action": "disk"},
                )
        return has_room

    def _record_run(self) -> None:
        self.last_process_run = self.queue.clock()
        if time.monotonic() - self._last_run_written >= LAST_RUN_WRITE_S:
            self.queue.set_kv({"last_process_run": self.last_process_run.isoformat()})
            self._last_run_written = time.monotonic()

    def _give_up(self, vod: Vod, max_attempts: int) -> None:
        """Fail a VOD whose retry was scheduled before DOWNLOAD_MAX_ATTEMPTS fell."""
        error = (
            f"{_RETRY_PROMISE.sub('', vod.last_error or 'download failed')}. Not "
            f"retried: DOWNLOAD_MAX_ATTEMPTS is now {max_attempts} and "
            f"{vod.attempts} attempts are used; reprocess the VOD to try again"
        )
        given_up = self._store(
            lambda: self.queue.give_up(
                vod.id, self.worker_id, error=error, started_at=vod.started_at
            )
        )
        if given_up:
            log.error(
                "download failed for good (all %d attempts used): %s",
                max_attempts,
                vod.last_error,
                extra={
                    "vod_id": vod.vod_id,
                    "attempt": vod.attempts,
                    "action": "download_failed",
                },
            )

    def _start_download(self, vod: Vod, lease_until: float) -> None:
        entry = RunningDownload(
            vod=vod,
            attempt=vod.attempts + 1,
            bucket=TokenBucket(
                self._download_rate(extra_local=1),
                spare=self._spare,
                ceiling=self._ceiling(),
            ),
            lease_until=lease_until,
        )
        thread = threading.Thread(
            target=self._run, args=(entry,), name=f"vodq-download-{vod.id}", daemon=True
        )
        entry.thread = thread
        with self._lock:
            self._running[vod.id] = entry
        self.metrics.active_downloads.set(len(self._running))
        thread.start()
        # The downloads already running give up their part of the new one's
        # share now, here and on other workers, not at their next heartbeat.
        # Before, three starting beside one ran the pool 10% over in the 5 s
        # window of the start.
        self.apply_rates()
        if self.settings.download_total_rate_limit is not None:
            self.notify(RATES_CHANGED)

    # -- a download thread ----------------------------------------------

    def _run(self, entry: RunningDownload) -> None:
        vod = entry.vod
        fields = {
            "vod_id": vod.vod_id,
            "attempt": entry.attempt,
            "priority": vod.priority,
        }
        log.info("download started", extra={**fields, "action": "download_start"})
        entry.resumed_bytes = self.resume_offset(vod.vod_id)
        entry.bytes_counted = entry.resumed_bytes
        job = DownloadJob(
            vod_id=vod.vod_id, source_url=vod.source_url, attempt=entry.attempt
        )

        try:
            result = self.downloader.download(
                job,
                on_progress=lambda progress: self._on_progress(entry, progress),
                cancelled=entry.cancelled,
                bucket=entry.bucket,
            )
        except DownloadCancelled:
            self._after_cancel(entry)
        except DownloadFailed as exc:
            self._after_failure(entry, exc)
        except Exception as exc:
            log.exception(
                "download crashed", extra={**fields, "action": "download_crash"}
            )
            self._after_failure(
                entry,
                DownloadFailed(
                    f"unexpected error: {exc}", error_class="error", retryable=True
                ),
            )
        else:
            self._after_success(entry, result)
        finally:
            # Counted when the attempt ends, together with its outcome, so that
            # rate(succeeded) / rate(started) over any window stays within 0..1.
            self.metrics.downloads_started.inc()
            with self._lock:
                self._running.pop(vod.id, None)
                active = len(self._running)
            self.metrics.active_downloads.set(active)
            self.apply_rates()
            self.wake()
            # A slot is free in the cluster too: a worker that sat at the
            # global limit may start the next VOD.
            self.notify("")

    def _on_progress(self, entry: RunningDownload, progress: Progress) -> None:
        entry.progress = progress
        entry.progress_at = time.monotonic()
        if entry.first_progress_at is None:
            entry.first_progress_at = entry.progress_at
        # Counting starts at the resumed offset, so a resumed download counts
        # only what it fetches and a fresh one counts its first block too.
        if progress.bytes_done < entry.bytes_counted:
            # The downloader discarded the partial file and started over, as
            # after a 200 response to a Range request.
            if entry.resumed_bytes:
                log.warning(
                    "VOD %s: the download started over from the first byte, so "
                    "the %d bytes of its partial file are fetched again; the "
                    "server may not support resuming (HTTP Range)",
                    entry.vod.vod_id,
                    entry.resumed_bytes,
                    extra={
                        "vod_id": entry.vod.vod_id,
                        "attempt": entry.attempt,
                        "bytes": entry.resumed_bytes,
                        "action": "restart",
                    },
                )
            entry.bytes_counted = 0
            entry.resumed_bytes = 0
        grown = progress.bytes_done - entry.bytes_counted
        if grown > 0:
            self.metrics.bytes_downloaded.inc(grown)
            entry.bytes_counted = progress.bytes_done

    def _after_success(self, entry: RunningDownload, result: DownloadResult) -> None:
        vod = entry.vod
        duration_s = time.monotonic() - entry.started_monotonic
        recorded = self._store(
            lambda: self.queue.finish(
                vod.id,
                self.worker_id,
                file_path=str(result.path),
                size=result.size,
                download_ms=round(duration_s * 1000),
                started_at=vod.started_at,
            )
        )
        if not recorded:
            # Counted as stopped by the lost lease, so that every attempt in
            # vod_downloads_started_total has exactly one outcome.
            self.metrics.downloads_cancelled.labels(
                reason=CancelReason.LEASE_LOST
            ).inc()
            log.warning(
                "download finished after this worker lost its lease; the other "
                "worker's result stands",
                extra={
                    "vod_id": vod.vod_id,
                    "attempt": entry.attempt,
                    "action": "lease_lost",
                },
            )
            return
        self.on_downloaded()
        self.metrics.downloads_succeeded.inc()
        self.metrics.download_duration.observe(duration_s)
        # The rate of this attempt's transfer: bytes resumed from disk took
        # no time.
        fetched = max(0, result.size - entry.resumed_bytes)
        rate = fetched / duration_s if duration_s > 0 else 0.0
        log.info(
            "download finished: %d bytes in %.1fs (%.0f B/s, %d bytes resumed)",
            result.size,
            duration_s,
            rate,
            entry.resumed_bytes,
            extra={
                "vod_id": vod.vod_id,
                "attempt": entry.attempt,
                "bytes": result.size,
                "resumed_bytes": entry.resumed_bytes,
                "duration_ms": round(duration_s * 1000),
                "rate_bps": round(rate),
                "path": str(result.path),
                "action": "download_done",
            },
        )

    def _after_failure(self, entry: RunningDownload, error: DownloadFailed) -> None:
        vod = entry.vod
        settings = self.settings
        policy = RetryPolicy(
            max_attempts=settings.download_max_attempts,
            backoff_base_s=settings.download_backoff_base,
            cooldown_s=settings.processing_retry_cooldown,
        )
        retry_at = next_attempt_at(
            error,
            entry.attempt,
            policy,
            self.queue.clock(),
            retry_after_s=error.retry_after_s,
        )
        message = str(error)
        if retry_at is None and error.retryable:
            # The class's message promises a retry that will not come.
            message = (
                _RETRY_PROMISE.sub("", message)
                + f". Not retried: all {policy.max_attempts} attempts are used; "
                "reprocess the VOD to try again"
            )
        state = self._store(
            lambda: self.queue.fail(
                vod.id,
                self.worker_id,
                error=message,
                error_class=error.error_class,
                retry_at=retry_at,
                started_at=vod.started_at,
            )
        )
        self._record_partial(entry)
        self.metrics.downloads_failed.labels(error_class=error.error_class).inc()
        fields = {
            "vod_id": vod.vod_id,
            "attempt": entry.attempt,
            "error_class": error.error_class,
            "error": str(error),
        }
        if state is VodState.QUEUED and retry_at is not None:
            self._note_retry(retry_at)
            self.metrics.retries_scheduled.inc()
            log.warning(
                "download failed, retrying at %s: %s",
                retry_at.isoformat(),
                error,
                extra={**fields, "retry_at": retry_at.isoformat(), "action": "retry"},
            )
        elif state is VodState.FAILED:
            reason = (
                "cannot succeed on retry"
                if not error.retryable
                else f"all {policy.max_attempts} attempts used"
            )
            log.error(
                "download failed for good (%s): %s",
                reason,
                error,
                extra={**fields, "action": "download_failed"},
            )
        else:
            log.warning(
                "download failed after this worker lost its lease: %s",
                error,
                extra={**fields, "action": "lease_lost"},
            )

    def _note_retry(self, retry_at: datetime) -> None:
        due = time.monotonic() + max(
            0.0, (retry_at - self.queue.clock()).total_seconds()
        )
        with self._lock:
            if self._next_retry is None or due < self._next_retry:
                self._next_retry = due

    def _after_cancel(self, entry: RunningDownload) -> None:
        vod = entry.vod
        reason = entry.cancel_reason or CancelReason.SHUTDOWN
        state = VodState.CANCELLED if reason == CancelReason.CANCEL else VodState.QUEUED
        # A cancel or pause from the API has already written the new state;
        # this release only matters when the row is still ours.
        if reason != CancelReason.LEASE_LOST:
            self._store(
                lambda: self.queue.release(
                    vod.id, self.worker_id, state=state, started_at=vod.started_at
                )
            )
        partial_bytes = self._record_partial(entry)
        self.metrics.downloads_cancelled.labels(reason=reason).inc()
        log.warning(
            "download stopped (%s); the partial file is kept for resume",
            reason,
            extra={
                "vod_id": vod.vod_id,
                "attempt": entry.attempt,
                "bytes": partial_bytes,
                "action": "download_stopped",
                "reason": reason,
            },
        )

    def _record_partial(self, entry: RunningDownload) -> int:
        """Store the size of the stopped download's partial file; return it."""
        partial_bytes = self.resume_offset(entry.vod.vod_id)
        try:
            self.queue.record_partial(entry.vod.id, entry.vod.started_at, partial_bytes)
        except (StorageUnavailable, SQLAlchemyError) as exc:
            log.warning(
                "could not record the partial file's size of VOD %s: %s",
                entry.vod.vod_id,
                exc,
                extra={"vod_id": entry.vod.vod_id, "action": "download_stopped"},
            )
        return partial_bytes

    def _cancel(self, entry: RunningDownload, reason: str) -> None:
        if entry.cancel_reason is None:
            entry.cancel_reason = reason
        entry.cancelled.set()

    def _store(self, write: Callable[[], T]) -> T | None:
        """Run a result write; see vodq.retry.store_outcome."""
        return store_outcome(
            write,
            within_s=self.settings.lease_duration,
            what="a download result",
            worker_id=self.worker_id,
        )

    # -- the heartbeat thread ---------------------------------------------

    def _heartbeat(self) -> None:
        last_beat = 0.0
        last_renewal = 0.0
        while not self._stopping.wait(RATE_TICK_S):
            # A fault in one step must not end the thread, because the rates,
            # leases and progress of every running download depend on it.
            try:
                self._measure()
            except Exception:
                log.warning(
                    "measuring the downloads failed, retrying in %.1fs",
                    RATE_TICK_S,
                    exc_info=True,
                    extra={"worker_id": self.worker_id, "action": "rates"},
                )
            # Half a tick early, so that the renewal keeps to HEARTBEAT_S
            # and does not slip by a tick each time.
            if time.monotonic() - last_renewal < HEARTBEAT_S - RATE_TICK_S / 2:
                continue
            last_renewal = time.monotonic()
            try:
                last_beat = self._heartbeat_once(last_beat)
            except Exception:
                log.warning(
                    "heartbeat failed, retrying in %.0fs",
                    HEARTBEAT_S,
                    exc_info=True,
                    extra={"worker_id": self.worker_id, "action": "heartbeat"},
                )

    def _measure(self) -> None:
        """Sample the running downloads' progress and apply the rates."""
        running = self.running()
        if not running:
            return
        for entry in running:
            self._sample(entry)
        self._apply_rates(running)
        self._publish_demands(running)

    def _heartbeat_once(self, last_beat: float) -> float:
        """Renew leases and write progress; return the time of the last
        worker heartbeat."""
        if time.monotonic() - last_beat >= WORKER_HEARTBEAT_S:
            last_beat = time.monotonic()
            self._beat()
            self._release_expired_leases()

        running = self.running()
        if not running:
            return last_beat

        progress = {
            entry.vod.id: replace(entry.progress, speed_bps=entry.recent_speed())
            for entry in running
        }
        lease_s = self.settings.lease_duration
        renewed_at = time.monotonic()
        try:
            renewed = self.queue.renew(
                self.worker_id,
                progress,
                lease_s=lease_s,
                started={entry.vod.id: entry.vod.started_at for entry in running},
                demands={entry.vod.id: entry.published for entry in running},
            )
        except (StorageUnavailable, SQLAlchemyError) as exc:
            log.warning(
                "could not renew leases: %s",
                exc,
                extra={"worker_id": self.worker_id, "action": "heartbeat"},
            )
            self._stop_unrenewable(running)
            return last_beat

        for entry in running:
            if entry.vod.id in renewed:
                entry.lease_until = renewed_at + lease_s
                entry.mark_written()
        for entry in running:
            if (
                entry.vod.id not in renewed
                and entry.thread is not None
                and entry.thread.is_alive()
            ):
                if entry.cancelled.is_set():
                    continue
                self._on_lease_lost(entry)
        return last_beat

    def _stop_unrenewable(self, running: list[RunningDownload]) -> None:
        """Stop the downloads whose lease expires before the next renewal.

        After a lease expires, another worker may claim the VOD and resume its
        partial file. A download that continued would exceed
        MAX_CONCURRENT_DOWNLOADS and write that file too. Stopping keeps the
        partial file for the resume.
        """
        deadline = time.monotonic() + HEARTBEAT_S
        for entry in running:
            if entry.cancelled.is_set() or entry.lease_until > deadline:
                continue
            log.warning(
                "failed to renew the lease of VOD %s before it expires; "
                "stopping its download and keeping the partial file",
                entry.vod.vod_id,
                extra={"vod_id": entry.vod.vod_id, "action": "lease_lost"},
            )
            self._cancel(entry, CancelReason.LEASE_LOST)

    def _download_rate(self, *, extra_local: int = 0) -> float | None:
        """Return the rate of a download that starts now: its own limit, or a share.

        A new download gets an equal share of the cluster-wide pool
        (DOWNLOAD_TOTAL_RATE_LIMIT) until the heartbeat measures it (see
        ``_rates``). ``extra_local`` counts downloads this process is
        starting but has not claimed yet.
        """
        settings = self.settings
        per_download = settings.download_rate_limit
        total = settings.download_total_rate_limit
        if total is None:
            return per_download
        share = total / max(1, self._count_active(len(self.running())) + extra_local)
        return share if per_download is None else min(per_download, share)

    def _ceiling(self) -> float | None:
        """Return the highest rate a pooled download may reach by borrowing (B/s)."""
        return self.settings.download_rate_limit

    @staticmethod
    def _sample(entry: RunningDownload) -> None:
        done = entry.progress.bytes_done
        # From STARTUP_S after the first report on, so that a transfer that is
        # still starting (its connection, its first bytes) is not taken for a
        # slow source.
        first = entry.first_progress_at
        if done <= 0 or first is None or time.monotonic() - first < STARTUP_S:
            return
        # At the report's time while reports arrive. A download with no report
        # for QUIET_S is sampled now, so that a paused source measures as
        # slow. Sampled sooner, a source that sends a burst a second measured
        # 25% below its rate at a tick just before a burst.
        at = entry.progress_at
        if entry.recent and at <= entry.recent[-1][0]:
            now = time.monotonic()
            if now - at < QUIET_S:
                return
            at = now
        entry.recent.append((at, done))
        entry.samples.append((at, done))

    def _count_active(self, fallback: int) -> int:
        try:
            return self.queue.count_active()
        except (StorageUnavailable, SQLAlchemyError):
            return fallback

    def _rates(self, running: list[RunningDownload]) -> list[float | None]:
        """Return the limit of each running download, in the order given.

        With a pool, every worker splits it max-min fairly over the demands
        of all downloads with a live lease, its own measured now and the
        others' as their workers last wrote them. A download whose source
        sends less than its limit keeps half as much again as it receives,
        and the others, on any worker, share the rest equally. Where no
        download on its worker borrows that headroom, the other workers
        count it at 5% more than it receives and take the rest. Its own
        limit is then capped near that count.
        """
        settings = self.settings
        per_download = settings.download_rate_limit
        total = settings.download_total_rate_limit
        if total is None:
            return [per_download] * len(running)

        for entry in running:
            entry.update_demand()
        borrower = self._has_borrower(running)
        for entry in running:
            if borrower:
                entry.published = entry.demand
            else:
                entry.published = lent_demand(
                    entry.demand, entry.last_second(), entry.held_rate()
                )
        own = {entry.vod.id for entry in running}
        others = [
            demand
            for row_id, demand in self._cluster_demands().items()
            if row_id not in own
        ]
        demands = [entry.demand for entry in running] + others
        if per_download is not None:
            demands = [
                per_download if demand is None else min(demand, per_download)
                for demand in demands
            ]
        shares = fair_shares(total, demands)[: len(running)]
        rates: list[float | None] = [
            share if per_download is None else min(share, per_download)
            for share in shares
        ]
        for index, entry in enumerate(running):
            entry.uncapped = None
            if borrower or entry.published is None or entry.demand is None:
                continue
            # The other workers count it at ``published``. Its own limit stays
            # within HEADROOM over LENT_MARGIN of that, the ratio it had when
            # they counted its longer span. Uncapped, a source back at full
            # speed after a drop read its whole share at once, and the pool
            # ran up to 18% over until the other workers gave it back.
            cap = entry.published * HEADROOM / LENT_MARGIN
            rate = rates[index]
            if rate is not None and cap < rate:
                entry.uncapped = rate
                rates[index] = cap
        return rates

    def _has_borrower(self, running: list[RunningDownload]) -> bool:
        """Return whether a download here can borrow what its neighbours leave.

        One that wants more than its share and is below DOWNLOAD_RATE_LIMIT
        reads from the worker's SpareTokens. Without one, the other workers
        count this worker's slow sources at 5% over what they receive
        (``_rates``).
        """
        ceiling = self._ceiling()
        return any(
            entry.demand is None
            and (
                ceiling is None
                or entry.bucket.rate is None
                or entry.bucket.rate < ceiling * (1 - MIN_RATE_CHANGE)
            )
            for entry in running
        )

    def _publish_demands(self, running: list[RunningDownload]) -> None:
        """Write the demands that moved since the last write to the database.

        Only while another worker runs pooled downloads. A worker alone
        writes them with its renewals only.
        """
        own = {entry.vod.id for entry in running}
        if self.settings.download_total_rate_limit is None or own >= set(self._demands):
            return

        moved = [entry for entry in running if entry.demand_moved()]
        if not moved:
            return
        try:
            self.queue.publish_demands(
                self.worker_id,
                {entry.vod.id: entry.published for entry in moved},
                started={entry.vod.id: entry.vod.started_at for entry in moved},
            )
        except (StorageUnavailable, SQLAlchemyError) as exc:
            # The next tick or renewal writes them, so a failure is not a
            # warning at every tick of an outage.
            log.debug(
                "failed to write the pool demands of %d downloads: %s",
                len(moved),
                exc,
                extra={"worker_id": self.worker_id, "action": "rates"},
            )
            return
        for entry in moved:
            entry.mark_written()

    def _cluster_demands(self) -> dict[int, float | None]:
        """Return every live download's demand; the last read if the database fails."""
        try:
            self._demands = self.queue.active_demands()
        except (StorageUnavailable, SQLAlchemyError) as exc:
            log.debug("could not read the pool's demands: %s", exc)
        return self._demands

    def apply_rates(self, *, exact: bool = False) -> None:
        """Give running downloads the rate in force now, not at the next heartbeat.

        ``exact`` applies every change, however small: an operator's new
        limit of 255K on a download at 256K must not be taken for a share
        measured a little differently. A failure is logged, and the next
        heartbeat applies the rates.
        """
        try:
            running = self.running()
            if running:
                self._apply_rates(running, exact=exact)
        except Exception as exc:
            log.warning(
                "could not apply the rate limits to running downloads: %s; the "
                "next heartbeat applies them",
                exc,
                exc_info=True,
                extra={"worker_id": self.worker_id, "action": "rates"},
            )

    def _apply_rates(
        self, running: list[RunningDownload], *, exact: bool = False
    ) -> None:
        # The heartbeat, a finished download, a PATCH and a wake-up from
        # another worker all apply rates. They run one at a time, so that each
        # reads the demands and samples that the previous one wrote.
        with self._rates_lock:
            ceiling = self._ceiling()
            for entry, rate in zip(running, self._rates(running), strict=True):
                entry.bucket.set_ceiling(ceiling)
                old = entry.bucket.rate
                if old is None or rate is None or exact:
                    changed = old != rate
                else:
                    changed = abs(rate - old) > MIN_RATE_CHANGE * old
                if changed:
                    entry.limit_to(rate)

            # The worker's part of the pool is the sum of the limits in force.
            limits = [entry.bucket.rate for entry in running]
            pooled = self.settings.download_total_rate_limit is not None
            if pooled and None not in limits:
                self._spare.set_rate(sum(rate or 0.0 for rate in limits))
            else:
                self._spare.set_rate(None)

    def _release_dead_leases(self) -> None:
        """Queue again the VODs whose leases belong to processes known to be dead.

        Those are leases under this worker's own id, left by the process it
        replaces, and leases of ``HOST-PID`` workers on this host whose pid no
        longer runs. Without this they would hold slots until they expire.
        """
        try:
            released = self.queue.release_leases(self._dead_owners())
        except (StorageUnavailable, SQLAlchemyError) as exc:
            log.warning(
                "could not release leases of dead workers: %s",
                exc,
                extra={"worker_id": self.worker_id, "action": "start"},
            )
            return
        for vod_id in released:
            log.warning(
                "VOD %s was held by a worker that is no longer running; queued again",
                vod_id,
                extra={"vod_id": vod_id, "action": "lease_released"},
            )

    def _release_expired_leases(self) -> None:
        """Queue again downloads whose leases expired, even with no slot free.

        A claim does this too, but only a worker with a free slot claims. Until
        then the VOD would show as downloading while no worker counts it.
        """
        try:
            self.queue.release_expired()
        except (StorageUnavailable, SQLAlchemyError) as exc:
            log.warning(
                "could not release expired leases: %s",
                exc,
                extra={"worker_id": self.worker_id, "action": "heartbeat"},
            )

    def _dead_owners(self) -> list[str]:
        owners = [self.worker_id]
        prefix = socket.gethostname() + "-"
        for owner in self.queue.lease_owners():
            pid_text = owner.removeprefix(prefix)
            if owner == pid_text or not pid_text.isdigit():
                continue
            if int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
                owners.append(owner)
        return owners

    def _beat(self) -> None:
        if self.registry is None:
            return
        try:
            self.registry.beat(
                self.worker_id,
                pid=os.getpid(),
                slots=self.slots(),
                started_at=self.started_at,
            )
        except SQLAlchemyError as exc:
            log.warning(
                "could not write this worker's heartbeat: %s",
                exc,
                extra={"worker_id": self.worker_id, "action": "heartbeat"},
            )

    def _on_lease_lost(self, entry: RunningDownload) -> None:
        vod_id = entry.vod.vod_id
        try:
            state: VodState | None = self.queue.get(vod_id).state
        except VodqError:
            state = None
        if state in (VodState.DOWNLOADED, VodState.UPLOADING, VodState.DONE):
            # This worker has just handed the file to the upload stage;
            # nothing downloads any more.
            return
        if state is VodState.CANCELLED:
            log.info(
                "VOD %s was cancelled; stopping its download",
                vod_id,
                extra={"vod_id": vod_id, "action": "cancel"},
            )
            self._cancel(entry, CancelReason.CANCEL)
            return
        log.warning(
            "lost the lease of VOD %s; stopping its download",
            vod_id,
            extra={"vod_id": vod_id, "action": "lease_lost", "state": state},
        )
        self._cancel(entry, CancelReason.LEASE_LOST)

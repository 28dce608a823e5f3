"""The service layer: what the API and the CLI ask of a running vodq.

It owns the engine, the queue, the metrics and (in processes that download)
the scheduler, validates input, and wakes the scheduler after every change
that may let a VOD start.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vodq import breaker
from vodq.breaker import BreakerPolicy, BreakerSnapshot
from vodq.config import Settings
from vodq.db.clock import DatabaseClock
from vodq.db.engine import make_engine
from vodq.db.migrate import upgrade
from vodq.download.files import ArchiveLayout
from vodq.download.process import ProcessDownloader, warm_up
from vodq.download.ytdlp import YtDlpEngine
from vodq.errors import InvalidInput
from vodq.metrics import Metrics
from vodq.models import Vod, VodState
from vodq.queue import PAUSED_KEY, VodQueue, utcnow
from vodq.runtime import RuntimeConfig
from vodq.scheduler import CancelReason, Scheduler
from vodq.units import format_duration, format_rate
from vodq.upload.stage import UploadStage, make_uploader
from vodq.upload.store import UploadStore, file_exists
from vodq.wakeups import CONFIG_CHANGED, RATES_CHANGED, Wakeups
from vodq.workers import WorkerRegistry

log = logging.getLogger(__name__)

# Letters, digits and ``_ . : -``, starting with a letter, digit or ``_``: no
# path separators, no leading dot, no spaces or control characters.
VOD_ID_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}"
_VOD_ID = re.compile(VOD_ID_PATTERN)
_TWITCH_VIDEO = re.compile(r"twitch\.tv/(?:[^/]+/)?videos?/(\d+)")
MAX_BATCH_IDS = 10_000
# Maximum time a delete with delete_files waits for the VOD's download or
# upload to stop, in seconds. A cancelled download stops after its current
# read block, or its process group is killed after CANCEL_GRACE_S (2 s).
DELETE_WAIT_S = 5.0
PRIORITY_MIN = -(2**63)
PRIORITY_MAX = 2**63 - 1


def validate_vod_id(vod_id: str) -> str:
    """Return ``vod_id`` if it is a valid id; raise InvalidInput naming it otherwise."""
    if not _VOD_ID.fullmatch(vod_id):
        raise InvalidInput(
            f"vod_id {_shorten(vod_id)} is invalid; use 1 to 128 letters, digits, "
            "'_', '.', ':' or '-', starting with a letter, digit or '_', such as "
            "'123456789'"
        )
    return vod_id


def validate_priority(priority: int) -> int:
    """Return ``priority`` if it fits a signed 64-bit integer."""
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidInput(
            f"priority {priority} is out of range; use an integer from "
            f"{PRIORITY_MIN} to {PRIORITY_MAX}, such as 100"
        )
    return priority


def parse_vod_date(value: str | datetime | date | None) -> datetime | None:
    """Parse an ISO 8601 date or time; a value without an offset is taken as UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    else:
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInput(
                f"date {_shorten(value)} is not an ISO 8601 date or time; use for "
                "example '2024-10-15' or '2024-10-15T18:30:00+00:00'"
            ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidInput(
            f"date {_shorten(str(value))} is outside the supported range once "
            "converted to UTC; use a date between years 1 and 9999"
        ) from None


def _shorten(text: str, limit: int = 80) -> str:
    """Quote ``text`` for an error message, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def id_from_url(url: str) -> str:
    """Derive a stable VOD id from a URL: Twitch's video number, else a URL hash."""
    match = _TWITCH_VIDEO.search(url)
    if match:
        return match.group(1)
    return "url-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def validate_url(url: str) -> str:
    """Return ``url`` if it is a well-formed http(s) URL with a host."""
    problem = None
    if len(url) > 2048:
        problem = "it is longer than 2048 characters"
    elif not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\x00-\x1f\x7f]+", url):
        problem = "it is not an absolute URL without spaces or control characters"
    else:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            problem = f"it cannot be parsed ({exc})"
        else:
            if parts.scheme.lower() not in ("http", "https"):
                problem = "only http and https URLs can be downloaded"
            elif not parts.hostname:
                problem = "it has no host"
            elif port == 0:
                problem = "port 0 is not a port"
    if problem is not None:
        raise InvalidInput(
            f"url {_shorten(url)} is invalid because {problem}; use for example "
            "'https://www.twitch.tv/videos/123456789'"
        )
    return url


def redact_url(url: str) -> str:
    """Replace the password in a URL's user information with ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@dataclass(frozen=True)
class VodSelection:
    """Selection of the VODs a batch operation changes; every given field must match."""

    vod_ids: list[str] | None = None
    date_from: str | None = None
    date_to: str | None = None
    channel: str | None = None
    states: list[VodState] | None = None

    def is_empty(self) -> bool:
        return all(
            value is None
            for value in (
                self.vod_ids,
                self.date_from,
                self.date_to,
                self.channel,
                self.states,
            )
        )


@dataclass(frozen=True)
class NewVod:
    """A VOD to add, as the API or CLI received it."""

    vod_id: str | None = None
    url: str | None = None
    title: str | None = None
    date: str | datetime | date | None = None
    channel: str | None = None
    priority: int = 0


class Service:
    """One vodq process: storage, metrics, and optionally the scheduler."""

    def __init__(
        self,
        settings: Settings,
        *,
        run_worker: bool = True,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        """Build the service; ``environment`` holds the variables ``settings``
        came from, which runtime configuration changes are layered over."""
        self.engine = make_engine(settings.db_dsn)
        self.queue = VodQueue(
            self.engine,
            clock=DatabaseClock(self.engine)
            if self.engine.dialect.name == "postgresql"
            else utcnow,
            breaker_policy=BreakerPolicy(
                threshold=settings.circuit_failure_threshold,
                cooldown_s=settings.circuit_open_cooldown,
            ),
        )
        self.runtime = (
            RuntimeConfig(environment, self.queue, settings)
            if environment is not None
            else None
        )
        self._static_settings = settings
        self.metrics = Metrics()
        self.metrics.watch_queue(self.queue.counts, self.read_breaker)
        self.queue.on_breaker_change = self.metrics.record_breaker_transition
        self.layout = ArchiveLayout(settings.data_dir)
        self.registry = WorkerRegistry(self.engine, clock=self.queue.clock)
        self.wakeups = Wakeups(self.engine)
        self.uploads = UploadStore(self.queue)
        self.scheduler: Scheduler | None = None
        self.upload_stage: UploadStage | None = None
        if run_worker:
            self.upload_stage = UploadStage(
                self.uploads,
                make_uploader(settings),
                lambda: self.settings,
                self.metrics,
            )
            downloader = ProcessDownloader(
                YtDlpEngine(
                    settings.data_dir,
                    socket_timeout_s=min(
                        settings.socket_timeout, settings.stall_timeout
                    ),
                    hls_fragments=settings.hls_concurrent_fragments,
                ),
                stall_timeout_s=settings.stall_timeout,
                orphan_after_s=settings.lease_duration / 2,
            )
            warm_up()
            self.scheduler = Scheduler(
                self.queue,
                downloader,
                lambda: self.settings,
                self.metrics,
                registry=self.registry,
                notify=self.wakeups.notify,
                resume_offset=self._partial_bytes,
                on_downloaded=self.upload_stage.wake,
            )

    @property
    def settings(self) -> Settings:
        """The settings in force, runtime changes included."""
        if self.runtime is None:
            return self._static_settings
        return self.runtime.settings()

    def update_config(
        self, changes: Mapping[str, str | None], *, stop_excess: bool = False
    ) -> Settings:
        """Change settings at runtime for every worker; see vodq.runtime."""
        if self.runtime is None:
            raise InvalidInput(
                "this process was started without its environment, so its "
                "configuration cannot change at runtime"
            )
        settings = self.runtime.update(changes)
        stopped = 0
        if stop_excess:
            stopped = self.queue.requeue_excess(
                settings.max_concurrent_downloads, settings.max_downloads_per_worker
            )
        log.info(
            "configuration changed at runtime",
            extra={"changes": dict(changes), "stopped": stopped, "action": "config"},
        )
        if self.scheduler is not None:
            self.scheduler.apply_rates(exact=True)
        # Workers on PostgreSQL apply the change when this wake-up reaches
        # them; others at their next settings refresh and heartbeat (about 2 s).
        self._wake_stages()
        self.wakeups.notify(CONFIG_CHANGED)
        return settings

    def config_report(self) -> dict[str, dict[str, Any]]:
        """Describe each runtime variable: its value in force and where it came from."""
        settings = self.settings
        sources = self.runtime.sources() if self.runtime else {}
        values: dict[str, Any] = {
            "MAX_CONCURRENT_DOWNLOADS": settings.max_concurrent_downloads,
            "MAX_DOWNLOADS_PER_WORKER": settings.max_downloads_per_worker,
            "DOWNLOAD_RATE_LIMIT": _rate_text(settings.download_rate_limit),
            "DOWNLOAD_TOTAL_RATE_LIMIT": _rate_text(settings.download_total_rate_limit),
            "DOWNLOAD_MAX_ATTEMPTS": settings.download_max_attempts,
            "DOWNLOAD_BACKOFF_BASE": format_duration(settings.download_backoff_base),
            "PROCESSING_RETRY_COOLDOWN": format_duration(
                settings.processing_retry_cooldown
            ),
            "UPLOAD_MAX_ATTEMPTS": settings.upload_max_attempts,
            "UPLOAD_BACKOFF_BASE": format_duration(settings.upload_backoff_base),
            "MAX_CONCURRENT_UPLOADS": settings.max_concurrent_uploads,
        }
        return {
            name.lower(): {"value": value, "source": sources.get(name, "environment")}
            for name, value in values.items()
        }

    def start(self, *, migrate: bool = True) -> None:
        """Migrate the database if asked, then start downloading."""
        if migrate:
            upgrade(self.engine)
        if self.runtime is not None:
            self.runtime.enabled = True
            self.runtime.refresh()
        if self.scheduler is not None and self.upload_stage is not None:
            self.layout.ensure()
            self.scheduler.start()
            self.upload_stage.start()
            self.wakeups.listen(self._wake_stages)

    def stop(self) -> None:
        """Stop both stages (keeping every file) and close the database pool."""
        if self.upload_stage is not None:
            self.upload_stage.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.wakeups.stop()
        self.engine.dispose()

    def _partial_bytes(self, vod_id: str) -> int:
        """Return the size of the ``.part`` files a new attempt would resume."""
        total = 0
        for path in self.layout.partial_files(vod_id):
            if path.name.endswith(".part"):
                try:
                    total += path.stat().st_size
                except FileNotFoundError:
                    continue
        return total

    def read_breaker(self) -> BreakerSnapshot:
        """Return the circuit breaker state shared by every worker."""
        return breaker.snapshot_from(self.queue.get_kv(breaker.KEYS))

    def wake(self) -> None:
        """Make this process's stages, and every worker listening, look for work."""
        self._wake_stages()
        self.wakeups.notify()

    def _wake_stages(self, reason: str = "") -> None:
        if reason == CONFIG_CHANGED and self.runtime is not None:
            self.runtime.refresh()
        if reason in (CONFIG_CHANGED, RATES_CHANGED) and self.scheduler is not None:
            self.scheduler.apply_rates(exact=reason == CONFIG_CHANGED)
        if self.scheduler is not None:
            self.scheduler.wake()
        if self.upload_stage is not None:
            self.upload_stage.wake()

    # -- operations ---------------------------------------------------------

    def add_vod(self, new: NewVod) -> tuple[Vod, bool]:
        """Queue a VOD; return it and whether it was new. Never waits for a slot."""
        if new.url is not None:
            url = validate_url(new.url)
            vod_id = validate_vod_id(new.vod_id) if new.vod_id else id_from_url(url)
        elif new.vod_id is not None:
            vod_id = validate_vod_id(new.vod_id)
            url = self.settings.vod_url_template.format(id=vod_id)
        else:
            raise InvalidInput(
                "a VOD needs 'vod_id' or 'url'; send for example "
                '{"vod_id": "123456789"} or {"url": "https://example.com/v.mp4"}'
            )
        vod, created = self.queue.add(
            vod_id=vod_id,
            source_url=url,
            title=_clean_text("title", new.title),
            date=parse_vod_date(new.date),
            channel=_clean_text("channel", new.channel),
            priority=validate_priority(new.priority),
        )
        if created:
            self.wake()
        return vod, created

    def set_priority(self, vod_id: str, priority: int) -> Vod:
        """Change a VOD's priority; the next free slot sees it at once."""
        vod = self.queue.set_priority(
            validate_vod_id(vod_id), validate_priority(priority)
        )
        log.info(
            "priority of VOD %s set to %d",
            vod_id,
            priority,
            extra={"vod_id": vod_id, "priority": priority, "action": "set_priority"},
        )
        self.wake()
        return vod

    def get_vod(self, vod_id: str) -> Vod:
        return self.queue.get(validate_vod_id(vod_id))

    def set_priorities(self, priority: int, selection: VodSelection) -> int:
        """Set the priority of every VOD in ``selection``; return how many matched."""
        if selection.is_empty():
            raise InvalidInput(
                "a batch priority change needs 'vod_ids' or at least one filter "
                "('date_from', 'date_to', 'channel', 'states'), so that it never "
                "changes every VOD by mistake"
            )
        vod_ids = None
        if selection.vod_ids is not None:
            if len(selection.vod_ids) > MAX_BATCH_IDS:
                raise InvalidInput(
                    f"vod_ids has {len(selection.vod_ids)} ids; send at most "
                    f"{MAX_BATCH_IDS} per request, or select with a filter"
                )
            vod_ids = [validate_vod_id(vod_id) for vod_id in selection.vod_ids]
        changed = self.queue.set_priorities(
            validate_priority(priority),
            vod_ids=vod_ids,
            date_from=parse_vod_date(selection.date_from),
            date_to=parse_vod_date(selection.date_to),
            channel=selection.channel,
            states=selection.states,
        )
        log.info(
            "priority set to %d on %d VODs",
            priority,
            changed,
            extra={"priority": priority, "count": changed, "action": "set_priorities"},
        )
        self.wake()
        return changed

    def cancel_vod(self, vod_id: str) -> Vod:
        """Cancel a queued or running VOD; no attempt is counted, the partial stays."""
        vod, previous = self.queue.cancel(validate_vod_id(vod_id))
        if previous is VodState.DOWNLOADING and self.scheduler is not None:
            self.scheduler.cancel_running(vod_id, CancelReason.CANCEL)
        if previous is VodState.UPLOADING and self.upload_stage is not None:
            self.upload_stage.cancel_running(vod_id)
        log.info(
            "VOD %s cancelled while %s",
            vod_id,
            previous,
            extra={"vod_id": vod_id, "state": str(previous), "action": "cancel"},
        )
        return vod

    def reprocess_vod(self, vod_id: str) -> Vod:
        """Process a failed, cancelled or finished VOD again, its attempts reset.

        A VOD whose downloaded file still exists goes back to the upload
        stage; any other is downloaded again.
        """
        vod = self.queue.get(validate_vod_id(vod_id))
        if file_exists(vod):
            vod = self.uploads.requeue(vod)
            stage = "upload"
        else:
            vod = self.queue.requeue(vod_id)
            stage = "download"
        log.info(
            "VOD %s reprocessed from its %s",
            vod_id,
            stage,
            extra={"vod_id": vod_id, "stage": stage, "action": "reprocess"},
        )
        self.wake()
        return vod

    def queue_uploads(
        self, vod_ids: list[str] | None, *, all_not_uploaded: bool
    ) -> tuple[list[str], list[str]]:
        """Send done VODs that were never uploaded to the upload stage.

        Returns the ids sent to the upload stage and, for ``all_not_uploaded``,
        the ids left out because their file is gone.
        """
        if self.settings.uploader == "none":
            raise InvalidInput(
                "UPLOADER is none, so there is nowhere to upload to; set UPLOADER "
                "to command or youtube and restart vodq first"
            )
        if (vod_ids is None) == (not all_not_uploaded):
            raise InvalidInput(
                "send either 'vod_ids' or 'all_not_uploaded': true, for example "
                '{"vod_ids": ["123456789"]}'
            )
        if vod_ids is not None:
            if not vod_ids or len(vod_ids) > MAX_BATCH_IDS:
                raise InvalidInput(
                    f"vod_ids has {len(vod_ids)} ids; send 1 to {MAX_BATCH_IDS}"
                )
            vod_ids = [validate_vod_id(vod_id) for vod_id in vod_ids]
        queued, missing = self.uploads.queue_not_uploaded(vod_ids, file_exists)
        log.info(
            "%d VODs sent to the upload stage, %d without a file left out",
            len(queued),
            len(missing),
            extra={
                "count": len(queued),
                "missing": len(missing),
                "action": "queue_uploads",
            },
        )
        self.wake()
        return queued, missing

    def delete_vod(self, vod_id: str, *, delete_files: bool) -> Vod:
        """Delete a VOD, stopping its download first; optionally delete its files."""
        vod = self.queue.get(validate_vod_id(vod_id))
        if vod.state is VodState.UPLOADING:
            self.cancel_vod(vod_id)
            # The uploader may still read the file; delete it afterwards.
            if self.upload_stage is not None and not self.upload_stage.wait_stopped(
                vod_id, DELETE_WAIT_S
            ):
                log.warning(
                    "upload of VOD %s did not stop within %.0fs",
                    vod_id,
                    DELETE_WAIT_S,
                    extra={"vod_id": vod_id, "action": "delete"},
                )
        if vod.state is VodState.DOWNLOADING:
            self.cancel_vod(vod_id)
            # A download writes, and may first create, its partial file until
            # its thread stops, so the files are deleted after that.
            stopped = self.scheduler is None or self.scheduler.wait_stopped(
                vod_id, DELETE_WAIT_S
            )
            if not stopped:
                log.warning(
                    "download of VOD %s did not stop within %.0fs; its partial "
                    "file may be left in DATA_DIR/partial",
                    vod_id,
                    DELETE_WAIT_S,
                    extra={"vod_id": vod_id, "action": "delete"},
                )
        deleted = self.queue.delete(vod_id)
        # Partial files always go: left behind, they would be resumed into a
        # VOD added later under the same id, perhaps from another source.
        removed = self._delete_files(deleted, include_archive=delete_files)
        log.info(
            "VOD %s deleted with %d files",
            vod_id,
            len(removed),
            extra={"vod_id": vod_id, "files": len(removed), "action": "delete"},
        )
        return deleted

    def set_skip_upload(self, vod_id: str, skip: bool) -> Vod:
        """Record whether the upload stage skips this VOD."""
        return self.queue.set_skip_upload(validate_vod_id(vod_id), skip)

    def pause(self, *, stop_running: bool) -> int:
        """Stop claiming on every worker; optionally stop running downloads too."""
        stopped = self.queue.set_paused(True, stop_running=stop_running)
        if stop_running and self.scheduler is not None:
            self.scheduler.stop_all_running(CancelReason.PAUSE)
        log.info(
            "queue paused",
            extra={"stop_running": stop_running, "stopped": stopped, "action": "pause"},
        )
        return stopped

    def resume(self) -> None:
        """Let every worker claim again."""
        self.queue.set_paused(False)
        log.info("queue resumed", extra={"action": "resume"})
        self.wake()

    def _delete_files(self, vod: Vod, *, include_archive: bool) -> list[Path]:
        candidates = self.layout.partial_files(vod.vod_id)
        if include_archive and vod.file_path:
            final = Path(vod.file_path)
            # Only a file inside the archive is ours to delete.
            if final.resolve().parent == self.layout.archive_dir.resolve():
                candidates.append(final)
        removed = []
        for path in candidates:
            if path.exists():
                path.unlink()
                removed.append(path)
        return removed

    def status(self) -> dict[str, Any]:
        """Build the ``/status`` document from the values in force."""
        settings = self.settings
        # One connection for the three reads, because each checkout costs
        # round trips of its own on PostgreSQL.
        with self.queue.connect_read() as conn:
            counts = self.queue.counts(conn)
            stored = self.queue.get_kv(
                [*breaker.KEYS, "last_process_run", "avg_download_ms", PAUSED_KEY],
                conn,
            )
            workers = self.registry.list(conn)
        circuit = breaker.snapshot_from(stored)
        last_run = self.scheduler.last_process_run if self.scheduler else None
        if last_run is None and "last_process_run" in stored:
            last_run = datetime.fromisoformat(stored["last_process_run"])
        rate = settings.download_rate_limit
        total_rate = settings.download_total_rate_limit
        return {
            "pending": counts.by_state.get("queued", 0),
            "queue_by_priority": [
                {"priority": priority, "count": count}
                for priority, count in counts.by_priority
            ],
            "queue_by_state": counts.by_state,
            "active_downloads": counts.active,
            "max_concurrent_downloads": settings.max_concurrent_downloads,
            "uploader": settings.uploader,
            "uploading": counts.by_state.get(VodState.UPLOADING.value, 0),
            "awaiting_upload": counts.by_state.get(VodState.DOWNLOADED.value, 0),
            "max_concurrent_uploads": settings.max_concurrent_uploads,
            "retry_config": {
                "download_max_attempts": settings.download_max_attempts,
                "download_backoff_base": format_duration(
                    settings.download_backoff_base
                ),
                "upload_max_attempts": settings.upload_max_attempts,
                "upload_backoff_base": format_duration(settings.upload_backoff_base),
                "processing_retry_cooldown": format_duration(
                    settings.processing_retry_cooldown
                ),
            },
            "download_rate_limit": _rate_text(rate),
            "download_rate_limit_bytes": rate,
            "download_total_rate_limit": _rate_text(total_rate),
            "download_total_rate_limit_bytes": total_rate,
            "config": self.config_report(),
            "circuit_state": circuit.state.value,
            "circuit_failures": circuit.failures,
            "circuit_open_until": circuit.open_until,
            "last_process_run": last_run,
            "avg_download_ms": int(float(stored.get("avg_download_ms", "0") or 0)),
            "worker_id": settings.worker_id if self.scheduler else None,
            "paused": stored.get(PAUSED_KEY) == "true",
            "workers": [asdict(worker) for worker in workers],
        }


def _rate_text(rate: int | None) -> str | None:
    return format_rate(rate) if rate is not None else None


def _clean_text(name: str, value: str | None, max_length: int = 500) -> str | None:
    if value is None:
        return None
    if len(value) > max_length or any(not ch.isprintable() for ch in value):
        raise InvalidInput(
            f"{name} {value[:80]!r} is invalid; use at most {max_length} printable "
            "characters without control characters"
        )
    return value

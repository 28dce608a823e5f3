"""The service layer: what the API and the CLI ask of a running vodq.

It owns the engine, the queue, the metrics and (in processes that download)
the scheduler, validates input, and wakes the scheduler after every change
that may let a VOD start.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from vodq.config import Settings
from vodq.db.engine import make_engine
from vodq.db.migrate import upgrade
from vodq.download.files import ArchiveLayout
from vodq.download.ytdlp import YtDlpDownloader
from vodq.errors import InvalidInput
from vodq.metrics import Metrics
from vodq.models import Vod
from vodq.queue import VodQueue
from vodq.scheduler import Scheduler
from vodq.units import format_duration, format_rate

log = logging.getLogger(__name__)

# Letters, digits and ``_ . : -``, starting with a letter, digit or ``_``: no
# path separators, no leading dot, no spaces or control characters.
VOD_ID_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}"
_VOD_ID = re.compile(VOD_ID_PATTERN)
_TWITCH_VIDEO = re.compile(r"twitch\.tv/(?:[^/]+/)?videos?/(\d+)")
PRIORITY_MIN = -(2**63)
PRIORITY_MAX = 2**63 - 1


def validate_vod_id(vod_id: str) -> str:
    """Return ``vod_id`` if it is a valid id; raise InvalidInput naming it otherwise."""
    if not _VOD_ID.fullmatch(vod_id):
        raise InvalidInput(
            f"vod_id {vod_id!r} is invalid; use 1 to 128 letters, digits, '_', '.', "
            "':' or '-', starting with a letter, digit or '_', such as '123456789'"
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
                f"date {value!r} is not an ISO 8601 date or time; use for example "
                "'2024-10-15' or '2024-10-15T18:30:00+00:00'"
            ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def id_from_url(url: str) -> str:
    """Derive a stable VOD id from a URL: Twitch's video number, else a URL hash."""
    match = _TWITCH_VIDEO.search(url)
    if match:
        return match.group(1)
    return "url-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def validate_url(url: str) -> str:
    """Return ``url`` if it is an http(s) URL without spaces or control characters."""
    if not re.fullmatch(r"https?://[^\s\x00-\x1f\x7f]+", url) or len(url) > 2048:
        raise InvalidInput(
            f"url {url[:200]!r} is invalid; use an http or https URL of at most "
            "2048 characters, such as 'https://www.twitch.tv/videos/123456789'"
        )
    return url


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

    def __init__(self, settings: Settings, *, run_worker: bool = True) -> None:
        self.settings = settings
        self.engine = make_engine(settings.db_dsn)
        self.queue = VodQueue(self.engine)
        self.metrics = Metrics()
        self.metrics.watch_queue(self.queue.counts)
        self.layout = ArchiveLayout(settings.data_dir)
        self.scheduler: Scheduler | None = None
        if run_worker:
            downloader = YtDlpDownloader(
                self.layout, socket_timeout_s=settings.socket_timeout
            )
            self.scheduler = Scheduler(self.queue, downloader, settings, self.metrics)

    def start(self, *, migrate: bool = True) -> None:
        """Migrate the database if asked, then start downloading."""
        if migrate:
            upgrade(self.engine)
        if self.scheduler is not None:
            self.layout.ensure()
            self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler (keeping partial files) and close the database pool."""
        if self.scheduler is not None:
            self.scheduler.stop()
        self.engine.dispose()

    def wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()

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

    def status(self) -> dict[str, Any]:
        """Build the ``/status`` document from the values in force."""
        settings = self.settings
        counts = self.queue.counts()
        stored = self.queue.get_kv(
            [
                "circuit_state",
                "circuit_failures",
                "circuit_open_until",
                "last_process_run",
                "avg_download_ms",
            ]
        )
        last_run = self.scheduler.last_process_run if self.scheduler else None
        if last_run is None and "last_process_run" in stored:
            last_run = datetime.fromisoformat(stored["last_process_run"])
        rate = settings.download_rate_limit
        return {
            "pending": counts.by_state.get("queued", 0),
            "queue_by_priority": [
                {"priority": priority, "count": count}
                for priority, count in counts.by_priority
            ],
            "queue_by_state": counts.by_state,
            "active_downloads": counts.active,
            "max_concurrent_downloads": settings.max_concurrent_downloads,
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
            "download_rate_limit": format_rate(rate) if rate is not None else None,
            "download_rate_limit_bytes": rate,
            "circuit_state": stored.get("circuit_state", "closed"),
            "circuit_failures": int(stored.get("circuit_failures", "0") or 0),
            "circuit_open_until": stored.get("circuit_open_until"),
            "last_process_run": last_run,
            "avg_download_ms": int(float(stored.get("avg_download_ms", "0") or 0)),
            "worker_id": settings.worker_id if self.scheduler else None,
        }


def _clean_text(name: str, value: str | None, max_length: int = 500) -> str | None:
    if value is None:
        return None
    if len(value) > max_length or any(not ch.isprintable() for ch in value):
        raise InvalidInput(
            f"{name} {value[:80]!r} is invalid; use at most {max_length} printable "
            "characters without control characters"
        )
    return value

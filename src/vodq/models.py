"""The VOD record and its states."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

# error_class of a VOD that waits for its upload destination's quota to reset.
QUOTA_ERROR_CLASS = "upload_quota"


class VodState(StrEnum):
    """Where a VOD is in its life.

    ``queued`` covers both "never tried" and "waiting for its next attempt";
    ``next_attempt_at`` tells which. ``downloaded`` is the same for the upload
    stage: the file is complete and waits for an upload slot, or for
    ``upload_next_at`` after a failed upload. ``done`` (``processed``) comes
    only after the upload stage.
    """

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Progress:
    """A running download's progress, as the downloader last reported it."""

    bytes_done: int
    bytes_total: int | None
    speed_bps: int | None


@dataclass(frozen=True)
class Vod:
    """One row of the ``vods`` table."""

    id: int
    vod_id: str
    source_url: str
    title: str | None
    date: datetime | None
    channel: str | None
    priority: int
    state: VodState
    processed: bool
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    error_class: str | None
    bytes_done: int
    bytes_total: int | None
    speed_bps: int | None
    file_path: str | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    download_ms: int | None
    skip_upload: bool = False
    upload_attempts: int = 0
    upload_next_at: datetime | None = None
    upload_session: str | None = None
    upload_started_at: datetime | None = None
    remote_id: str | None = None
    remote_url: str | None = None
    uploaded_at: datetime | None = None
    uploader: str | None = None
    upload_ms: int | None = None

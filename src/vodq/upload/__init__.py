"""Uploading one downloaded VOD: the uploader seam that every destination implements."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from vodq.errors import UploadQuotaExceeded


@dataclass(frozen=True)
class UploadJob:
    """One upload attempt: the file it sends, and what an earlier attempt left.

    ``session`` is what the uploader recorded through ``on_session`` during an
    earlier attempt (a resumable-upload URL, say), so that this attempt
    resumes or verifies that upload instead of sending a second copy.
    """

    vod_id: str
    path: Path
    size: int
    attempt: int
    title: str | None
    channel: str | None
    date: datetime | None
    source_url: str
    session: str | None = None


@dataclass(frozen=True)
class UploadResult:
    """A confirmed upload: where the destination keeps the file now."""

    remote_id: str
    remote_url: str | None = None


class Uploader(Protocol):
    """Uploads one VOD's file per call, on the calling thread.

    ``upload`` raises UploadFailed (``retryable`` is whether another
    attempt may succeed), UploadQuotaExceeded, or UploadCancelled when
    ``cancelled`` is set or ``lease_held`` returns False. It calls
    ``on_session`` with anything that lets a later attempt resume this
    upload, before sending the file's bytes, and ``on_progress`` with the
    bytes sent so far; the stage stores progress at its next heartbeat.

    ``lease_held`` returns False once another worker may have taken the VOD
    over (this worker was paused past its lease, say). An uploader that
    writes to the destination itself calls it before each request and each
    piece of a request body, so that two attempts never write to one upload.
    """

    name: str

    def upload(
        self,
        job: UploadJob,
        *,
        cancelled: threading.Event,
        on_session: Callable[[str], None],
        on_progress: Callable[[int], None],
        lease_held: Callable[[], bool],
    ) -> UploadResult: ...


__all__ = ["UploadJob", "UploadQuotaExceeded", "UploadResult", "Uploader"]

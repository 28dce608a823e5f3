"""Downloading one VOD: the downloader seam, yt-dlp behind it, files and errors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vodq.bandwidth import TokenBucket
from vodq.models import Progress


@dataclass(frozen=True)
class DownloadJob:
    """What one attempt downloads, and where."""

    vod_id: str
    source_url: str
    attempt: int


@dataclass(frozen=True)
class DownloadResult:
    """A finished download: the complete file, moved into the archive."""

    path: Path
    size: int


class Downloader(Protocol):
    """Downloads one VOD per call, on the calling thread.

    ``download`` raises DownloadFailed (classified) or DownloadCancelled when
    ``cancelled`` is set; it reports progress through ``on_progress`` and
    throttles itself with ``bucket``.
    """

    def download(
        self,
        job: DownloadJob,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
        bucket: TokenBucket,
    ) -> DownloadResult: ...


__all__ = ["DownloadJob", "DownloadResult", "Downloader"]

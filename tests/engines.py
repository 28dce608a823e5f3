"""Downloaders that misbehave the way yt-dlp can, for the download process tests.

The download process builds its downloader from a picklable engine, so each
of these is an engine (a frozen dataclass with ``build``) and its downloader.
Every loop here ends on its own within HANG_S.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vodq.bandwidth import TokenBucket
from vodq.download import DownloadJob, DownloadResult
from vodq.errors import DownloadCancelled, DownloadFailed
from vodq.models import Progress

# Maximum time any of these downloaders runs, in seconds.
HANG_S = 60.0


@dataclass(frozen=True)
class HangingEngine:
    """Starts a grandchild (as yt-dlp starts ffmpeg), then hangs.

    It writes ``<its pid> <grandchild pid>`` to ``pid_file`` once both run.
    With ``honour_cancel`` it stops when asked; without, only a kill ends it.
    With ``progress_steps`` it first reports that many growing progress
    figures, 0.05 s apart, then goes silent.
    """

    pid_file: Path
    honour_cancel: bool = False
    progress_steps: int = 0
    read_block_bytes: int = 131_072

    def build(self) -> HangingDownloader:
        return HangingDownloader(self)


class HangingDownloader:
    def __init__(self, engine: HangingEngine) -> None:
        self.engine = engine

    def download(
        self,
        job: DownloadJob,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
        bucket: TokenBucket,
    ) -> DownloadResult:
        grandchild = subprocess.Popen(["sleep", str(int(HANG_S) * 2)])
        staged = self.engine.pid_file.with_suffix(".tmp")
        staged.write_text(f"{os.getpid()} {grandchild.pid}")
        staged.replace(self.engine.pid_file)

        for step in range(self.engine.progress_steps):
            on_progress(Progress((step + 1) * 1000, None, None))
            time.sleep(0.05)

        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if self.engine.honour_cancel and cancelled.is_set():
                raise DownloadCancelled("download cancelled")
            time.sleep(0.02)
        raise DownloadFailed("the hang ended", error_class="error", retryable=True)


@dataclass(frozen=True)
class CrashingEngine:
    """Fails the way no downloader should: ``raise`` an exception or ``exit``."""

    how: str
    read_block_bytes: int = 131_072

    def build(self) -> CrashingDownloader:
        return CrashingDownloader(self.how)


class CrashingDownloader:
    def __init__(self, how: str) -> None:
        self.how = how

    def download(
        self,
        job: DownloadJob,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
        bucket: TokenBucket,
    ) -> DownloadResult:
        if self.how == "exit":
            os._exit(3)
        raise RuntimeError(f"engine broke while downloading {job.vod_id}")


@dataclass(frozen=True)
class RateEngine:
    """An engine that writes its bucket's rate to ``rate_file`` until
    cancelled, and the bucket's ceiling and its store's rate beside it."""

    rate_file: Path
    read_block_bytes: int = 131_072

    def build(self) -> RateDownloader:
        return RateDownloader(self.rate_file)


class RateDownloader:
    def __init__(self, rate_file: Path) -> None:
        self.rate_file = rate_file

    def download(
        self,
        job: DownloadJob,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: threading.Event,
        bucket: TokenBucket,
    ) -> DownloadResult:
        deadline = time.monotonic() + HANG_S
        step = 0
        while time.monotonic() < deadline and not cancelled.is_set():
            step += 1
            on_progress(Progress(step, None, None))
            spare = bucket.spare.rate if bucket.spare is not None else None
            _report(self.rate_file, bucket.rate)
            _report(self.rate_file.with_suffix(".ceiling"), bucket.ceiling)
            _report(self.rate_file.with_suffix(".spare"), spare)
            time.sleep(0.02)
        raise DownloadCancelled("download cancelled")


def _report(path: Path, value: float | None) -> None:
    """Replace ``path`` with ``repr(value)`` in one step, for a reader polling it."""
    staged = path.with_suffix(path.suffix + ".tmp")
    staged.write_text(repr(value))
    staged.replace(path)

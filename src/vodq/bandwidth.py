"""Token buckets that hold a download to a rate, changeable while it runs.

yt-dlp's own ``ratelimit`` averages since the start of the download (so a
change mid-download bursts or stalls) and applies per fragment thread for HLS
(yt-dlp 2026.11). A bucket consulted from the progress hook after every block
has neither problem: the hook runs on the thread that reads the data, so
sleeping there slows the reads themselves.
"""

from __future__ import annotations

import threading
import time

# Largest burst a bucket allows, in seconds of its rate. Short enough that any
# window of a few seconds sees the configured rate within a few percent.
BURST_S = 0.25


class TokenBucket:
    """Byte tokens refilled at ``rate`` bytes per second; None means unlimited."""

    def __init__(self, rate: float | None) -> None:
        self._lock = threading.Lock()
        self._rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """Apply a new rate from now on, forgetting any debt built at the old one."""
        with self._lock:
            self._refill()
            self._rate = rate
            self._tokens = max(self._tokens, 0.0)

    def consume(self, nbytes: int, cancelled: threading.Event | None = None) -> None:
        """Take ``nbytes`` tokens, sleeping while the bucket is in debt.

        Returns early when ``cancelled`` is set, so a cancel is never delayed
        by throttling.
        """
        with self._lock:
            self._refill()
            if self._rate is None:
                return
            self._tokens -= nbytes
            wait_s = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait_s > 0:
            if cancelled is None:
                time.sleep(wait_s)
            else:
                cancelled.wait(wait_s)

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = now - self._stamp
        self._stamp = now
        if self._rate is None:
            self._tokens = 0.0
            return
        self._tokens = min(self._rate * BURST_S, self._tokens + elapsed * self._rate)

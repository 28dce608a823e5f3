"""Token buckets that hold a download to a rate, changeable while it runs.

yt-dlp's own ``ratelimit`` averages since the start of the download (so a
change mid-download bursts or stalls) and applies per fragment thread for HLS
(yt-dlp 2026.11). A bucket charged after every read, on the thread that
reads (download/ytdlp.py), has neither problem: sleeping there slows the
reads themselves, and so the bytes the server may send.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

# Largest burst a bucket allows, in seconds of its rate: 5% of a 5 s window.
# It also bounds the catch-up after a stall (a slow scheduler, a TCP hiccup),
# so a smaller burst loses more of a window to each stall.
BURST_S = 0.25
# Maximum single sleep of a throttled read, in seconds, so that a new rate
# shortens or lengthens a wait already running.
WAIT_SLICE_S = 0.1


class TokenBucket:
    """Byte tokens refilled at ``rate`` bytes per second; None means unlimited."""

    def __init__(self, rate: float | None) -> None:
        self._lock = threading.Lock()
        self._rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()
        # Called after every set_rate, outside the lock, on the caller's thread.
        self.on_change: Callable[[], None] | None = None

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """Apply a new rate from now on.

        A debt (bytes read but not yet waited for, a few blocks) is kept in
        bytes and waited for at the new rate, unless that is lower: a cut
        keeps the wait in seconds instead. Those bytes came at the old rate.
        Waited for at a twentieth of it, the debt of four HLS fragment threads
        at 10M stalled the download for a second after a cut to 500K, while
        the network carried nothing. Forgiving debts at every change would
        leave bytes uncharged, and the pool changes rates often. Then
        ``on_change`` is called, so that the download can resize its
        connections' receive buffers.
        """
        with self._lock:
            self._refill()
            previous, self._rate = self._rate, rate
            if rate is None:
                self._tokens = 0.0
            else:
                self._tokens = min(self._tokens, rate * BURST_S)
                if self._tokens < 0 and previous is not None and rate < previous:
                    self._tokens *= rate / previous
        callback = self.on_change
        if callback is not None:
            callback()

    def read_cost(self, nbytes: int, read_rate: float | None) -> int:
        """Return the bytes to charge for ``nbytes`` read while ``read_rate``
        was in force.

        A read that ended before a cut but is charged after it came at the
        old rate, so its wait is kept in seconds at that rate, as set_rate
        does for a debt: none for a read without a limit. Charged whole at
        the new rate, one 128 KiB read at the moment of a cut to 100K
        stopped the download's every fragment for 1.3 s.
        """
        rate = self._rate
        if rate is None or (read_rate is not None and read_rate <= rate):
            return nbytes
        if read_rate is None:
            return 0
        return int(nbytes * rate / read_rate)

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
        while True:
            with self._lock:
                self._refill()
                if self._rate is None or self._tokens >= 0:
                    return
                wait_s = min(WAIT_SLICE_S, -self._tokens / self._rate)
            if cancelled is None:
                time.sleep(wait_s)
            elif cancelled.wait(wait_s):
                return

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = now - self._stamp
        self._stamp = now
        if self._rate is None:
            self._tokens = 0.0
            return
        self._tokens = min(self._rate * BURST_S, self._tokens + elapsed * self._rate)


# A download whose measured rate is below this share of its own limit is held
# back by its source, not by its limit. The 10% margin is above the error of
# a rate measured between progress reports 1 to 3 s apart.
SATURATED_SHARE = 0.9
# Such a download keeps this multiple of its measured rate as its limit.
# Their product is above 1, so at its new limit the download still counts as
# held back by its source: 1.5 times 0.9 leaves a 35% margin for a slow
# source's uneven rate. A source that gets 35% faster fills the limit,
# counts as saturated again and gets its equal share back.
# NOTE: the headroom goes unused while the source stays slow, so the pool's
# sum falls short by up to half of what such sources receive.
HEADROOM = 1.5
# Smallest limit the pool gives a download held back by its source, in bytes
# per second.
MIN_DEMAND = 16_384.0


def demand_of(limit: float | None, measured: float | None) -> float | None:
    """Return the rate a download can use, or None for as much as it gets.

    ``limit`` is the download's rate now and ``measured`` what it received
    under that limit, both in bytes per second; None when not yet known.
    """
    if limit is None or measured is None or measured >= SATURATED_SHARE * limit:
        return None
    # Never 0, so that a source that paused can show it sends again.
    return max(MIN_DEMAND, measured * HEADROOM)


def fair_shares(total: float, demands: Sequence[float | None]) -> list[float]:
    """Split ``total`` bytes per second max-min fairly between downloads.

    A download never gets more than its demand (None: no bound) while another
    wants more, and the downloads that want more share the rest equally.
    When every demand is met, the rest is spread equally too, so the shares
    always add up to ``total``.
    """
    if not demands:
        return []

    shares = [0.0] * len(demands)
    remaining = total
    bounded = sorted(
        (index for index, demand in enumerate(demands) if demand is not None),
        key=lambda index: demands[index] or 0.0,
    )
    unbounded = [index for index, demand in enumerate(demands) if demand is None]
    left = len(demands)
    for index in bounded:
        share = min(demands[index] or 0.0, remaining / left)
        shares[index] = share
        remaining -= share
        left -= 1
    for index in unbounded:
        shares[index] = remaining / len(unbounded)
    if not unbounded:
        for index in range(len(shares)):
            shares[index] += remaining / len(shares)
    return shares

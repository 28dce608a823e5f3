"""How many fragments of one download are fetched at once, set by its rate.

yt-dlp fetches up to HLS_CONCURRENT_FRAGMENTS fragments of an HLS or DASH
download at once, each on its own connection. Every connection keeps a
receive buffer of at least twice MIN_RECEIVE_BUFFER_BYTES (the kernel
doubles it), which a new connection fills at once. At a low rate shared by
many connections that buffer is seconds of each one's part, so the bytes on
the wire stray from the limit as fragments start and end. Measured at the
client, 16 fragments at 64K strayed by up to 10% over 5 s windows, and 4
fragments by 3%.

``FragmentSlots`` lets a fragment thread fetch only while fewer than
``capacity()`` fragments are being fetched: one per FRAGMENT_MIN_RATE of the
rate in force, at least one and at most the configured count. The waiting
thread with the lowest fragment index goes first, so the file still grows in
order.

Fragments started together, given equal parts of the rate, end together
too, and then start the next ones together. Each fragment's receive buffer
fills at its start and drains at its end unseen by the server, so the
server sends all of their buffers in one burst, after one gap. ``weight``
gives the older fragments larger parts, so each ends before the next
younger one and the ends spread out over the time of a fragment.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from vodq.download.connections import MIN_RECEIVE_BUFFER_BYTES
from vodq.errors import DownloadCancelled

# The smallest part of a download's rate, in bytes per second, that one
# fragment connection is given. Its smallest buffer (twice
# MIN_RECEIVE_BUFFER_BYTES) is then half a second of it.
FRAGMENT_MIN_RATE = 4 * MIN_RECEIVE_BUFFER_BYTES
# How often a waiting fragment thread looks at the rate and its cancel flag
# again, in seconds. A rate change also wakes it (``wake``).
WAIT_S = 0.25
# The part of the rate that the oldest fragment being fetched reads, as a
# multiple of the newest's. Those between get parts between, by age. With
# equal parts, HLS at 500K with 256 KiB segments ran up to 6.4% off in 5 s
# windows sliding by 0.05 s, and with these parts and smaller buffers
# (connections.FRAGMENT_BUFFER_S) within 2.9% (bench/bench_rates.py).
# NOTE: 16 fragments at once at 300K to 2M still ended together and ran up
# to 5.9% off in a test. Each connection's buffer is then the kernel's
# smallest, and the reads seem paced by its window updates, not the blocks.
OLDEST_WEIGHT = 4.0


class FragmentSlots:
    """The fragments of one download that may be fetched at once."""

    def __init__(
        self,
        limit: int,
        rate: Callable[[], float | None],
        cancelled: threading.Event | None = None,
    ) -> None:
        # The configured count, HLS_CONCURRENT_FRAGMENTS.
        self.limit = limit
        self._rate = rate
        self._cancelled = cancelled
        self._changed = threading.Condition()
        self._waiting: set[int] = set()
        # The indices of the fragments being fetched, and the one that each
        # fragment thread fetches.
        self._fetching: set[int] = set()
        self._local = threading.local()

    def capacity(self) -> int:
        """Return how many fragments may be fetched at once now."""
        return self.capacity_at(self._rate())

    def capacity_at(self, rate: float | None) -> int:
        """Return how many fragments may be fetched at once at ``rate`` bytes
        per second (None: no limit)."""
        if rate is None:
            return self.limit
        return max(1, min(self.limit, int(rate // FRAGMENT_MIN_RATE)))

    @contextlib.contextmanager
    def fetching(self, index: int) -> Iterator[None]:
        """Hold a slot while fragment ``index`` is fetched.

        Waits while the slots are taken or a lower fragment waits too.
        Raises DownloadCancelled once the download is cancelled, so that a
        waiting thread opens no connection.
        """
        with self._changed:
            self._waiting.add(index)
            try:
                while self._is_full() or index > min(self._waiting):
                    if self._is_cancelled():
                        raise DownloadCancelled("download cancelled")
                    self._changed.wait(WAIT_S)
            finally:
                self._waiting.discard(index)
            self._fetching.add(index)
            # The next lowest waiter may fit now too.
            self._changed.notify_all()
        self._local.index = index
        try:
            yield
        finally:
            self._local.index = None
            with self._changed:
                self._fetching.discard(index)
                self._changed.notify_all()

    def _is_full(self) -> bool:
        """Return whether every slot is taken; called with ``_changed`` held."""
        return len(self._fetching) >= self.capacity()

    def weight(self) -> float:
        """Return the calling thread's part of the rate, as a multiple of an
        equal part.

        The oldest fragment being fetched (the lowest index) gets
        OLDEST_WEIGHT times the newest's part. Outside a fragment, or for the
        only one, the part is 1.0.
        """
        index = getattr(self._local, "index", None)
        with self._changed:
            fetching = sorted(self._fetching)
        if index is None or index not in fetching or len(fetching) < 2:
            return 1.0
        # 0.0 for the oldest fragment, 1.0 for the newest.
        rank = fetching.index(index) / (len(fetching) - 1)
        # Linear from OLDEST_WEIGHT to 1, divided by its mean.
        return (OLDEST_WEIGHT - (OLDEST_WEIGHT - 1) * rank) * 2 / (OLDEST_WEIGHT + 1)

    def wake(self) -> None:
        """Let waiting threads look at a new rate now."""
        with self._changed:
            self._changed.notify_all()

    def _is_cancelled(self) -> bool:
        return self._cancelled is not None and self._cancelled.is_set()

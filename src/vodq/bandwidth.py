"""Token buckets that hold a download to a rate, changeable while it runs.

yt-dlp's own ``ratelimit`` averages since the start of the download (so a
change mid-download bursts or stalls) and applies per fragment thread for HLS
(yt-dlp 2026.11). A bucket charged after every read, on the thread that
reads (download/ytdlp.py), has neither problem: sleeping there slows the
reads themselves, and so the bytes the server may send.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# Largest burst a bucket allows, in seconds of its rate: 5% of a 5 s window.
# It also bounds the catch-up after a stall (a slow scheduler, a TCP hiccup),
# so a smaller burst loses more of a window to each stall.
BURST_S = 0.25
# Maximum single sleep of a throttled read, in seconds, so that a new rate
# shortens or lengthens a wait already running.
WAIT_SLICE_S = 0.1
# Largest store of a worker's unused pool tokens, in seconds of its part of
# the pool. Borrowers look every BORROW_POLL_S, so the store fills for a
# fifth of its size between looks.
SPARE_BURST_S = 0.1
BORROW_POLL_S = 0.02


class TokenBucket:
    """Byte tokens refilled at ``rate`` bytes per second; None means unlimited.

    A pooled download's bucket may borrow from ``spare``, the pool tokens
    that the worker's other downloads left unused, up to ``ceiling`` bytes
    per second in all (None: no bound but the pool's).
    """

    def __init__(
        self,
        rate: float | None,
        *,
        spare: SpareTokens | None = None,
        ceiling: float | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._rate = rate
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self.spare = spare
        self._ceiling: TokenBucket | None = None
        self.set_ceiling(ceiling)
        # False while the download must keep to its own rate alone (the
        # service fell silent, see download/process.py).
        self.borrowing = True
        # Called after every set_rate, outside the lock, on the caller's thread.
        self.on_change: Callable[[], None] | None = None

    @property
    def rate(self) -> float | None:
        return self._rate

    @property
    def pooled(self) -> bool:
        """Whether the download shares the bandwidth pool, whose spare
        tokens it may borrow."""
        return self.spare is not None and self.spare.rate is not None

    @property
    def ceiling(self) -> float | None:
        """The highest rate this download may reach by borrowing, in bytes/s."""
        return None if self._ceiling is None else self._ceiling.rate

    def set_ceiling(self, ceiling: float | None) -> None:
        """Bound what borrowing may add, from now on, to ``ceiling`` bytes/s."""
        if ceiling is None:
            self._ceiling = None
        elif ceiling == self.ceiling:
            return
        elif self._ceiling is None:
            self._ceiling = TokenBucket(ceiling)
        else:
            self._ceiling.set_rate(ceiling)

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

    def forfeit(self, seconds: float) -> None:
        """Drop the tokens that accrued over the last ``seconds``, in which
        the download's source sent nothing.

        They were left unused by the source, not by a stall of this side
        (which a burst of BURST_S makes up for), so spending them at the
        source's resume would only add a burst on the network. Tokens left
        before those seconds are kept, and so is a debt. The worker's spare
        store drops its tokens too (``SpareTokens.forfeit``).
        """
        with self._lock:
            self._refill()
            if self._rate is not None and self._tokens > 0:
                self._tokens = max(0.0, self._tokens - self._rate * seconds)
        if self.spare is not None:
            self.spare.forfeit()

    def keep_at_most(self, seconds: float) -> None:
        """Drop the stored tokens beyond ``seconds`` of the rate.

        For a download held back by its source: its reads wait for bytes,
        so the store fills to its burst and is never used until the source
        turns fast, when it adds that burst at once.
        """
        with self._lock:
            self._refill()
            if self._rate is not None:
                self._tokens = min(self._tokens, self._rate * seconds)

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

    def charge(self, nbytes: int) -> bool:
        """Take ``nbytes`` tokens without waiting; return whether none are owed."""
        with self._lock:
            self._refill()
            if self._rate is None:
                return True
            self._tokens -= nbytes
            return self._tokens >= 0

    def consume(self, nbytes: int, cancelled: threading.Event | None = None) -> None:
        """Take ``nbytes`` tokens, sleeping while the bucket is in debt.

        A bucket in debt borrows instead when the pool has spare tokens and
        the ceiling allows: the debt is then the pool's, and forgiven here.
        Returns early when ``cancelled`` is set, so a cancel is never delayed
        by throttling.
        """
        with self._lock:
            self._refill()
            if self._rate is None:
                return
            self._tokens -= nbytes
        spare = self.spare
        if spare is not None:
            # Every byte counts against the pool, borrowed or not.
            spare.charge(nbytes)
        ceiling = self._ceiling
        if ceiling is not None:
            ceiling.charge(nbytes)

        while True:
            with self._lock:
                self._refill()
                if self._rate is None or self._tokens >= 0:
                    return
                wait_s = min(WAIT_SLICE_S, -self._tokens / self._rate)
            if self._may_borrow():
                with self._lock:
                    self._tokens = max(self._tokens, 0.0)
                return
            if self.pooled and self.borrowing:
                wait_s = min(wait_s, BORROW_POLL_S)
            if cancelled is None:
                time.sleep(wait_s)
            elif cancelled.wait(wait_s):
                return

    def _may_borrow(self) -> bool:
        spare = self.spare
        if spare is None or not self.borrowing or not spare.has_tokens():
            return False
        ceiling = self._ceiling
        return ceiling is None or ceiling.charge(0)

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = now - self._stamp
        self._stamp = now
        if self._rate is None:
            self._tokens = 0.0
            return
        self._tokens = min(self._rate * BURST_S, self._tokens + elapsed * self._rate)


class SpareTokens:
    """The tokens of a worker's part of the pool that its downloads left unused.

    Refilled at the sum of the worker's pool shares and charged for every
    byte that its pooled downloads read. So it has tokens only while they
    read less than that sum, as when a source sends less than its share.
    A download that used up its own share may read on while tokens are
    here (``TokenBucket.consume``). Without it, the share that a slow or
    bursty source left unused went unused: the pool's sum fell 7% to 21%
    short.

    The state lives in shared memory, so that the download processes of a
    worker share it: passed to each child when it starts.
    """

    def __init__(self, context: Any = None) -> None:
        if context is None:
            context = multiprocessing.get_context("forkserver")
        # Tokens, the time of the last refill (time.monotonic(), which all
        # processes of the machine share) and the rate, negative for none.
        self._state = context.Array("d", [0.0, time.monotonic(), -1.0])

    @property
    def rate(self) -> float | None:
        rate = self._state[2]
        return None if rate < 0 else rate

    def set_rate(self, rate: float | None) -> None:
        """Refill at ``rate`` bytes per second from now on; None lends nothing."""
        with self._state.get_lock():
            self._refill()
            self._state[2] = -1.0 if rate is None else rate
            self._clamp()

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` read by one of the worker's pooled downloads."""
        with self._state.get_lock():
            self._refill()
            self._state[0] -= nbytes
            self._clamp()

    def forfeit(self) -> None:
        """Drop the tokens stored, when a download's source resumes after a
        stall.

        The store fills only while the worker's downloads read less than
        their shares and none borrows, as when every source paused. Lent at
        the resume, its tokens would add to the burst of the receive queues'
        refill.
        """
        with self._state.get_lock():
            self._refill()
            self._state[0] = min(0.0, self._state[0])

    def has_tokens(self) -> bool:
        """Return whether the store has tokens to lend."""
        with self._state.get_lock():
            self._refill()
            return bool(self._state[2] >= 0 and self._state[0] > 0)

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = max(0.0, now - self._state[1])
        self._state[1] = now
        if self._state[2] >= 0:
            self._state[0] += elapsed * self._state[2]
        self._clamp()

    def _clamp(self) -> None:
        # A debt up to the bursts that the downloads and the store add after
        # a pause is paid back before the next loan. A larger one is written
        # off, so that bytes read before a cut do not stop lending for long.
        # NOTE: the bursts still add up after a pause of every source too
        # short for a read to wait STALL_S (download/ytdlp.py), so
        # forfeit() is never called: +6.9% in the 5 s window from a 0.5 s pause.
        # Smaller bursts let downloads fall behind their limits after each
        # stall of a loaded machine.
        rate = max(0.0, self._state[2])
        debt = rate * (BURST_S + SPARE_BURST_S)
        self._state[0] = min(rate * SPARE_BURST_S, max(-debt, self._state[0]))


# A download whose measured rate is below this share of its own limit is held
# back by its source, not by its limit. The 10% margin is above the error of
# a rate measured between progress reports 1 to 3 s apart.
SATURATED_SHARE = 0.9
# Such a download keeps this multiple of its measured rate as its limit.
# Their product is above 1, so at its new limit the download still counts as
# held back by its source: 1.5 times 0.9 leaves a 35% margin for a slow
# source's uneven rate. A source that gets 35% faster fills the limit,
# counts as saturated again and gets its equal share back.
# The worker's other downloads borrow what the source leaves of its limit
# (SpareTokens). Where none of them can, the worker gives the other workers
# a smaller demand (lent_demand).
HEADROOM = 1.5
# A download held back by its source, on a worker where no download borrows
# its headroom, is counted by the other workers at this multiple of what it
# received over its last 2 s since it was found held back (its last second
# until 0.9 s since then is in).
# The 5% covers an even source's rate that reads low. At 10%, a source at
# 60% of its share left a pool of two 3% short. A source that speeds up
# shows in that rate from the next tick (0.5 s) on, and the other workers
# count more at their next tick.
# NOTE: until then such a download can read up to its own limit, so the
# pool can run over by that headroom for a second or two.
LENT_MARGIN = 1.05
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


def lent_demand(
    demand: float | None, last_second: float | None, held: float | None = None
) -> float | None:
    """Return the demand other workers count for a download no neighbour borrows from.

    ``demand`` is the download's own (``demand_of``), ``last_second`` what
    it received over about the last second and ``held`` over its last 2 s
    since it was found held back by its source (None: not yet known), all
    in bytes per second.
    The download's own limit stays up to HEADROOM over LENT_MARGIN above
    this count (``Scheduler._rates``), so that a source that speeds up can
    show it. The other workers take the rest of its demand.
    """
    if demand is None:
        return None
    # The demand follows a span of 8 s or more, which after a drop still
    # includes the faster seconds before it. What arrived since the download
    # was found held back is all after the drop. The last second alone
    # varies with the bursts it happens to hold.
    if held is not None:
        received = held
    elif last_second is not None:
        # Just found held back: its last second is after the drop too.
        received = last_second
    else:
        received = demand / HEADROOM
    return min(demand, max(MIN_DEMAND, received * LENT_MARGIN))


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

"""Token buckets for tests that record their charges and trims."""

from __future__ import annotations

import threading

from vodq.bandwidth import TokenBucket


class RecordingBucket(TokenBucket):
    """A bucket that records each charge, in bytes, and never waits."""

    def __init__(self, rate: float | None) -> None:
        super().__init__(rate)
        self.charges: list[int] = []
        # The seconds of each keep_at_most call, in order.
        self.kept: list[float] = []

    def consume(self, nbytes: int, cancelled: threading.Event | None = None) -> None:
        self.charges.append(nbytes)

    def keep_at_most(self, seconds: float) -> None:
        self.kept.append(seconds)
        super().keep_at_most(seconds)


class CountingBucket(RecordingBucket):
    """A bucket that records each charge, in bytes, and waits as usual."""

    def consume(self, nbytes: int, cancelled: threading.Event | None = None) -> None:
        super().consume(nbytes, cancelled)
        TokenBucket.consume(self, nbytes, cancelled)

"""A token bucket for tests that records its charges instead of waiting."""

from __future__ import annotations

import threading

from vodq.bandwidth import TokenBucket


class RecordingBucket(TokenBucket):
    """A bucket that records each charge, in bytes, and never waits."""

    def __init__(self, rate: float | None) -> None:
        super().__init__(rate)
        self.charges: list[int] = []

    def consume(self, nbytes: int, cancelled: threading.Event | None = None) -> None:
        self.charges.append(nbytes)


class CountingBucket(RecordingBucket):
    """A bucket that records each charge, in bytes, and waits as usual."""

    def consume(self, nbytes: int, cancelled: threading.Event | None = None) -> None:
        super().consume(nbytes, cancelled)
        TokenBucket.consume(self, nbytes, cancelled)

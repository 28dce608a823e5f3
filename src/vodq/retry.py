"""When a failed attempt is tried again: exponential backoff with jitter.

Transient network failures (timeouts, resets, 5xx, truncated bodies) back off
from DOWNLOAD_BACKOFF_BASE: attempt n waits ``base * 2**(n-1)``, capped at
``BACKOFF_CAP_S``, of which a random half is jitter, so that many VODs failing
together do not retry in lockstep. Any other retryable failure also waits
at least PROCESSING_RETRY_COOLDOWN, because it is unlikely to clear in
seconds. A server's ``Retry-After`` is a floor on top of both.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from vodq.errors import DownloadFailed, StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Pause between two tries of a result write, in seconds.
STORE_RETRY_S = 0.5

# Longest wait between two attempts, in seconds, however many attempts failed.
BACKOFF_CAP_S = 3600.0

# Error classes whose retry waits only for the backoff, not the cooldown.
FAST_RETRY_CLASSES = frozenset({"transient", "rate_limited"})


@dataclass(frozen=True)
class RetryPolicy:
    """The retry settings in force; durations in seconds."""

    max_attempts: int
    backoff_base_s: float
    cooldown_s: float


def backoff_delay(
    attempt: int, base_s: float, rng: random.Random | None = None
) -> float:
    """Return the wait in seconds after failed attempt number ``attempt`` (from 1)."""
    ceiling: float = min(BACKOFF_CAP_S, base_s * 2.0 ** min(attempt - 1, 32))
    jitter: float = (rng or random).uniform(0.0, ceiling / 2)
    return ceiling / 2 + jitter


def next_attempt_at(
    error: DownloadFailed,
    attempts_done: int,
    policy: RetryPolicy,
    now: datetime,
    *,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> datetime | None:
    """Return when to try again after ``attempts_done`` attempts, or None to give up."""
    if not error.retryable or attempts_done >= policy.max_attempts:
        return None

    delay_s = backoff_delay(attempts_done, policy.backoff_base_s, rng)
    if error.error_class not in FAST_RETRY_CLASSES:
        delay_s = max(delay_s, policy.cooldown_s)
    if retry_after_s is not None:
        delay_s = max(delay_s, retry_after_s)
    return now + timedelta(seconds=delay_s)


def store_outcome(
    write: Callable[[], T], *, within_s: float, what: str, worker_id: str
) -> T | None:
    """Run ``write``, trying again while the database is briefly unavailable.

    The outcome of a finished attempt must not be lost to a database
    restart, so the write is tried until ``within_s`` (the lease, which
    would have expired by then anyway) has passed. Returns None, after one
    ERROR line naming ``what``, when every try failed.
    """
    deadline = time.monotonic() + within_s
    while True:
        try:
            return write()
        except (StorageUnavailable, SQLAlchemyError) as exc:
            if time.monotonic() >= deadline:
                log.error(
                    "could not record %s, giving up: %s",
                    what,
                    exc,
                    extra={"worker_id": worker_id, "action": "store"},
                )
                return None
            time.sleep(STORE_RETRY_S)

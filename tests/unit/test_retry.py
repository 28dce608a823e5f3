"""Tests for backoff with jitter and the choice of the next attempt's time."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from vodq.errors import DownloadFailed
from vodq.retry import BACKOFF_CAP_S, RetryPolicy, backoff_delay, next_attempt_at

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=5, backoff_base_s=2.0, cooldown_s=600.0)
SEEDS = range(20)


def _failure(error_class: str, *, retryable: bool = True) -> DownloadFailed:
    return DownloadFailed(
        "attempt failed", error_class=error_class, retryable=retryable
    )


def _delay_s(retry_at: datetime | None) -> float:
    assert retry_at is not None
    return (retry_at - NOW).total_seconds()


@pytest.mark.parametrize(
    ("attempt", "ceiling_s"),
    [
        pytest.param(1, 2.0, id="first"),
        pytest.param(2, 4.0, id="second"),
        pytest.param(3, 8.0, id="third"),
        pytest.param(6, 64.0, id="sixth"),
        pytest.param(11, 2048.0, id="eleventh"),
    ],
)
def test_backoff_delay_within_jitter_band(attempt: int, ceiling_s: float) -> None:
    delays = [backoff_delay(attempt, 2.0, random.Random(seed)) for seed in SEEDS]

    assert min(delays) >= ceiling_s / 2
    assert max(delays) <= ceiling_s


def test_backoff_delay_jitter_varies() -> None:
    delays = {backoff_delay(3, 2.0, random.Random(seed)) for seed in SEEDS}

    assert len(delays) > 1


def test_backoff_delay_same_seed_repeats() -> None:
    first = backoff_delay(4, 2.0, random.Random(7))
    second = backoff_delay(4, 2.0, random.Random(7))

    assert first == second


@pytest.mark.parametrize("attempt", [12, 13, 40, 1000, 10**9], ids=str)
def test_backoff_delay_capped_large_attempts(attempt: int) -> None:
    delays = [backoff_delay(attempt, 2.0, random.Random(seed)) for seed in SEEDS]

    assert min(delays) >= BACKOFF_CAP_S / 2
    assert max(delays) <= BACKOFF_CAP_S


def test_backoff_delay_capped_large_base() -> None:
    delay = backoff_delay(1, 10 * BACKOFF_CAP_S, random.Random(1))

    assert delay <= BACKOFF_CAP_S


def test_backoff_delay_without_rng() -> None:
    delay = backoff_delay(2, 2.0)

    assert 2.0 <= delay <= 4.0


def test_next_attempt_non_retryable_gives_up() -> None:
    retry_at = next_attempt_at(
        _failure("gone", retryable=False), 1, POLICY, NOW, rng=random.Random(1)
    )

    assert retry_at is None


@pytest.mark.parametrize("attempts_done", [5, 6], ids=["at-maximum", "past-maximum"])
def test_next_attempt_exhausted_gives_up(attempts_done: int) -> None:
    retry_at = next_attempt_at(
        _failure("transient"), attempts_done, POLICY, NOW, rng=random.Random(1)
    )

    assert retry_at is None


def test_next_attempt_last_allowed_retries() -> None:
    retry_at = next_attempt_at(
        _failure("transient"), 4, POLICY, NOW, rng=random.Random(1)
    )

    assert retry_at is not None


@pytest.mark.parametrize("attempts_done", [1, 2, 3, 4], ids=str)
def test_next_attempt_transient_skips_cooldown(attempts_done: int) -> None:
    ceiling_s = 2.0 * 2 ** (attempts_done - 1)

    delay_s = _delay_s(
        next_attempt_at(
            _failure("transient"), attempts_done, POLICY, NOW, rng=random.Random(3)
        )
    )

    assert ceiling_s / 2 <= delay_s <= ceiling_s


def test_next_attempt_rate_limited_skips_cooldown() -> None:
    delay_s = _delay_s(
        next_attempt_at(_failure("rate_limited"), 1, POLICY, NOW, rng=random.Random(3))
    )

    assert delay_s <= 2.0


@pytest.mark.parametrize(
    "error_class", ["error", "range_rejected", "disk_full"], ids=str
)
def test_next_attempt_cooldown_floor_applies(error_class: str) -> None:
    delay_s = _delay_s(
        next_attempt_at(_failure(error_class), 1, POLICY, NOW, rng=random.Random(3))
    )

    assert delay_s == 600.0


def test_next_attempt_backoff_above_cooldown() -> None:
    policy = RetryPolicy(max_attempts=20, backoff_base_s=2.0, cooldown_s=10.0)

    delay_s = _delay_s(
        next_attempt_at(_failure("error"), 8, policy, NOW, rng=random.Random(3))
    )

    assert 128.0 <= delay_s <= 256.0


def test_next_attempt_honours_retry_after() -> None:
    delay_s = _delay_s(
        next_attempt_at(
            _failure("rate_limited"),
            1,
            POLICY,
            NOW,
            retry_after_s=120.0,
            rng=random.Random(3),
        )
    )

    assert delay_s == 120.0


def test_next_attempt_retry_after_over_cooldown() -> None:
    delay_s = _delay_s(
        next_attempt_at(
            _failure("error"), 1, POLICY, NOW, retry_after_s=900.0, rng=random.Random(3)
        )
    )

    assert delay_s == 900.0


def test_next_attempt_short_retry_after_ignored() -> None:
    delay_s = _delay_s(
        next_attempt_at(
            _failure("error"), 1, POLICY, NOW, retry_after_s=5.0, rng=random.Random(3)
        )
    )

    assert delay_s == 600.0


def test_next_attempt_keeps_timezone() -> None:
    retry_at = next_attempt_at(
        _failure("transient"), 1, POLICY, NOW, rng=random.Random(1)
    )

    assert retry_at is not None
    assert retry_at.tzinfo is UTC
    assert retry_at > NOW
    assert retry_at - NOW <= timedelta(seconds=2)

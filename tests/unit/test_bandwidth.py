"""Behaviour checks of the token bucket on the real clock, and of the pool's split.

The bucket's bounds are loose on purpose, because these check that
throttling happens at about the configured rate, not how precise the sleeps
are.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from vodq.bandwidth import (
    BURST_S,
    LENT_MARGIN,
    MIN_DEMAND,
    SpareTokens,
    TokenBucket,
    demand_of,
    fair_shares,
    lent_demand,
)


def _consume_in_chunks(bucket: TokenBucket, total: int, chunk: int) -> float:
    started = time.monotonic()
    for _ in range(total // chunk):
        bucket.consume(chunk)
    return time.monotonic() - started


def test_token_bucket_unlimited_never_sleeps() -> None:
    bucket = TokenBucket(None)

    elapsed_s = _consume_in_chunks(bucket, 10**10, 10**8)

    assert elapsed_s < 0.1


def test_token_bucket_reports_rate() -> None:
    assert TokenBucket(1500.0).rate == 1500.0


def test_token_bucket_throttles_to_rate() -> None:
    # 6000 bytes at 20000 bytes per second take about 0.3 s.
    bucket = TokenBucket(20_000)

    elapsed_s = _consume_in_chunks(bucket, 6000, 500)

    assert elapsed_s >= 0.2
    assert elapsed_s < 1.0


def test_token_bucket_one_large_chunk() -> None:
    bucket = TokenBucket(20_000)

    started = time.monotonic()
    bucket.consume(4000)
    elapsed_s = time.monotonic() - started

    assert elapsed_s >= 0.15
    assert elapsed_s < 0.8


def test_token_bucket_idle_burst_is_capped() -> None:
    # After 0.5 s idle the bucket contains only BURST_S seconds of tokens, so
    # taking 0.45 s worth of bytes still waits about 0.2 s.
    rate = 20_000
    bucket = TokenBucket(rate)
    time.sleep(0.5)

    started = time.monotonic()
    bucket.consume(int(rate * (BURST_S + 0.2)))
    elapsed_s = time.monotonic() - started

    assert elapsed_s >= 0.1
    assert elapsed_s < 0.8


def test_set_rate_raises_limit() -> None:
    bucket = TokenBucket(1000)
    bucket.set_rate(1_000_000)

    elapsed_s = _consume_in_chunks(bucket, 20_000, 1000)

    assert elapsed_s < 0.3
    assert bucket.rate == 1_000_000


def test_set_rate_none_removes_limit() -> None:
    bucket = TokenBucket(1000)
    bucket.set_rate(None)

    elapsed_s = _consume_in_chunks(bucket, 10**9, 10**7)

    assert elapsed_s < 0.1
    assert bucket.rate is None


def test_set_rate_charges_debt_at_new_rate() -> None:
    # 1000 bytes at 100 bytes per second leave a 10 s debt, which the new
    # rate waits for as 1000 bytes: 10 ms.
    bucket = TokenBucket(100)
    cancelled = threading.Event()
    cancelled.set()
    bucket.consume(1000, cancelled)
    bucket.set_rate(100_000)

    started = time.monotonic()
    bucket.consume(1000)
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 0.3


def test_set_rate_cut_keeps_wait_of_debt() -> None:
    # 20,000 bytes at 100,000 bytes per second leave a 0.2 s debt, which a
    # cut to 1,000 keeps as 0.2 s, not 20 s.
    bucket = TokenBucket(100_000)
    cancelled = threading.Event()
    cancelled.set()
    bucket.consume(20_000, cancelled)
    bucket.set_rate(1_000)

    started = time.monotonic()
    bucket.consume(1)
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 2.0


def test_set_rate_limits_unlimited_bucket() -> None:
    bucket = TokenBucket(None)
    bucket.set_rate(20_000)

    elapsed_s = _consume_in_chunks(bucket, 4000, 500)

    assert elapsed_s >= 0.1
    assert elapsed_s < 0.8


def test_read_cost_same_rate_is_whole() -> None:
    assert TokenBucket(1000.0).read_cost(500, 1000.0) == 500


def test_read_cost_after_cut_keeps_seconds() -> None:
    # Read at 1,000 bytes/s, charged after a cut to 250: a quarter.
    assert TokenBucket(250.0).read_cost(400, 1000.0) == 100


def test_read_cost_read_without_limit_is_free() -> None:
    assert TokenBucket(250.0).read_cost(400, None) == 0


def test_read_cost_after_raise_is_whole() -> None:
    assert TokenBucket(1000.0).read_cost(400, 250.0) == 400


def test_read_cost_unlimited_bucket_is_whole() -> None:
    assert TokenBucket(None).read_cost(400, 250.0) == 400


def test_consume_set_cancel_returns_promptly() -> None:
    # Without the cancel, 10000 bytes at 100 bytes per second wait 100 s.
    bucket = TokenBucket(100)
    cancelled = threading.Event()
    cancelled.set()

    started = time.monotonic()
    bucket.consume(10_000, cancelled)
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 0.1


def test_consume_cancel_while_waiting_returns() -> None:
    bucket = TokenBucket(100)
    cancelled = threading.Event()
    consumer = threading.Thread(target=bucket.consume, args=(10_000, cancelled))

    started = time.monotonic()
    consumer.start()
    time.sleep(0.05)
    cancelled.set()
    consumer.join(timeout=2.0)
    elapsed_s = time.monotonic() - started

    assert not consumer.is_alive()
    assert elapsed_s < 0.5


def test_token_bucket_shared_by_threads() -> None:
    # Two fragment threads share one bucket, so together they keep to its rate.
    bucket = TokenBucket(20_000)
    threads = [
        threading.Thread(target=_consume_in_chunks, args=(bucket, 3000, 500))
        for _ in range(2)
    ]

    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5.0)
    elapsed_s = time.monotonic() - started

    assert elapsed_s >= 0.2
    assert elapsed_s < 1.0


def _pool(rate: float, count: int, **kwargs: float) -> list[TokenBucket]:
    """Return ``count`` buckets at ``rate`` each, lending through one store."""
    spare = SpareTokens()
    spare.set_rate(rate * count)
    return [TokenBucket(rate, spare=spare, **kwargs) for _ in range(count)]


def _consume_together(buckets: list[TokenBucket], total: int) -> float:
    """Read ``total`` bytes through each bucket at once; return the seconds."""
    threads = [
        threading.Thread(target=_consume_in_chunks, args=(bucket, total, 500))
        for bucket in buckets
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5.0)
    return time.monotonic() - started


def test_spare_tokens_lent_to_busy_download() -> None:
    # The idle bucket's 10000 bytes/s go to the busy one: 8000 bytes take
    # about 0.4 s at 20000 bytes/s, not 0.8 s at its own rate.
    busy, _idle = _pool(10_000, 2)

    elapsed_s = _consume_in_chunks(busy, 8000, 500)

    assert elapsed_s >= 0.25
    assert elapsed_s < 0.65


def test_spare_tokens_keep_pool_when_all_busy() -> None:
    # Two busy buckets at 10000 bytes/s each: 9000 bytes each take about
    # 0.9 s, as without lending.
    elapsed_s = _consume_together(_pool(10_000, 2), 9000)

    assert elapsed_s >= 0.7
    assert elapsed_s < 1.5


def test_spare_tokens_borrowing_stops_at_ceiling() -> None:
    # The ceiling of 12500 bytes/s bounds the busy one: 7500 bytes take
    # about 0.6 s, not 0.375 s at the whole pool.
    busy, _idle = _pool(10_000, 2, ceiling=12_500)

    elapsed_s = _consume_in_chunks(busy, 7500, 500)

    assert elapsed_s >= 0.5
    assert elapsed_s < 0.9


def test_spare_tokens_without_rate_lend_nothing() -> None:
    busy, _idle = _pool(10_000, 2)
    assert busy.spare is not None
    busy.spare.set_rate(None)

    elapsed_s = _consume_in_chunks(busy, 6000, 500)

    assert elapsed_s >= 0.45


def test_spare_tokens_not_borrowed_while_borrowing_off() -> None:
    busy, _idle = _pool(10_000, 2)
    busy.borrowing = False

    elapsed_s = _consume_in_chunks(busy, 6000, 500)

    assert elapsed_s >= 0.45


def test_spare_tokens_debt_is_bounded() -> None:
    # A burst far beyond the pool leaves a debt of BURST_S and SPARE_BURST_S,
    # 0.35 s of the pool: paid back first, then written off.
    spare = SpareTokens()
    spare.set_rate(10_000)
    spare.charge(10**9)

    time.sleep(0.2)
    paying_back = not spare.has_tokens()
    time.sleep(0.3)

    assert paying_back
    assert spare.has_tokens()


def test_forfeit_drops_tokens_of_wait() -> None:
    bucket = TokenBucket(10_000)
    time.sleep(BURST_S + 0.05)

    bucket.forfeit(1.0)

    # Kept, the burst would cover these 500 bytes, which accrue over 50 ms.
    assert not bucket.charge(500)


def test_forfeit_keeps_tokens_from_before_wait() -> None:
    # A full burst of 2500 bytes, of which the last 0.1 s are dropped.
    bucket = TokenBucket(10_000)
    time.sleep(BURST_S + 0.05)

    bucket.forfeit(0.1)

    assert bucket.charge(1000)


def test_forfeit_keeps_debt() -> None:
    # 5000 bytes owed take 0.5 s to pay back, whatever the wait.
    bucket = TokenBucket(10_000)
    bucket.charge(5000)

    bucket.forfeit(1.0)
    time.sleep(0.1)

    assert not bucket.charge(0)


def test_forfeit_without_limit_changes_nothing() -> None:
    bucket = TokenBucket(None)

    bucket.forfeit(1.0)

    assert bucket.charge(10**9)


def test_keep_at_most_drops_tokens_beyond() -> None:
    # A full burst of 2500 bytes, of which 500 are kept.
    bucket = TokenBucket(10_000)
    time.sleep(BURST_S + 0.05)

    bucket.keep_at_most(0.05)

    assert not bucket.charge(1000)


def test_keep_at_most_keeps_tokens_below() -> None:
    bucket = TokenBucket(10_000)
    time.sleep(0.1)

    bucket.keep_at_most(BURST_S)

    assert bucket.charge(500)


def test_keep_at_most_keeps_debt() -> None:
    bucket = TokenBucket(10_000)
    bucket.charge(5000)

    bucket.keep_at_most(0.05)
    time.sleep(0.1)

    assert not bucket.charge(0)


def test_forfeit_drops_spare_store() -> None:
    busy, _idle = _pool(10_000, 2)
    assert busy.spare is not None
    time.sleep(0.15)
    stored = busy.spare.has_tokens()

    busy.forfeit(1.0)
    # Kept, the store's 2000 bytes would cover these, which accrue over 50 ms.
    busy.spare.charge(1000)

    assert stored
    assert not busy.spare.has_tokens()


def test_spare_tokens_forfeit_keeps_debt() -> None:
    # 5000 bytes owed by the pool take 0.5 s at 10000 bytes/s.
    spare = SpareTokens()
    spare.set_rate(10_000)
    spare.charge(5000)

    spare.forfeit()
    time.sleep(0.1)

    assert not spare.has_tokens()


def test_spare_tokens_shared_with_child_process() -> None:
    # A download process shares the worker's store, not a copy of it.
    spare = SpareTokens()
    spare.set_rate(1000)
    child = multiprocessing.get_context("forkserver").Process(
        target=spare.set_rate, args=(2500,)
    )

    child.start()
    child.join(timeout=30)

    assert child.exitcode == 0
    assert spare.rate == 2500


def test_fair_shares_equal_without_demands() -> None:
    assert fair_shares(300.0, [None, None, None]) == [100.0, 100.0, 100.0]


def test_fair_shares_slow_download_leaves_rest_to_others() -> None:
    assert fair_shares(300.0, [30.0, None, None]) == [30.0, 135.0, 135.0]


def test_fair_shares_demand_above_level_is_capped() -> None:
    assert fair_shares(300.0, [30.0, 200.0, None]) == [30.0, 135.0, 135.0]


def test_fair_shares_spread_leftover_when_all_met() -> None:
    assert fair_shares(300.0, [30.0, 60.0, 90.0]) == [70.0, 100.0, 130.0]


def test_fair_shares_add_up_to_total() -> None:
    shares = fair_shares(1000.0, [1.0, 999.0, None, 5.0])
    assert sum(shares) == pytest.approx(1000.0)


def test_fair_shares_no_downloads() -> None:
    assert fair_shares(300.0, []) == []


def test_demand_of_saturated_download_unbounded() -> None:
    assert demand_of(100_000.0, 90_000.0) is None


def test_demand_of_unknown_rate_unbounded() -> None:
    assert demand_of(100.0, None) is None


def test_demand_of_unlimited_download_unbounded() -> None:
    assert demand_of(None, 50.0) is None


def test_demand_of_slow_source_keeps_headroom() -> None:
    assert demand_of(100_000.0, 40_000.0) == pytest.approx(60_000.0)


def test_demand_of_paused_source_keeps_floor() -> None:
    assert demand_of(100_000.0, 0.0) == MIN_DEMAND


def test_lent_demand_counts_margin_over_received() -> None:
    # A demand of 60K stands for 40K received.
    assert lent_demand(60_000.0, None) == pytest.approx(40_000.0 * LENT_MARGIN)


def test_lent_demand_follows_faster_last_second() -> None:
    assert lent_demand(60_000.0, 50_000.0) == pytest.approx(50_000.0 * LENT_MARGIN)


def test_lent_demand_just_held_counts_last_second() -> None:
    # Found held back after a drop: its demand still includes the seconds before.
    assert lent_demand(150_000.0, 17_000.0) == pytest.approx(17_000.0 * LENT_MARGIN)


def test_lent_demand_counts_rate_since_held() -> None:
    # The demand still includes the faster seconds before the source dropped.
    assert lent_demand(150_000.0, 16_000.0, 17_000.0) == pytest.approx(
        17_000.0 * LENT_MARGIN
    )


def test_lent_demand_held_rate_over_last_second() -> None:
    # A source that sends in bursts shows one or two of them in a second.
    assert lent_demand(150_000.0, 30_000.0, 17_000.0) == pytest.approx(
        17_000.0 * LENT_MARGIN
    )


def test_lent_demand_never_above_demand() -> None:
    assert lent_demand(60_000.0, 90_000.0) == 60_000.0


def test_lent_demand_saturated_download_unbounded() -> None:
    assert lent_demand(None, 10_000.0) is None


def test_lent_demand_paused_source_keeps_floor() -> None:
    assert lent_demand(MIN_DEMAND, 0.0) == MIN_DEMAND

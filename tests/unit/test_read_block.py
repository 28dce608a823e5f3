"""The read block of a download, sized to the rate limit in force."""

from __future__ import annotations

from collections.abc import Callable

from buckets import RecordingBucket
from fetching import while_fetching
from vodq.bandwidth import TokenBucket
from vodq.download.ytdlp import (
    MIN_READ_BLOCK_BYTES,
    READ_BLOCK_BYTES,
    _MeteredRead,
    _Watch,
    read_block_for,
)


def test_read_block_unlimited_is_largest() -> None:
    assert read_block_for(None) == READ_BLOCK_BYTES


def test_read_block_2m_is_a_fortieth_second() -> None:
    assert read_block_for(2 * 1024 * 1024) == 49_152


def test_read_block_slow_rate_has_a_floor() -> None:
    assert read_block_for(1000) == MIN_READ_BLOCK_BYTES


def test_read_block_fast_rate_has_a_ceiling() -> None:
    assert read_block_for(10 * 1024 * 1024) == READ_BLOCK_BYTES


def test_read_block_is_whole_pages() -> None:
    assert read_block_for(2 * 1024 * 1024) % 4096 == 0


def _metered(read: Callable[[int | None], bytes], bucket: TokenBucket) -> _MeteredRead:
    """A metered read over ``read``, with no socket, so nothing queued."""
    return _MeteredRead(read, None, _Watch(track_validators=False, bucket=bucket))


def test_metered_read_follows_current_rate() -> None:
    requested: list[int | None] = []

    def read(amt: int | None = None) -> bytes:
        requested.append(amt)
        return b""

    bucket = TokenBucket(None)
    metered = _metered(read, bucket)
    metered(131_072)
    bucket.set_rate(1000)
    metered(131_072)
    assert requested == [READ_BLOCK_BYTES, MIN_READ_BLOCK_BYTES]


def test_metered_read_keeps_whole_read() -> None:
    requested: list[int | None] = []

    def read(amt: int | None = None) -> bytes:
        requested.append(amt)
        return b""

    _metered(read, TokenBucket(1000))()
    assert requested == [None]


def test_metered_read_charges_bytes_read() -> None:
    bucket = RecordingBucket(1000)
    metered = _metered(lambda amt=None: b"x" * 1000, bucket)
    metered(4096)
    metered(4096)
    assert bucket.charges == [1000, 1000]


def test_metered_read_empty_read_free() -> None:
    bucket = RecordingBucket(1000)
    _metered(lambda amt=None: b"", bucket)(4096)
    assert bucket.charges == []


def fragment_blocks(rate: float, indices: list[int]) -> dict[int, int]:
    """Return the read block of each fragment of ``indices``, fetched at once
    by a download limited to ``rate`` bytes/s."""
    watch = _Watch(track_validators=False, bucket=TokenBucket(rate))
    watch.fragmented = True
    return while_fetching(watch.slots, indices, watch.read_block)


def test_read_block_of_oldest_fragment_is_larger() -> None:
    blocks = fragment_blocks(512_000, [0, 1, 2, 3])
    assert blocks[0] > read_block_for(512_000)


def test_read_block_of_newest_fragment_is_smaller() -> None:
    blocks = fragment_blocks(512_000, [0, 1, 2, 3])
    assert blocks[3] < read_block_for(512_000)


def test_read_block_of_fragment_has_ceiling() -> None:
    blocks = fragment_blocks(100 * 1024 * 1024, [0, 1, 2, 3])
    assert blocks[0] == READ_BLOCK_BYTES

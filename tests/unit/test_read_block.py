"""The read block that a download starts with, sized to its rate limit."""

from __future__ import annotations

from vodq.download.ytdlp import (
    MIN_READ_BLOCK_BYTES,
    READ_BLOCK_BYTES,
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

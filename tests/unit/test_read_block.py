"""The read block of a download, sized to the rate limit in force."""

from __future__ import annotations

from vodq.download.ytdlp import (
    MIN_READ_BLOCK_BYTES,
    READ_BLOCK_BYTES,
    _bounded_read,
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


def test_bounded_read_follows_current_rate() -> None:
    requested: list[int | None] = []

    def read(amt: int | None = None) -> bytes:
        requested.append(amt)
        return b""

    block = {"size": 131_072}
    _bounded_read(read, lambda: block["size"], 131_072)
    block["size"] = 4096
    _bounded_read(read, lambda: block["size"], 131_072)
    assert requested == [131_072, 4096]


def test_bounded_read_keeps_whole_read() -> None:
    requested: list[int | None] = []

    def read(amt: int | None = None) -> bytes:
        requested.append(amt)
        return b""

    _bounded_read(read, lambda: 4096)
    assert requested == [None]

"""Tests for the duration and rate grammar in vodq.units."""

from __future__ import annotations

import pytest

from vodq.units import format_duration, format_rate, parse_duration, parse_rate

KIB = 1024
MIB = 1024**2
GIB = 1024**3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("2s", 2.0, id="seconds"),
        pytest.param("600s", 600.0, id="many-seconds"),
        pytest.param("5m", 300.0, id="minutes"),
        pytest.param("2h", 7200.0, id="hours"),
        pytest.param("1d", 86400.0, id="days"),
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("1h30m", 5400.0, id="hours-and-minutes"),
        pytest.param("1m30s250ms", 90.25, id="three-parts"),
        pytest.param("1.5h", 5400.0, id="fractional-part"),
        pytest.param("1.5", 1.5, id="bare-fraction"),
        pytest.param("600", 600.0, id="bare-integer"),
        pytest.param("0", 0.0, id="bare-zero"),
        pytest.param("0s", 0.0, id="zero-seconds"),
        pytest.param("5M", 300.0, id="uppercase-unit"),
        pytest.param("  5m\n", 300.0, id="surrounding-whitespace"),
    ],
)
def test_parse_duration_accepts_grammar(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("-5s", id="negative"),
        pytest.param("-5", id="negative-bare"),
        pytest.param("5x", id="unknown-unit"),
        pytest.param("s", id="unit-without-number"),
        pytest.param("1h 30m", id="space-between-parts"),
        pytest.param("5 s", id="space-before-unit"),
        pytest.param("10 minutes", id="english-words"),
        pytest.param("5min", id="long-unit-name"),
        pytest.param("1e3", id="exponent"),
        pytest.param(".5s", id="no-leading-digit"),
        pytest.param("5.s", id="no-digit-after-point"),
        pytest.param("1h30", id="trailing-bare-number"),
        pytest.param("inf", id="infinity"),
        pytest.param("nan", id="not-a-number"),
    ],
)
def test_parse_duration_rejects_text(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_parse_duration_error_names_value() -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration("5x")
    assert str(caught.value) == "'5x' is not a duration"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(2.0, "2s", id="whole-float"),
        pytest.param(600, "600s", id="integer"),
        pytest.param(0.0, "0s", id="zero"),
        pytest.param(0.5, "0.5s", id="half"),
        pytest.param(0.25, "0.25s", id="quarter"),
        pytest.param(5400.25, "5400.25s", id="hours-with-fraction"),
        pytest.param(172800.5, "172800.5s", id="seven-digits"),
        pytest.param(1036800.5, "1036800.5s", id="above-a-million"),
        pytest.param(0.00001, "0.00001s", id="tiny-fraction"),
    ],
)
def test_format_duration_writes_seconds(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "seconds",
    [0.0, 0.001, 0.1, 1.5, 2.0, 90.25, 600.0001, 172800.5, 1036800.5, 1e-7],
    ids=str,
)
def test_format_duration_parses_back_unchanged(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        pytest.param("1000", 1000, id="bare-bytes"),
        pytest.param("500K", 500 * KIB, id="kibibytes"),
        pytest.param("500k", 500 * KIB, id="lowercase-k"),
        pytest.param("1.5M", 1572864, id="fractional-mebibytes"),
        pytest.param("1.5m", 1572864, id="lowercase-m"),
        pytest.param("2G", 2 * GIB, id="gibibytes"),
        pytest.param("2GB", 2 * GIB, id="gibibytes-with-b"),
        pytest.param("1.5MB", 1572864, id="mebibytes-with-b"),
        pytest.param("500KB", 500 * KIB, id="kibibytes-with-b"),
        pytest.param("100B", 100, id="bytes-with-b"),
        pytest.param("0", 0, id="zero"),
        pytest.param(" 1M ", MIB, id="surrounding-whitespace"),
    ],
)
def test_parse_rate_binary_multiples(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


def test_parse_rate_returns_int() -> None:
    assert isinstance(parse_rate("1.5M"), int)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("fast", id="word"),
        pytest.param("1.5 M", id="space-before-multiple"),
        pytest.param("-1M", id="negative"),
        pytest.param("M", id="multiple-without-number"),
        pytest.param("1T", id="unknown-multiple"),
        pytest.param("1e6", id="exponent"),
        pytest.param("1MiB", id="iec-suffix"),
        pytest.param("1.5.0M", id="two-points"),
        pytest.param("9" * 400, id="overflows-float"),
    ],
)
def test_parse_rate_rejects_text(text: str) -> None:
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        pytest.param(1572864, "1.5M", id="fractional-mebibytes"),
        pytest.param(2000000, "2000000", id="decimal-million-stays-bytes"),
        pytest.param(2 * GIB, "2G", id="gibibytes"),
        pytest.param(500 * KIB, "500K", id="kibibytes"),
        pytest.param(1536, "1.5K", id="fractional-kibibytes"),
        pytest.param(1000, "1000", id="below-one-kibibyte"),
        pytest.param(10240256, "10000.25K", id="seven-significant-digits"),
    ],
)
def test_format_rate_largest_exact_multiple(rate: int, text: str) -> None:
    assert format_rate(rate) == text


@pytest.mark.parametrize(
    "rate",
    [1, 1000, 1024, 1536, 512000, 1572864, 2000000, 10240256, 2 * GIB, 3 * GIB + 1],
    ids=str,
)
def test_format_rate_parses_back_unchanged(rate: int) -> None:
    assert parse_rate(format_rate(rate)) == rate

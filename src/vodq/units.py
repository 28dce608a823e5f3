"""The one grammar for durations and rates, used by configuration and the API.

Durations: a bare number of seconds (``600``, ``1.5``) or one or more
``<number><unit>`` parts with units ``ms``, ``s``, ``m``, ``h`` and ``d``
(``2s``, ``5m``, ``1h30m``). Rates: a number of bytes per second with an
optional binary multiple ``K``, ``M`` or ``G`` and an optional trailing ``B``
(``500K``, ``1.5M``, ``2GB``), as yt-dlp reads ``--limit-rate``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

# re.ASCII: without it \d also matches the digits of other scripts, such as
# full-width ones.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BARE_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)
_RATE = re.compile(r"(\d+(?:\.\d+)?)([KMG]?)B?", re.IGNORECASE | re.ASCII)
_RATE_MULTIPLES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_duration(text: str) -> float:
    """Parse a duration such as ``2s``, ``5m``, ``1h30m`` or ``600`` into seconds.

    Raises ValueError when the text is not in the grammar.
    """
    value = text.strip().lower()
    if _BARE_NUMBER.fullmatch(value):
        return float(value)

    position = 0
    total_s = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        total_s += float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]
        position = match.end()
    if position == 0 or position != len(value):
        raise ValueError(f"{text!r} is not a duration")
    return total_s


def format_duration(seconds: float) -> str:
    """Write seconds the way the API shows durations: ``2s``, ``600s``, ``0.5s``."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    # The shortest repr that reads back as the same float, written without an
    # exponent, because the grammar has none and ``:g`` keeps only 6 digits.
    return f"{Decimal(repr(seconds)):f}s"


def parse_rate(text: str) -> int:
    """Parse a rate such as ``500K``, ``1.5M`` or ``2G`` into whole bytes per second.

    Raises ValueError when the text is not in the grammar.
    """
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a rate")

    multiple = _RATE_MULTIPLES[match.group(2).upper()]
    rate = float(match.group(1)) * multiple
    if not math.isfinite(rate):
        raise ValueError(f"{text!r} is not a rate")
    return round(rate)


def format_rate(bytes_per_second: int) -> str:
    """Write a rate with the largest binary multiple that keeps it exact to 0.01."""
    for suffix, multiple in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if bytes_per_second >= multiple:
            scaled = bytes_per_second / multiple
            if round(scaled, 2) * multiple == bytes_per_second:
                # Two decimals, not ``:g``, which keeps only 6 significant digits.
                text = f"{scaled:.2f}".rstrip("0").rstrip(".")
                return f"{text}{suffix}"
    return str(bytes_per_second)

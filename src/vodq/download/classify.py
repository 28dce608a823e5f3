"""One classification of download errors, from yt-dlp's exceptions and messages.

yt-dlp reports every failure as ``yt_dlp.utils.DownloadError`` (yt-dlp
2026.11). Where the HTTP error that caused it can be found depends on when it
happened:

- during extraction (a page or API request): the DownloadError's
  ``exc_info[1]`` is an ExtractorError whose ``cause`` is the HTTPError;
- when the first request of a direct download fails with a 4xx status:
  ``exc_info[1]`` is the HTTPError itself;
- when yt-dlp's retry manager gives up (5xx, timeouts, resets, truncated
  bodies, and every error of an HLS fragment): there is no cause object,
  only a message such as ``"\\r[download] Got error: HTTP Error 429: ..."``.

For the last case the downloader records every HTTP error response it sees
(``HttpErrorSeen``) and passes the last one in, so that a 429 of an HLS
fragment still carries the server's ``Retry-After``. The HTTPError's
``response.headers`` stays readable after the response is closed.

Each class maps to one DownloadFailed whose message says what failed and
what the operator can do, in plain words: yt-dlp's ``ERROR:`` prefix, ANSI
colours, ``\\r[download] Got error:`` and ``(caused by <...>)`` are removed.
"""

from __future__ import annotations

import email.utils
import errno
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from vodq.errors import DownloadFailed

_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NOISE_PREFIXES = ("ERROR:", "[download]", "Got error:")
_CAUSED_BY = re.compile(r"\s*\(caused by .*\)\s*$", re.DOTALL)
# Maximum length, in characters, of the yt-dlp detail copied into a message.
_MAX_DETAIL = 300
# Maximum Retry-After honoured, in seconds. A larger value is capped to it.
MAX_RETRY_AFTER_S = 24 * 3600.0

# Phrases yt-dlp uses for videos that need an account or a subscription.
_AUTH_PHRASES = (
    "subscriber",
    "sign in",
    "log in",
    "login required",
    "members-only",
    "requires authentication",
    "private video",
)
_TIMEOUT_PHRASES = ("timed out", "timeout")
_TRUNCATED_PHRASES = (
    "bytes read",
    # yt-dlp's ContentTooShortError: "Downloaded 300000 bytes, expected ...".
    "bytes, expected",
    "incomplete read",
    "incompleteread",
    "content too short",
    "remote end closed",
)
_TRANSIENT_PHRASES = (
    "connection reset",
    "connection refused",
    "connection aborted",
    "temporary failure",
    "unable to connect",
    "network is unreachable",
    "broken pipe",
    "failed to establish a new connection",
)


# Failures without an HTTP status, recognised by phrases in yt-dlp's message.
# Each rule gives the phrases, the class, whether a retry can help, and the
# message template, where {detail} is yt-dlp's cleaned message and {waited}
# the stall timeout. The first match wins.
_MESSAGE_RULES: tuple[tuple[tuple[str, ...], str, bool, str], ...] = (
    (
        ("unsupported url",),
        "unsupported",
        False,
        "unsupported URL: yt-dlp found no video at this address ({detail}). "
        "Not retried; check the URL and add the VOD again",
    ),
    (
        _AUTH_PHRASES,
        "needs_auth",
        False,
        "the video needs an account or a subscription ({detail}). "
        "Not retried; reprocess the VOD once it is public",
    ),
    (
        _TIMEOUT_PHRASES,
        "transient",
        True,
        "download stalled: the server sent no data{waited} ({detail}). "
        "Retried with backoff, resuming from the partial file; "
        "DOWNLOAD_STALL_TIMEOUT sets how long a silent server is awaited",
    ),
    (
        # yt-dlp's message for a response whose body had no bytes at all.
        ("did not get any data blocks",),
        "transient",
        True,
        "the server sent an empty body ({detail}). Retried with backoff; if "
        "it keeps failing, the file or an HLS segment is empty at the source",
    ),
    (
        _TRUNCATED_PHRASES,
        "transient",
        True,
        "the server closed the connection before the end of the file "
        "({detail}). Retried with backoff, resuming from the partial file",
    ),
    (
        _TRANSIENT_PHRASES,
        "transient",
        True,
        "network error ({detail}). Retried with backoff",
    ),
)


@dataclass(frozen=True)
class HttpErrorSeen:
    """An HTTP error response the downloader saw during an attempt."""

    status: int
    reason: str
    url: str
    headers: Mapping[str, str]


def classify(
    exc: BaseException,
    *,
    seen: HttpErrorSeen | None = None,
    stall_timeout_s: float | None = None,
) -> DownloadFailed:
    """Translate an exception raised while downloading into a DownloadFailed.

    ``seen`` is the last HTTP error response of the attempt, used when the
    exception itself no longer contains it, and ``stall_timeout_s`` is the read
    timeout in force, named in the message of a stalled download.
    """
    detail = clean_message(exc)
    lowered = detail.lower()

    if _is_disk_full(exc) or "no space left on device" in lowered:
        return DownloadFailed(
            f"disk full: could not write the download to DATA_DIR ({detail}). "
            "Free space in DATA_DIR; the partial file is kept and the next "
            "attempt resumes it",
            error_class="disk_full",
            retryable=True,
        )

    response = _http_error(exc, detail, seen)
    if response is not None:
        return _from_status(response, detail)
    waited = f" for {stall_timeout_s:g}s" if stall_timeout_s else ""
    for phrases, error_class, retryable, template in _MESSAGE_RULES:
        if any(phrase in lowered for phrase in phrases):
            return DownloadFailed(
                template.format(detail=detail, waited=waited),
                error_class=error_class,
                retryable=retryable,
            )
    return DownloadFailed(
        f"download failed ({detail}). Retried after PROCESSING_RETRY_COOLDOWN; "
        "if it keeps failing, the service log has yt-dlp's messages for this VOD",
        error_class="error",
        retryable=True,
    )


def _from_status(response: _Status, detail: str) -> DownloadFailed:
    status = response.status
    answered = f"the server answered HTTP {status}"
    if response.reason:
        answered += f" {response.reason}"
    if response.host:
        answered += f" from {response.host}"
    retry_after = response.retry_after_s
    if status in (404, 410):
        return DownloadFailed(
            f"{answered}: the video is gone or the URL is wrong ({detail}). "
            "Not retried; check the URL, and reprocess the VOD if it comes back",
            error_class="gone",
            retryable=False,
        )
    if status in (401, 403):
        return DownloadFailed(
            f"{answered}: the video needs a login, a subscription or another "
            f"region ({detail}). Not retried; reprocess the VOD once it can be "
            "fetched without an account",
            error_class="needs_auth",
            retryable=False,
        )
    if status == 429:
        if retry_after is None:
            wait = "sent no Retry-After"
        elif retry_after >= MAX_RETRY_AFTER_S:
            wait = (
                f"asked to wait at least {MAX_RETRY_AFTER_S:g}s, the longest "
                "wait vodq honours"
            )
        else:
            wait = f"asked to wait {retry_after:g}s"
        return DownloadFailed(
            f"rate limited: {answered} and {wait} ({detail}). Retried after "
            "the server's wait or the backoff, whichever is longer",
            error_class="rate_limited",
            retryable=True,
            retry_after_s=retry_after,
        )
    if status == 416:
        return DownloadFailed(
            f"{answered}: it refused to resume the partial file ({detail}). "
            "Retried from the start",
            error_class="range_rejected",
            retryable=True,
        )
    if status >= 500 or status == 408:
        return DownloadFailed(
            f"{answered} ({detail}). Retried with backoff",
            error_class="transient",
            retryable=True,
            retry_after_s=retry_after,
        )
    return DownloadFailed(
        f"{answered} ({detail}). Not retried; check the URL",
        error_class="http_error",
        retryable=False,
    )


def clean_message(exc: BaseException) -> str:
    """Return yt-dlp's message of ``exc`` without its prefixes, colours and causes."""
    text = _ANSI.sub("", str(exc)).replace("\r", " ").strip()
    changed = True
    while changed:
        changed = False
        for prefix in _NOISE_PREFIXES:
            if text.startswith(prefix):
                text = text.removeprefix(prefix).strip()
                changed = True
    text = _CAUSED_BY.sub("", text).strip()
    text = text.removesuffix(".").strip()
    if not text:
        return type(exc).__name__
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 3].rstrip() + "..."
    return text


@dataclass(frozen=True)
class _Status:
    status: int
    reason: str
    host: str
    retry_after_s: float | None


def _http_error(
    exc: BaseException, detail: str, seen: HttpErrorSeen | None
) -> _Status | None:
    for candidate in _chain(exc):
        status = getattr(candidate, "status", None)
        if isinstance(status, int) and 100 <= status <= 599:
            response = getattr(candidate, "response", None)
            headers = getattr(response, "headers", None) or {}
            url = str(getattr(response, "url", "") or "")
            reason = str(getattr(candidate, "reason", "") or "")
            return _Status(status, reason, _host(url), retry_after_s(headers))
    match = _HTTP_STATUS.search(detail)
    if match is None:
        return None
    status = int(match.group(1))
    if seen is not None and seen.status == status:
        return _Status(
            status, seen.reason, _host(seen.url), retry_after_s(seen.headers)
        )
    reason = detail[match.end() :].lstrip(": ").split("(")[0].strip()
    return _Status(status, reason, "", None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and what it wraps: exc_info, ``cause``, __cause__, __context__."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending and len(seen) < 20:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        exc_info = getattr(current, "exc_info", None)
        if isinstance(exc_info, tuple) and len(exc_info) > 1:
            pending.append(exc_info[1])
        pending.extend(
            [getattr(current, "cause", None), current.__cause__, current.__context__]
        )


def retry_after_s(
    headers: Mapping[str, str], now: datetime | None = None
) -> float | None:
    """Return the ``Retry-After`` of ``headers`` in seconds, or None without one.

    Accepts both forms of RFC 9110: a number of seconds and an HTTP date.
    A date in the past gives 0; values are capped at MAX_RETRY_AFTER_S.
    """
    raw = _header(headers, "Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    seconds: float | None = None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return str(value)
    lowered = name.lower()
    for key, item in headers.items():
        if str(key).lower() == lowered:
            return str(item)
    return None


def _host(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:
        return ""


def _is_disk_full(exc: BaseException) -> bool:
    return any(
        isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        for cause in _chain(exc)
    )

"""One classification of download errors, from yt-dlp's exceptions and messages.

yt-dlp reports every failure as ``yt_dlp.utils.DownloadError``. Errors during
extraction may carry an HTTP status on their cause; errors at the end of the
download carry only a message (yt-dlp 2026.11), so the message is read too.
"""

from __future__ import annotations

import errno
import re

from vodq.errors import DownloadFailed

_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")

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
_TRANSIENT_PHRASES = (
    "timed out",
    "connection reset",
    "connection refused",
    "connection aborted",
    "remote end closed",
    "incomplete read",
    "incompleteread",
    "bytes read",
    "did not get any data blocks",
    "temporary failure",
    "unable to connect",
    "network is unreachable",
    "broken pipe",
)


def classify(exc: BaseException) -> DownloadFailed:
    """Translate an exception raised while downloading into a DownloadFailed."""
    message = _message(exc)
    lowered = message.lower()

    if _is_disk_full(exc) or "no space left on device" in lowered:
        return DownloadFailed(
            f"disk full: {message}", error_class="disk_full", retryable=True
        )

    status = _http_status(exc, message)
    if status is not None:
        return _from_status(status, message)
    if "unsupported url" in lowered:
        return DownloadFailed(message, error_class="unsupported", retryable=False)
    if any(phrase in lowered for phrase in _AUTH_PHRASES):
        return DownloadFailed(message, error_class="needs_auth", retryable=False)
    if any(phrase in lowered for phrase in _TRANSIENT_PHRASES):
        return DownloadFailed(message, error_class="transient", retryable=True)
    return DownloadFailed(message, error_class="error", retryable=True)


def _from_status(status: int, message: str) -> DownloadFailed:
    if status in (404, 410):
        return DownloadFailed(message, error_class="gone", retryable=False)
    if status in (401, 403):
        return DownloadFailed(message, error_class="needs_auth", retryable=False)
    if status == 429:
        return DownloadFailed(message, error_class="rate_limited", retryable=True)
    if status == 416:
        return DownloadFailed(message, error_class="range_rejected", retryable=True)
    if status >= 500 or status == 408:
        return DownloadFailed(message, error_class="transient", retryable=True)
    return DownloadFailed(message, error_class="http_error", retryable=False)


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # yt-dlp prefixes messages with "ERROR: " and may add ANSI colour codes.
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text.removeprefix("ERROR: ")


def _http_status(exc: BaseException, message: str) -> int | None:
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 5:
        status = _own_status(cause)
        if status is not None:
            return status
        inner = getattr(cause, "exc_info", None)
        if (
            isinstance(inner, tuple)
            and len(inner) > 1
            and isinstance(inner[1], BaseException)
        ):
            status = _own_status(inner[1])
            if status is not None:
                return status
        cause = cause.__cause__ or cause.__context__
        seen += 1
    match = _HTTP_STATUS.search(message)
    return int(match.group(1)) if match else None


def _own_status(exc: BaseException) -> int | None:
    # ExtractorError keeps the HTTPError it wraps on ``cause``, and its message
    # shows it only as "(caused by <HTTPError 403: Forbidden>)" (yt-dlp 2026.11).
    for candidate in (exc, getattr(exc, "cause", None)):
        status = getattr(candidate, "status", None)
        if isinstance(status, int) and 100 <= status <= 599:
            return status
    return None


def _is_disk_full(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 5:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False

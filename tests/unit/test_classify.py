"""Tests for the classification of yt-dlp download errors.

Every error is an instance of a real yt-dlp exception class, with a message
in the form that yt-dlp 2026.11 writes.
"""

from __future__ import annotations

import errno
import io
import sys
from datetime import UTC, datetime

import pytest
from yt_dlp.networking import Response
from yt_dlp.networking.exceptions import HTTPError
from yt_dlp.utils import DownloadError, ExtractorError

from vodq.download.classify import (
    MAX_RETRY_AFTER_S,
    HttpErrorSeen,
    classify,
    retry_after_s,
)
from vodq.errors import DownloadFailed


def _http_error(status: int, reason: str) -> HTTPError:
    response = Response(
        io.BytesIO(b""), "https://example.invalid/v", {}, status, reason
    )
    return HTTPError(response)


@pytest.mark.parametrize(
    ("message", "error_class", "retryable"),
    [
        pytest.param(
            "ERROR: [generic] Unable to download webpage: HTTP Error 404: Not Found",
            "gone",
            False,
            id="404-webpage",
        ),
        pytest.param(
            "ERROR: unable to download video data: HTTP Error 410: Gone",
            "gone",
            False,
            id="410-video-data",
        ),
        pytest.param(
            "ERROR: unable to download video data: HTTP Error 500: "
            "Internal Server Error",
            "transient",
            True,
            id="500-video-data",
        ),
        pytest.param(
            "ERROR: unable to download video data: HTTP Error 503: Service Unavailable",
            "transient",
            True,
            id="503-video-data",
        ),
        pytest.param(
            "ERROR: unable to download video data: HTTP Error 408: Request Timeout",
            "transient",
            True,
            id="408-request-timeout",
        ),
        pytest.param(
            "ERROR: unable to download video data: HTTP Error 403: Forbidden",
            "needs_auth",
            False,
            id="403-forbidden",
        ),
        pytest.param(
            "ERROR: [twitch:vod] 123: Unable to download JSON metadata: "
            "HTTP Error 401: Unauthorized",
            "needs_auth",
            False,
            id="401-unauthorized",
        ),
        pytest.param(
            "ERROR: unable to download video data: HTTP Error 429: Too Many Requests",
            "rate_limited",
            True,
            id="429-too-many-requests",
        ),
        pytest.param(
            "ERROR: unable to download video data: HTTP Error 416: "
            "Requested range not satisfiable",
            "range_rejected",
            True,
            id="416-range-not-satisfiable",
        ),
        pytest.param(
            "ERROR: unable to download video data: HTTP Error 400: Bad Request",
            "http_error",
            False,
            id="400-bad-request",
        ),
        pytest.param(
            "ERROR: [generic] Unable to download webpage: "
            "[Errno 104] Connection reset by peer",
            "transient",
            True,
            id="connection-reset",
        ),
        pytest.param(
            "ERROR: [generic] Unable to download webpage: The read operation timed out",
            "transient",
            True,
            id="read-timed-out",
        ),
        pytest.param(
            "ERROR: [generic] Unable to download webpage: "
            "[Errno 111] Connection refused",
            "transient",
            True,
            id="connection-refused",
        ),
        pytest.param(
            "ERROR: 4096 bytes read, 1000 more expected",
            "transient",
            True,
            id="incomplete-read",
        ),
        pytest.param(
            "ERROR: Downloaded 300000 bytes, expected 1048576 bytes",
            "transient",
            True,
            id="content-too-short",
        ),
        pytest.param(
            "ERROR: Unsupported URL: https://example.invalid/x",
            "unsupported",
            False,
            id="unsupported-url",
        ),
        pytest.param(
            "ERROR: [twitch:vod] 123: This video is only available to subscribers",
            "needs_auth",
            False,
            id="subscribers-only",
        ),
        pytest.param(
            "ERROR: unable to write data: [Errno 28] No space left on device",
            "disk_full",
            True,
            id="disk-full-message",
        ),
        pytest.param(
            "ERROR: Postprocessing: Conversion failed!",
            "error",
            True,
            id="unknown-failure",
        ),
    ],
)
def test_classify_download_error_messages(
    message: str, error_class: str, retryable: bool
) -> None:
    failure = classify(DownloadError(message))

    assert failure.error_class == error_class
    assert failure.retryable is retryable


def test_classify_returns_download_failed() -> None:
    failure = classify(
        DownloadError("ERROR: Unsupported URL: https://example.invalid/x")
    )

    assert isinstance(failure, DownloadFailed)


def test_classify_strips_error_prefix() -> None:
    failure = classify(
        DownloadError("ERROR: Unsupported URL: https://example.invalid/x")
    )

    assert "ERROR:" not in str(failure)


def test_classify_unsupported_message_names_url() -> None:
    failure = classify(
        DownloadError("ERROR: Unsupported URL: https://example.invalid/x")
    )

    assert str(failure).startswith("unsupported URL: ")
    assert "https://example.invalid/x" in str(failure)


def test_classify_strips_ansi_colours() -> None:
    # yt-dlp colours the prefix red when stderr is a terminal.
    coloured = "\x1b[0;31mERROR:\x1b[0m unable to download video data: HTTP Error 404"

    failure = classify(DownloadError(coloured))

    assert "\x1b" not in str(failure)
    assert "ERROR:" not in str(failure)
    assert failure.error_class == "gone"


def test_classify_strips_retry_manager_prefix() -> None:
    # How yt-dlp words the end of its retries (yt-dlp 2026.11).
    failure = classify(
        DownloadError(
            "ERROR: \r[download] Got error: HTTP Error 500: Internal Server Error"
        )
    )

    assert str(failure) == (
        "the server answered HTTP 500 Internal Server Error "
        "(HTTP Error 500: Internal Server Error). Retried with backoff"
    )


def test_classify_strips_caused_by_suffix() -> None:
    failure = classify(
        DownloadError(
            "ERROR: [generic] v: Unable to download webpage: HTTP Error 404: Not "
            "Found (caused by <HTTPError 404: Not Found>)"
        )
    )

    assert "caused by" not in str(failure)


def test_classify_message_says_what_to_do_for_gone() -> None:
    failure = classify(
        DownloadError("ERROR: unable to download video data: HTTP Error 404: Not Found")
    )

    assert str(failure) == (
        "the server answered HTTP 404 Not Found: the video is gone or the URL is "
        "wrong (unable to download video data: HTTP Error 404: Not Found). Not "
        "retried; check the URL, and reprocess the VOD if it comes back"
    )


def test_classify_long_detail_shortened() -> None:
    failure = classify(DownloadError("ERROR: " + "x" * 5000))

    assert len(str(failure)) < 500


def test_classify_empty_message_uses_type_name() -> None:
    failure = classify(DownloadError(""))

    assert "(DownloadError)" in str(failure)
    assert failure.error_class == "error"


def test_classify_timeout_says_stalled() -> None:
    failure = classify(
        DownloadError(
            "ERROR: \r[download] Got error: HTTPConnectionPool(host='127.0.0.1', "
            "port=1): Read timed out."
        ),
        stall_timeout_s=2.0,
    )

    assert str(failure).startswith("download stalled: the server sent no data for 2s")
    assert failure.error_class == "transient"


def test_classify_empty_body_message() -> None:
    failure = classify(DownloadError("ERROR: Did not get any data blocks"))

    assert failure.error_class == "transient"
    assert str(failure).startswith("the server sent an empty body")


def test_classify_truncated_body_transient() -> None:
    failure = classify(
        DownloadError(
            "ERROR: \r[download] Got error: 100000 bytes read, 5 more expected"
        )
    )

    assert failure.error_class == "transient"
    assert str(failure).startswith("the server closed the connection before the end")


def test_classify_reset_transient() -> None:
    failure = classify(
        DownloadError(
            "ERROR: \r[download] Got error: ('Connection aborted.', "
            "ConnectionResetError(104, 'Connection reset by peer'))"
        )
    )

    assert failure.error_class == "transient"
    assert str(failure).startswith("network error")


def _http_error_with(status: int, reason: str, headers: dict[str, str]) -> HTTPError:
    response = Response(
        io.BytesIO(b""), "https://example.invalid/v", headers, status, reason
    )
    return HTTPError(response)


def test_classify_429_retry_after_from_exc_info() -> None:
    # A 429 on the first request of a direct download: YoutubeDL.process_info
    # reports it from inside its except block, so exc_info holds the HTTPError.
    error = _http_error_with(429, "Too Many Requests", {"Retry-After": "7"})
    try:
        try:
            raise error
        except HTTPError as exc:
            raise DownloadError(
                f"ERROR: unable to download video data: {exc}", sys.exc_info()
            ) from None
    except DownloadError as exc:
        failure = classify(exc)

    assert failure.error_class == "rate_limited"
    assert failure.retry_after_s == 7.0


def test_classify_429_retry_after_from_extractor_cause() -> None:
    error = ExtractorError(
        "Unable to download webpage",
        cause=_http_error_with(429, "Too Many Requests", {"retry-after": "8"}),
        expected=True,
    )
    try:
        try:
            raise error
        except ExtractorError as exc:
            raise DownloadError(f"ERROR: {exc}", sys.exc_info()) from None
    except DownloadError as exc:
        failure = classify(exc)

    assert failure.retry_after_s == 8.0


def test_classify_429_retry_after_from_seen_response() -> None:
    # An HLS fragment's 429 leaves only a message; the downloader saw the response.
    seen = HttpErrorSeen(
        429, "Too Many Requests", "http://h/seg1.ts", {"Retry-After": "9"}
    )

    failure = classify(
        DownloadError(
            "ERROR: \r[download] Got error: HTTP Error 429: Too Many Requests"
        ),
        seen=seen,
    )

    assert failure.retry_after_s == 9.0


def test_classify_seen_response_of_other_status_ignored() -> None:
    seen = HttpErrorSeen(429, "Too Many Requests", "http://h/a", {"Retry-After": "9"})

    failure = classify(
        DownloadError("ERROR: \r[download] Got error: HTTP Error 500: Oops"), seen=seen
    )

    assert failure.retry_after_s is None


def test_classify_429_without_retry_after() -> None:
    failure = classify(
        DownloadError("ERROR: unable to download video data: HTTP Error 429: Too Many")
    )

    assert failure.retry_after_s is None
    assert "sent no Retry-After" in str(failure)


def test_classify_429_message_names_wait() -> None:
    failure = classify(
        ExtractorError(
            "Unable to download webpage",
            cause=_http_error_with(429, "Too Many Requests", {"Retry-After": "30"}),
            expected=True,
        )
    )

    assert str(failure).startswith(
        "rate limited: the server answered HTTP 429 Too Many Requests from "
        "example.invalid and asked to wait 30s"
    )


def test_classify_429_message_names_capped_wait() -> None:
    failure = classify(
        _http_error_with(429, "Too Many Requests", {"Retry-After": "9999999999"})
    )

    assert failure.retry_after_s == MAX_RETRY_AFTER_S
    assert "asked to wait at least 86400s, the longest wait vodq honours" in str(
        failure
    )


def test_classify_503_keeps_retry_after() -> None:
    failure = classify(
        _http_error_with(503, "Service Unavailable", {"Retry-After": "4"})
    )

    assert failure.error_class == "transient"
    assert failure.retry_after_s == 4.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("120", 120.0, id="seconds"),
        pytest.param(" 5 ", 5.0, id="spaces"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("-3", 0.0, id="negative"),
        pytest.param("Wed, 01 Jan 2025 00:01:00 GMT", 60.0, id="http-date"),
        pytest.param("Tue, 31 Dec 2024 23:59:00 GMT", 0.0, id="date-in-past"),
        pytest.param("9999999999", MAX_RETRY_AFTER_S, id="capped"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("nan", None, id="nan"),
    ],
)
def test_retry_after_forms(value: str, expected: float | None) -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)

    assert retry_after_s({"Retry-After": value}, now=now) == expected


def test_retry_after_missing_header() -> None:
    assert retry_after_s({}) is None


def test_classify_disk_full_says_what_to_do() -> None:
    failure = classify(
        DownloadError("ERROR: unable to write data: [Errno 28] No space left on device")
    )

    assert "Free space in DATA_DIR" in str(failure)


def test_classify_disk_full_os_error_cause() -> None:
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise disk_full
        except OSError as exc:
            raise DownloadError("ERROR: unable to write data") from exc
    except DownloadError as exc:
        failure = classify(exc)

    assert failure.error_class == "disk_full"
    assert failure.retryable is True


def test_classify_disk_full_message_prefix() -> None:
    try:
        raise DownloadError("ERROR: unable to write data") from OSError(
            errno.ENOSPC, "No space left on device"
        )
    except DownloadError as exc:
        failure = classify(exc)

    assert str(failure).startswith("disk full: ")


def test_classify_other_os_error_not_disk_full() -> None:
    try:
        raise DownloadError("ERROR: unable to open for writing") from OSError(
            errno.EACCES, "Permission denied"
        )
    except DownloadError as exc:
        failure = classify(exc)

    assert failure.error_class == "error"


@pytest.mark.parametrize(
    ("status", "reason", "error_class", "retryable"),
    [
        pytest.param(403, "Forbidden", "needs_auth", False, id="403"),
        pytest.param(404, "Not Found", "gone", False, id="404"),
        pytest.param(429, "Too Many Requests", "rate_limited", True, id="429"),
        pytest.param(502, "Bad Gateway", "transient", True, id="502"),
    ],
)
def test_classify_extractor_error_cause_status(
    status: int, reason: str, error_class: str, retryable: bool
) -> None:
    # Built outside an except block, so only ``cause`` carries the HTTPError.
    # The message shows it only as "(caused by <HTTPError 403: Forbidden>)".
    error = ExtractorError(
        "Unable to download JSON metadata",
        cause=_http_error(status, reason),
        video_id="123",
        ie="twitch:vod",
        expected=True,
    )

    failure = classify(error)

    assert failure.error_class == error_class
    assert failure.retryable is retryable


def test_classify_extractor_error_raised_from_http_error() -> None:
    try:
        try:
            raise _http_error(404, "Not Found")
        except HTTPError as exc:
            raise ExtractorError(
                "Unable to download webpage", cause=exc, expected=True
            ) from None
    except ExtractorError as exc:
        failure = classify(exc)

    assert failure.error_class == "gone"


def test_classify_download_error_wrapping_extractor_error() -> None:
    # YoutubeDL.report_error raises a DownloadError while it handles the
    # ExtractorError and passes on the ExtractorError's exc_info.
    extractor_error = ExtractorError(
        "Unable to download JSON metadata",
        cause=_http_error(403, "Forbidden"),
        expected=True,
    )
    try:
        try:
            raise extractor_error
        except ExtractorError as exc:
            raise DownloadError(f"ERROR: {exc}", sys.exc_info()) from None
    except DownloadError as exc:
        failure = classify(exc)

    assert failure.error_class == "needs_auth"
    assert failure.retryable is False


def test_classify_cause_status_wins_over_message() -> None:
    error = ExtractorError(
        "Unable to download webpage: The read operation timed out",
        cause=_http_error(410, "Gone"),
        expected=True,
    )

    failure = classify(error)

    assert failure.error_class == "gone"

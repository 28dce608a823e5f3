"""Tests for the classification of yt-dlp download errors.

Every error is an instance of a real yt-dlp exception class, with a message
in the form that yt-dlp 2026.11 writes.
"""

from __future__ import annotations

import errno
import io
import sys

import pytest
from yt_dlp.networking import Response
from yt_dlp.networking.exceptions import HTTPError
from yt_dlp.utils import DownloadError, ExtractorError

from vodq.download.classify import classify
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

    assert str(failure) == "Unsupported URL: https://example.invalid/x"


def test_classify_strips_ansi_colours() -> None:
    # yt-dlp colours the prefix red when stderr is a terminal.
    coloured = "\x1b[0;31mERROR:\x1b[0m unable to download video data: HTTP Error 404"

    failure = classify(DownloadError(coloured))

    assert str(failure) == "unable to download video data: HTTP Error 404"
    assert failure.error_class == "gone"


def test_classify_empty_message_uses_type_name() -> None:
    failure = classify(DownloadError(""))

    assert str(failure) == "DownloadError"
    assert failure.error_class == "error"


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

    assert str(failure) == "disk full: unable to write data"


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

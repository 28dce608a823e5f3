"""Every domain exception of vodq, under one base class.

Driver and yt-dlp errors are translated into these at the boundary, so the
HTTP layer maps a small set of classes to status codes and the CLI prints
their messages as they are.
"""

from __future__ import annotations


class VodqError(Exception):
    """Base class of every error that vodq raises on purpose."""


class ConfigError(VodqError):
    """A configuration value is invalid; start-up stops with this message."""


class InvalidInput(VodqError):
    """A request or command carries a value that vodq cannot accept."""


class VodNotFound(VodqError):
    """No VOD with the given id exists."""

    def __init__(self, vod_id: str) -> None:
        super().__init__(
            f"VOD {vod_id!r} was not found; list known VODs with GET /vods"
        )
        self.vod_id = vod_id


class InvalidTransition(VodqError):
    """The VOD's current state does not allow the requested operation."""


class StorageUnavailable(VodqError):
    """The database cannot be reached or returned an error."""


class DownloadFailed(VodqError):
    """A download attempt failed; ``error_class`` tells whether to retry.

    ``retryable`` is False for errors that cannot succeed on a later attempt,
    such as a missing video or an unsupported URL.
    """

    def __init__(
        self,
        message: str,
        *,
        error_class: str,
        retryable: bool,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.retryable = retryable
        # The server's Retry-After, in seconds, when it sent one.
        self.retry_after_s = retry_after_s


class DownloadCancelled(VodqError):
    """A running download was stopped on purpose (cancel, shutdown, lost lease)."""


class UploadFailed(VodqError):
    """An upload attempt failed; ``retryable`` is whether to try again.

    A failed upload never discards the downloaded file: the next attempt
    sends the same file.
    """

    def __init__(
        self, message: str, *, retryable: bool, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        # How long the destination asked to wait before the next attempt, in
        # seconds (a Retry-After, or the time until a quota resets).
        self.retry_after_s = retry_after_s


class UploadQuotaExceeded(UploadFailed):
    """The destination takes no more uploads until a set time, such as a daily quota.

    The stage tries again after ``retry_after_s`` without counting an
    attempt, because the limit belongs to the destination and is not a
    failure of this upload.
    """

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, retryable=True, retry_after_s=retry_after_s)


class UploadCancelled(VodqError):
    """A running upload was stopped on purpose (cancel, shutdown, lost lease)."""

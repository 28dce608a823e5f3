"""Uploading a VOD to YouTube with the Data API v3 resumable upload protocol.

A POST of the video's metadata to ``/upload/youtube/v3/videos`` opens an
upload session and returns its URI in ``Location``. PUTs to that URI carry the
file in chunks, each with a ``Content-Range``. The server returns 308 Resume
Incomplete with a ``Range`` header of the bytes it has stored, until the last
chunk returns the video resource. An empty PUT with ``Content-Range: bytes
*/SIZE`` requests the state of a session without sending bytes. Source:
https://developers.google.com/youtube/v3/guides/using_resumable_upload_protocol

Access tokens come from the OAuth 2.0 refresh-token grant (RFC 6749, section
6) at the token URI of the operator's "authorized user" credentials file.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import string
import threading
import time
import unicodedata
import zoneinfo
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from vodq.download.classify import retry_after_s
from vodq.errors import ConfigError, UploadCancelled, UploadFailed
from vodq.upload import UploadJob, UploadQuotaExceeded, UploadResult
from vodq.upload.template import TemplateError, check, render

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://www.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
DEFAULT_PRIVACY = "private"
PRIVACY_STATUSES = ("private", "unlisted", "public")
DEFAULT_TITLE_TEMPLATE = "{title}"
DEFAULT_DESCRIPTION_TEMPLATE = "{channel} {date}\n{source_url}"

# The resumable protocol requires every chunk except the last to be a
# multiple of 256 KiB.
CHUNK_MULTIPLE_BYTES = 256 * 1024
DEFAULT_CHUNK_BYTES = 32 * CHUNK_MULTIPLE_BYTES
DEFAULT_TIMEOUT_S = 60.0

# Limits of the videos resource: snippet.title is at most 100 characters and
# snippet.description at most 5000 bytes, and neither may contain < or >.
MAX_TITLE_CHARS = 100
MAX_DESCRIPTION_BYTES = 5000

# The file is read and sent in pieces of this many bytes, so a chunk never
# sits in memory whole and a cancel is seen within one piece.
READ_PIECE_BYTES = 64 * 1024

# An access token is refreshed this many seconds before the expiry that the
# token endpoint returned, so that it does not expire during a request.
TOKEN_EXPIRY_MARGIN_S = 60.0

_CREDENTIALS_EXAMPLE = (
    '{"type": "authorized_user", "client_id": "1234.apps.googleusercontent.com",'
    ' "client_secret": "...", "refresh_token": "..."}'
)
_CREDENTIAL_FIELDS = ("client_id", "client_secret", "refresh_token")

# Error reasons of the YouTube Data API that a later attempt can get past.
_RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
_QUOTA_REASONS = frozenset({"quotaExceeded", "dailyLimitExceeded"})
# The channel's daily upload limit, sent with 400 or 403.
_UPLOAD_LIMIT_REASON = "uploadLimitExceeded"
_TRY_AGAIN = "the next attempt tries again"
_RANGE_HEADER = re.compile(r"bytes=0-(\d+)")
_SPACE_RUNS = re.compile(r"\s+")


@dataclass(frozen=True)
class Credentials:
    """An OAuth 2.0 client and the refresh token it may use for one channel."""

    client_id: str
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_uri: str


def load_credentials(path: Path) -> Credentials:
    """Read an "authorized user" credentials file, or raise ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _credentials_error(path, "does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _credentials_error(path, f"cannot be read ({exc})") from None

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # The decoder's message names the position only, never the content.
        raise _credentials_error(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _credentials_error(path, "does not contain a JSON object")

    if "installed" in data or "web" in data:
        raise _credentials_error(
            path,
            "is an OAuth client file without a refresh token, so authorize the"
            " client once to create an authorized-user file",
        )
    kind = data.get("type", "authorized_user")
    if kind != "authorized_user":
        raise _credentials_error(
            path, f'has type {kind!r}, but YouTube uploads need "authorized_user"'
        )
    missing = [
        name
        for name in _CREDENTIAL_FIELDS
        if not isinstance(data.get(name), str) or not data[name].strip()
    ]
    if missing:
        raise _credentials_error(path, f"is missing the field {', '.join(missing)}")

    token_uri = data.get("token_uri", DEFAULT_TOKEN_URI)
    if not isinstance(token_uri, str) or not _is_http_url(token_uri):
        raise _credentials_error(path, "has a token_uri that is not an http(s) URL")
    return Credentials(
        client_id=data["client_id"].strip(),
        client_secret=data["client_secret"].strip(),
        refresh_token=data["refresh_token"].strip(),
        token_uri=token_uri,
    )


def _credentials_error(path: Path, problem: str) -> ConfigError:
    return ConfigError(
        f"YOUTUBE_CREDENTIALS_FILE={str(path)!r} {problem}; write it as JSON"
        f" such as {_CREDENTIALS_EXAMPLE}"
    )


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


def clean_title(text: str, fallback: str) -> str:
    """Make ``text`` a title YouTube accepts: one line, no < or >, 100 characters.

    An empty result becomes ``fallback``, because YouTube rejects a video
    without a title.
    """
    title = _clean_text(_SPACE_RUNS.sub(" ", text)).strip()
    title = title[:MAX_TITLE_CHARS].rstrip()
    if title:
        return title
    return _clean_text(fallback).strip()[:MAX_TITLE_CHARS] or "VOD"


def clean_description(text: str) -> str:
    """Make ``text`` a description YouTube accepts: no < or >, 5000 bytes."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    encoded = _clean_text(text, keep="\n").strip().encode("utf-8")
    cut = encoded[:MAX_DESCRIPTION_BYTES].decode("utf-8", "ignore")
    return cut.rstrip()


def _clean_text(text: str, keep: str = "") -> str:
    """Drop control characters (except those in ``keep``), ``<`` and ``>``."""
    normalized = unicodedata.normalize("NFC", text)
    return "".join(
        char
        for char in normalized
        if char in keep
        or (char not in "<>" and unicodedata.category(char) not in ("Cc", "Cs"))
    )


class _TokenSource:
    """Access tokens from the refresh-token grant, cached until they expire.

    Uploads on several worker threads share one cache, so one refresh serves
    them all.
    """

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0  # time.monotonic() seconds

    def get(self, client: httpx.Client, vod_id: str) -> str:
        with self._lock:
            if self._token is not None and time.monotonic() < self._expires_at:
                return self._token
            return self._refresh(client, vod_id)

    def refresh(self, client: httpx.Client, vod_id: str, rejected: str) -> str:
        """Fetch a new token unless another thread replaced ``rejected`` already."""
        with self._lock:
            if self._token is not None and self._token != rejected:
                return self._token
            return self._refresh(client, vod_id)

    def _refresh(self, client: httpx.Client, vod_id: str) -> str:
        credentials = self._credentials
        host = urlsplit(credentials.token_uri).netloc
        form = {
            "grant_type": "refresh_token",
            "client_id": credentials.client_id,
            "client_secret": credentials.client_secret,
            "refresh_token": credentials.refresh_token,
        }
        try:
            response = client.post(credentials.token_uri, data=form)
        except httpx.TransportError as exc:
            raise UploadFailed(
                f"YouTube upload of VOD {vod_id!r} failed: the OAuth token endpoint"
                f" {host} did not respond ({type(exc).__name__}); the next attempt"
                " tries again, check the network if this repeats",
                retryable=True,
            ) from exc

        if response.status_code in (400, 401, 403):
            error = _json_field(response, "error") or f"HTTP {response.status_code}"
            raise UploadFailed(
                f"YouTube upload of VOD {vod_id!r} failed: the OAuth token endpoint"
                f" {host} rejected the credentials ({error}); check"
                " YOUTUBE_CREDENTIALS_FILE and create a new refresh token if it"
                " was revoked",
                retryable=False,
            )
        token = _json_field(response, "access_token")
        if response.status_code != 200 or not isinstance(token, str) or not token:
            raise UploadFailed(
                f"YouTube upload of VOD {vod_id!r} failed: the OAuth token endpoint"
                f" {host} returned HTTP {response.status_code} without an access"
                " token; the next attempt tries again",
                retryable=True,
            )

        # RFC 6749 makes expires_in (seconds) optional, though Google sends it.
        try:
            lifetime_s = float(_json_field(response, "expires_in"))
        except (TypeError, ValueError):
            lifetime_s = 3600.0
        self._token = token
        self._expires_at = time.monotonic() + lifetime_s - TOKEN_EXPIRY_MARGIN_S
        logger.info(
            "youtube access token refreshed",
            extra={"vod_id": vod_id, "action": "token_refresh"},
        )
        return token


def _json_field(response: httpx.Response, name: str) -> Any:
    try:
        data = response.json()
    except ValueError:
        return None
    return data.get(name) if isinstance(data, dict) else None


@dataclass(frozen=True)
class _ApiError:
    """The parts of a YouTube Data API error body that classify a failure."""

    reason: str
    location: str
    message: str


def _api_error(response: httpx.Response) -> _ApiError:
    error = _json_field(response, "error")
    if not isinstance(error, dict):
        return _ApiError("", "", "")
    details = error.get("errors")
    first = details[0] if isinstance(details, list) and details else {}
    if not isinstance(first, dict):
        first = {}
    message = str(first.get("message") or error.get("message") or "")
    return _ApiError(
        reason=str(first.get("reason") or error.get("status") or ""),
        location=str(first.get("location") or ""),
        # API messages can be long sentences with HTML, so 200 characters
        # keep the reason readable in a log line.
        message=message[:200],
    )


def _is_retryable_403(response: httpx.Response) -> bool:
    """Tell whether a 403 is a rate or daily limit, which a new token cannot lift."""
    reason = _api_error(response).reason
    return reason in _RATE_REASONS | _QUOTA_REASONS or reason == _UPLOAD_LIMIT_REASON


@dataclass(frozen=True)
class _SessionState:
    """The state of an upload session on the server."""

    offset: int = 0  # bytes stored
    result: UploadResult | None = None  # set once the video exists
    expired: bool = False


class _Interrupted(Exception):
    """A request was cut or met a server error, but the session may go on."""


class YouTubeUploader:
    """Uploads VODs to the channel of one set of OAuth credentials.

    Each call of ``upload`` runs one attempt on the calling thread. The
    session URI goes to ``on_session`` before the first byte, and a later
    attempt given that URI resumes or confirms the same upload, so a VOD
    becomes at most one video.
    """

    name = "youtube"

    # Interruptions (cut connections, 5xx) that one attempt resumes from
    # before it fails with a retryable error, and the wait before the first
    # resume, doubled for each further one (seconds).
    max_resumes = 5
    resume_backoff_s = 0.5

    def __init__(
        self,
        credentials_file: Path,
        *,
        api_url: str,
        privacy: str,
        title_template: str,
        description_template: str,
        chunk_bytes: int,
        timeout_s: float,
    ) -> None:
        if not _is_http_url(api_url):
            raise ConfigError(
                f"YOUTUBE_API_URL={api_url!r} is not an http(s) URL; use"
                f" {DEFAULT_API_URL}"
            )
        if privacy not in PRIVACY_STATUSES:
            raise ConfigError(
                f"YOUTUBE_PRIVACY={privacy!r} is not a privacy status; use one of"
                f" {', '.join(PRIVACY_STATUSES)}"
            )
        if chunk_bytes <= 0 or chunk_bytes % CHUNK_MULTIPLE_BYTES:
            raise ConfigError(
                f"YOUTUBE_CHUNK_SIZE={chunk_bytes} bytes is not a positive multiple"
                f" of 256 KiB ({CHUNK_MULTIPLE_BYTES} bytes); use a size such as 8M"
            )
        if not timeout_s > 0:
            raise ConfigError(
                f"YOUTUBE_TIMEOUT={timeout_s}s is not a positive duration; use a"
                " duration such as 60s"
            )
        _check_template("YOUTUBE_TITLE_TEMPLATE", title_template, fixed_ok=False)
        _check_template(
            "YOUTUBE_DESCRIPTION_TEMPLATE", description_template, fixed_ok=True
        )

        self.credentials = load_credentials(credentials_file)
        self.api_url = api_url.rstrip("/")
        self.privacy = privacy
        self.title_template = title_template
        self.description_template = description_template
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self._tokens = _TokenSource(self.credentials)

    def upload(
        self,
        job: UploadJob,
        *,
        cancelled: threading.Event,
        on_session: Callable[[str], None],
        on_progress: Callable[[int], None],
        lease_held: Callable[[], bool],
    ) -> UploadResult:
        """Send ``job``'s file, or resume or confirm its stored session.

        ``on_progress`` gets the bytes sent so far, which fall back to the
        server's offset when a cut chunk is resumed. ``lease_held`` is called
        before each request and each piece of a chunk, so an attempt that
        lost its lease stops within one piece (READ_PIECE_BYTES).
        """
        started = time.monotonic()
        _check_file(job)
        logger.info(
            "youtube upload started",
            extra={
                "vod_id": job.vod_id,
                "attempt": job.attempt,
                "bytes": job.size,
                "resuming": job.session is not None,
                "action": "upload_start",
            },
        )

        with httpx.Client(timeout=httpx.Timeout(self.timeout_s)) as client:
            attempt = _Attempt(
                self,
                client,
                job,
                cancelled=cancelled,
                on_progress=on_progress,
                lease_held=lease_held,
            )
            result = attempt.run(on_session)

        logger.info(
            "youtube upload finished",
            extra={
                "vod_id": job.vod_id,
                "attempt": job.attempt,
                "bytes": job.size,
                "remote_id": result.remote_id,
                "duration_ms": round((time.monotonic() - started) * 1000),
                "action": "upload_finish",
            },
        )
        return result

    def metadata(self, job: UploadJob) -> dict[str, Any]:
        """Build the video resource that opens ``job``'s upload session."""
        title = clean_title(render(self.title_template, job), fallback=job.vod_id)
        description = clean_description(render(self.description_template, job))
        return {
            "snippet": {"title": title, "description": description},
            "status": {"privacyStatus": self.privacy},
        }


def _check_template(variable: str, template: str, *, fixed_ok: bool) -> None:
    # A description may be fixed text. template.check rejects a template
    # without fields, because a fixed file name or title would repeat.
    if fixed_ok and not _has_fields(template):
        return
    try:
        check(template)
    except TemplateError as exc:
        raise ConfigError(f"{variable}={template!r} is invalid: {exc}") from None


def _has_fields(template: str) -> bool:
    """Return whether ``template`` names a field (malformed text counts)."""
    try:
        return any(name for _, name, _, _ in string.Formatter().parse(template))
    except ValueError:
        return True


def _check_file(job: UploadJob) -> None:
    try:
        size = job.path.stat().st_size
    except OSError as exc:
        raise UploadFailed(
            f"YouTube upload of VOD {job.vod_id!r} failed: {str(job.path)!r} cannot"
            f" be read ({exc.strerror}); download the VOD again",
            retryable=False,
        ) from exc
    if size == 0:
        raise UploadFailed(
            f"YouTube upload of VOD {job.vod_id!r} failed: {str(job.path)!r} is"
            " empty; download the VOD again",
            retryable=False,
        )
    if size != job.size:
        raise UploadFailed(
            f"YouTube upload of VOD {job.vod_id!r} failed: {str(job.path)!r} has"
            f" {size} bytes but the download recorded {job.size}; download the VOD"
            " again",
            retryable=False,
        )


class _Attempt:
    """One upload attempt: its HTTP client, its job and the protocol steps."""

    def __init__(
        self,
        uploader: YouTubeUploader,
        client: httpx.Client,
        job: UploadJob,
        *,
        cancelled: threading.Event,
        on_progress: Callable[[int], None],
        lease_held: Callable[[], bool],
    ) -> None:
        self.uploader = uploader
        self.client = client
        self.job = job
        self.cancelled = cancelled
        self.on_progress = on_progress
        self.lease_held = lease_held
        # The bytes last reported through on_progress.
        self.sent = 0
        # YouTube takes video/* or application/octet-stream, and mimetypes
        # maps some video extensions (.ts) to other types.
        guessed = mimetypes.guess_type(job.path.name)[0] or ""
        self.content_type = (
            guessed if guessed.startswith("video/") else "application/octet-stream"
        )

    def run(self, on_session: Callable[[str], None]) -> UploadResult:
        self._check_stopped(0)

        # A stored session may belong to an upload that finished or is half
        # done, and a new session would then become a second video.
        if self.job.session is not None:
            state = self._stored_state(self.job.session)
            if state.result is not None:
                self._report(self.job.size)
                return state.result
            if not state.expired:
                self._log_warning(
                    "youtube upload resumes its stored session",
                    "resume_stored",
                    state.offset,
                )
                return self._send(self.job.session, state.offset)
            self._log_warning(
                "youtube upload session expired; starting a new one",
                "session_expired",
                state.offset,
            )

        session = self._start()
        on_session(session)
        return self._send(session, 0)

    def _start(self) -> str:
        """Open an upload session with the video's metadata and return its URI."""
        url = (
            f"{self.uploader.api_url}/upload/youtube/v3/videos"
            "?uploadType=resumable&part=snippet,status"
        )
        body = json.dumps(self.uploader.metadata(self.job)).encode("utf-8")
        headers = {
            "Content-Type": "application/json; charset=UTF-8",
            "X-Upload-Content-Length": str(self.job.size),
            "X-Upload-Content-Type": self.content_type,
        }
        try:
            response = self._request("POST", url, headers, lambda: body)
        except httpx.TransportError as exc:
            raise self._retryable(
                f"opening the upload session was cut ({type(exc).__name__})",
                _TRY_AGAIN,
            ) from exc

        if response.status_code >= 500:
            raise self._retryable(
                f"opening the upload session returned HTTP {response.status_code}",
                _TRY_AGAIN,
            )
        if response.status_code not in (200, 201):
            raise self._failure(response)
        session = str(response.headers.get("Location", ""))
        if not _is_http_url(session):
            raise self._retryable(
                "the API opened a session without a Location URI", _TRY_AGAIN
            )
        if _origin(session) != _origin(self.uploader.api_url):
            # The access token goes to the session URI, so it must stay on
            # the API's host.
            raise UploadFailed(
                f"YouTube upload of VOD {self.job.vod_id!r} failed: the session URI"
                f" is on {urlsplit(session).netloc}, not on the YOUTUBE_API_URL"
                f" host {urlsplit(self.uploader.api_url).netloc}; check"
                " YOUTUBE_API_URL",
                retryable=False,
            )
        return session

    def _send(self, session: str, offset: int) -> UploadResult:
        """Send the file from ``offset`` on, resuming after interruptions."""
        interruptions = 0
        known: int | None = offset
        while True:
            self._check_stopped(known or 0)
            try:
                if known is None:
                    state = self._query(session)
                else:
                    state = self._state(self._put_chunk(session, known))
            except _Interrupted as exc:
                interruptions += 1
                if interruptions > self.uploader.max_resumes:
                    raise self._retryable(
                        f"the transfer was interrupted {interruptions} times, last"
                        f" by {exc}"
                    ) from exc
                self._log_warning(
                    f"youtube upload interrupted by {exc}; resuming",
                    "resume",
                    known or 0,
                )
                delay_s = self.uploader.resume_backoff_s * 2 ** (interruptions - 1)
                if self.cancelled.wait(delay_s):
                    self._check_stopped(known or 0)
                # Part of the cut chunk may have arrived, so a status query
                # returns the offset to continue from.
                known = None
                continue

            if state.result is not None:
                return state.result
            if state.expired:
                raise self._retryable(
                    "the upload session expired",
                    "the next attempt starts a new session",
                )
            known = state.offset
            self._report(known)

    def _put_chunk(self, session: str, offset: int) -> httpx.Response:
        stop = min(offset + self.uploader.chunk_bytes, self.job.size)
        headers = {
            "Content-Length": str(stop - offset),
            "Content-Range": f"bytes {offset}-{stop - 1}/{self.job.size}",
            "Content-Type": self.content_type,
        }
        try:
            return self._request(
                "PUT", session, headers, lambda: self._read(offset, stop)
            )
        except httpx.TransportError as exc:
            raise _Interrupted(type(exc).__name__) from exc

    def _query(self, session: str) -> _SessionState:
        headers = {"Content-Length": "0", "Content-Range": f"bytes */{self.job.size}"}
        try:
            response = self._request("PUT", session, headers, None)
        except httpx.TransportError as exc:
            raise _Interrupted(type(exc).__name__) from exc
        return self._state(response)

    def _stored_state(self, session: str) -> _SessionState:
        if not _is_http_url(session) or _origin(session) != _origin(
            self.uploader.api_url
        ):
            # The session may have finished, so a new one could become a
            # second video, and the access token must stay on the API's host.
            raise UploadFailed(
                f"YouTube upload of VOD {self.job.vod_id!r} failed: its stored"
                f" session is not on the YOUTUBE_API_URL host"
                f" {urlsplit(self.uploader.api_url).netloc}; set YOUTUBE_API_URL"
                " back to the URL of the earlier attempt",
                retryable=False,
            )
        try:
            return self._query(session)
        except _Interrupted as exc:
            raise self._retryable(
                f"checking the stored upload session failed ({exc})",
                "the next attempt checks it again",
            ) from exc

    def _state(self, response: httpx.Response) -> _SessionState:
        """Read a chunk PUT's or a status query's response."""
        status = response.status_code
        if status == 308:
            match = _RANGE_HEADER.fullmatch(response.headers.get("Range", "").strip())
            # No Range header means that the server stores no byte yet.
            offset = int(match.group(1)) + 1 if match else 0
            if offset > self.job.size:
                raise UploadFailed(
                    f"YouTube upload of VOD {self.job.vod_id!r} failed: its session"
                    f" stores {offset} bytes but the file has {self.job.size}, so"
                    " the file changed after the upload began; reprocess the VOD",
                    retryable=False,
                )
            if offset == self.job.size:
                # Every byte arrived but the video resource did not, so the
                # next status query should return it.
                raise _Interrupted("a 308 for the whole file")
            return _SessionState(offset=offset)
        if status in (200, 201):
            video_id = _json_field(response, "id")
            if not isinstance(video_id, str) or not video_id:
                raise UploadFailed(
                    f"YouTube upload of VOD {self.job.vod_id!r} finished without a"
                    " video id in the response; look for the video in YouTube"
                    " Studio before retrying, so it is not uploaded twice",
                    retryable=False,
                )
            return _SessionState(
                offset=self.job.size,
                result=UploadResult(
                    remote_id=video_id,
                    remote_url=f"https://www.youtube.com/watch?v={video_id}",
                ),
            )
        if status in (404, 410):
            return _SessionState(expired=True)
        if status >= 500 or status == 408:
            raise _Interrupted(f"HTTP {status}")
        raise self._failure(response)

    def _request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: Callable[[], bytes | Iterator[bytes]] | None,
    ) -> httpx.Response:
        """Send one API request, with one token refresh if access is denied."""
        tokens = self.uploader._tokens
        token = tokens.get(self.client, self.job.vod_id)
        response = self._send_with(method, url, headers, content, token)
        denied = response.status_code == 401 or (
            response.status_code == 403 and not _is_retryable_403(response)
        )
        if not denied:
            return response

        # A token can be revoked or expire early, and a fresh one separates
        # that case from credentials that lack the permission.
        token = tokens.refresh(self.client, self.job.vod_id, rejected=token)
        return self._send_with(method, url, headers, content, token)

    def _send_with(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: Callable[[], bytes | Iterator[bytes]] | None,
        token: str,
    ) -> httpx.Response:
        # Every request to the API and the session passes here, so none is
        # sent after a cancel or once the lease is lost.
        self._check_stopped()
        return self.client.request(
            method,
            url,
            headers={**headers, "Authorization": f"Bearer {token}"},
            content=content() if content is not None else b"",
        )

    def _read(self, start: int, stop: int) -> Iterator[bytes]:
        """Yield the file's bytes ``start`` to ``stop`` in pieces."""
        with self.job.path.open("rb") as file:
            file.seek(start)
            position = start
            while position < stop:
                self._check_stopped(position)
                piece = file.read(min(READ_PIECE_BYTES, stop - position))
                if not piece:
                    raise UploadFailed(
                        f"YouTube upload of VOD {self.job.vod_id!r} failed:"
                        f" {str(self.job.path)!r} ended at byte {position} of"
                        f" {self.job.size}; download the VOD again",
                        retryable=False,
                    )
                yield piece
                # The client asks for the next piece once this one is sent.
                position += len(piece)
                self._report(position)

    def _failure(self, response: httpx.Response) -> UploadFailed:
        """Translate an API error response into UploadFailed."""
        error = _api_error(response)
        status = response.status_code
        what = f"HTTP {status}" + (f", {error.reason}" if error.reason else "")
        vod = f"YouTube upload of VOD {self.job.vod_id!r}"

        if status == 429 or error.reason in _RATE_REASONS:
            return UploadFailed(
                f"{vod} was rate limited ({what}); the next attempt tries again",
                retryable=True,
                retry_after_s=retry_after_s(dict(response.headers)),
            )
        # Daily limits are the destination's, so waiting for them counts no
        # attempt (UploadQuotaExceeded).
        if error.reason in _QUOTA_REASONS:
            return UploadQuotaExceeded(
                f"{vod} failed: the API quota of the Google Cloud project is used"
                f" up ({what}); the next attempt waits for the daily reset, or"
                " request more quota in the Google Cloud console",
                retry_after_s=seconds_to_quota_reset(),
            )
        if error.reason == _UPLOAD_LIMIT_REASON:
            return UploadQuotaExceeded(
                f"{vod} failed: the channel reached its daily upload limit"
                f" ({what}); the next attempt waits for the daily reset",
                retry_after_s=seconds_to_quota_reset(),
            )
        if status in (401, 403):
            return UploadFailed(
                f"{vod} was denied ({what}) after a token refresh; check"
                " YOUTUBE_CREDENTIALS_FILE and that its account may upload to"
                " the channel",
                retryable=False,
            )
        if status == 400:
            field_name = error.location or "the video metadata"
            detail = f": {error.message}" if error.message else ""
            return UploadFailed(
                f"{vod} failed: YouTube rejected {field_name} ({what}{detail});"
                " fix YOUTUBE_TITLE_TEMPLATE, YOUTUBE_DESCRIPTION_TEMPLATE or"
                " YOUTUBE_PRIVACY",
                retryable=False,
            )
        return UploadFailed(
            f"{vod} failed with an unexpected response ({what}); check YOUTUBE_API_URL",
            retryable=False,
        )

    def _retryable(
        self, problem: str, next_step: str = "the next attempt resumes the session"
    ) -> UploadFailed:
        return UploadFailed(
            f"YouTube upload of VOD {self.job.vod_id!r} failed: {problem}; {next_step}",
            retryable=True,
        )

    def _report(self, position: int) -> None:
        self.sent = position
        self.on_progress(position)

    def _check_stopped(self, position: int | None = None) -> None:
        """Raise UploadCancelled after a cancel, or once the lease is lost.

        ``position`` is the byte the upload has reached, by default the one
        last reported.
        """
        at = self.sent if position is None else position
        if self.cancelled.is_set():
            raise UploadCancelled(
                f"YouTube upload of VOD {self.job.vod_id!r} was cancelled at byte"
                f" {at} of {self.job.size}"
            )
        if not self.lease_held():
            raise UploadCancelled(
                f"YouTube upload of VOD {self.job.vod_id!r} stopped at byte {at} of"
                f" {self.job.size} because this worker no longer holds its lease;"
                " the worker that takes the VOD over resumes the same session"
            )

    def _log_warning(self, message: str, action: str, offset: int) -> None:
        logger.warning(
            message,
            extra={
                "vod_id": self.job.vod_id,
                "attempt": self.job.attempt,
                "bytes": offset,
                "action": action,
            },
        )


def seconds_to_quota_reset(now: datetime | None = None) -> float:
    """Seconds until midnight Pacific time, when YouTube's daily quotas reset.

    Without the time zone database, one hour: long enough not to spend the
    attempts, short enough to notice a reset soon after it happens.
    """
    try:
        pacific = zoneinfo.ZoneInfo("America/Los_Angeles")
    except zoneinfo.ZoneInfoNotFoundError:
        return 3600.0
    current = (now or datetime.now(UTC)).astimezone(UTC)
    local = current.astimezone(pacific)
    midnight = datetime.combine(
        local.date() + timedelta(days=1), datetime.min.time(), tzinfo=pacific
    )
    # Python subtracts two datetimes of one tzinfo by wall clock, which is an
    # hour off across a daylight saving change, so the subtraction is in UTC.
    # A minute past midnight, so that the reset has surely happened.
    return (midnight.astimezone(UTC) - current).total_seconds() + 60.0

"""The YouTube uploader against a local server that speaks the upload protocol.

Every test passes the server's 127.0.0.1 URLs as api_url and token_uri, and
counts the requests it made, so that a retry storm fails the test. The last
tests run the whole upload stage with UPLOADER=youtube on real databases.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from test_admin import Api

from conftest import ServiceFactory, wait_for, wait_for_state
from mediaserver import MediaServer
from vodq.errors import ConfigError, UploadCancelled, UploadFailed
from vodq.models import VodState
from vodq.service import NewVod, Service
from vodq.upload import UploadJob, UploadQuotaExceeded, UploadResult
from vodq.upload.stage import HEARTBEAT_S, POLL_INTERVAL_S
from vodq.upload.youtube import (
    DEFAULT_PRIVACY,
    DEFAULT_TOKEN_URI,
    MAX_DESCRIPTION_BYTES,
    MAX_TITLE_CHARS,
    READ_PIECE_BYTES,
    YouTubeUploader,
    seconds_to_quota_reset,
)
from youtube_server import CLIENT_SECRET, REFRESH_TOKEN, YouTubeServer

KIB = 1024
CHUNK_BYTES = 256 * KIB
# Four chunks: three whole ones and a short last one.
FILE_BYTES = 3 * CHUNK_BYTES + 12_345
FILE_CHUNKS = 4


@dataclass
class Run:
    """What one upload call reported through its callbacks."""

    sessions: list[str] = field(default_factory=list)
    progress: list[int] = field(default_factory=list)
    # Chunk PUTs the server had seen when on_session was called.
    chunks_before_session: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)


UploaderFactory = Callable[..., YouTubeUploader]


@pytest.fixture
def youtube() -> Iterator[YouTubeServer]:
    with YouTubeServer() as server:
        yield server


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "vod.mp4"
    path.write_bytes(os.urandom(FILE_BYTES))
    return path


@pytest.fixture
def credentials(tmp_path: Path, youtube: YouTubeServer) -> Path:
    return youtube.write_credentials(tmp_path / "youtube.json")


@pytest.fixture
def make_uploader(youtube: YouTubeServer, credentials: Path) -> UploaderFactory:
    def factory(**overrides: object) -> YouTubeUploader:
        arguments: dict[str, object] = {
            "api_url": youtube.url,
            "privacy": DEFAULT_PRIVACY,
            "title_template": "{title}",
            "description_template": "{source_url}",
            "chunk_bytes": CHUNK_BYTES,
            "timeout_s": 5.0,
        }
        arguments.update(overrides)
        path = arguments.pop("credentials_file", credentials)
        assert isinstance(path, Path)
        uploader = YouTubeUploader(path, **arguments)  # type: ignore[arg-type]
        # Resumes in tests need no pause between them.
        uploader.resume_backoff_s = 0.0
        return uploader

    return factory


def make_job(
    path: Path, *, session: str | None = None, title: str = "Stream", attempt: int = 1
) -> UploadJob:
    return UploadJob(
        vod_id="vod-1",
        path=path,
        size=path.stat().st_size,
        attempt=attempt,
        title=title,
        channel="chan",
        date=None,
        source_url="http://127.0.0.1/watch/1",
        session=session,
    )


def upload(
    uploader: YouTubeUploader,
    job: UploadJob,
    server: YouTubeServer,
    run: Run | None = None,
    on_progress: Callable[[Run, int], None] | None = None,
    lease_held: Callable[[], bool] = lambda: True,
) -> tuple[UploadResult, Run]:
    run = run or Run()

    def record_session(uri: str) -> None:
        run.sessions.append(uri)
        run.chunks_before_session.append(server.count("chunk"))

    def record_progress(sent: int) -> None:
        run.progress.append(sent)
        if on_progress is not None:
            on_progress(run, sent)

    result = uploader.upload(
        job,
        cancelled=run.cancelled,
        on_session=record_session,
        on_progress=record_progress,
        lease_held=lease_held,
    )
    return result, run


def chunk_starts(server: YouTubeServer) -> list[int]:
    """Return the first byte of every chunk PUT, in order."""
    starts = []
    for record in server.requests:
        if record.kind == "chunk":
            content_range = record.headers["Content-Range"]
            starts.append(int(content_range.split()[1].split("-")[0]))
    return starts


# Whole uploads.


def test_upload_sends_file_in_chunks(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    result, run = upload(make_uploader(), make_job(video), youtube)

    assert len(youtube.videos) == 1
    assert youtube.videos[0].data == video.read_bytes()
    assert result.remote_id == youtube.videos[0].id
    assert result.remote_url == f"https://www.youtube.com/watch?v={result.remote_id}"
    assert youtube.count("token") == 1
    assert youtube.count("initiate") == 1
    assert youtube.count("chunk") == FILE_CHUNKS
    assert youtube.count("query") == 0
    assert chunk_starts(youtube) == [0, CHUNK_BYTES, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES]
    assert run.progress[-1] == FILE_BYTES
    assert youtube.errors == []


def test_upload_reports_session_before_bytes(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    _, run = upload(make_uploader(), make_job(video), youtube)

    assert len(run.sessions) == 1
    assert run.chunks_before_session == [0]
    assert youtube.count("initiate") == 1


def test_upload_sends_protocol_headers(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    upload(make_uploader(), make_job(video), youtube)

    initiate = next(r for r in youtube.requests if r.kind == "initiate")
    last_chunk = [r for r in youtube.requests if r.kind == "chunk"][-1]
    assert initiate.headers["X-Upload-Content-Length"] == str(FILE_BYTES)
    assert initiate.headers["X-Upload-Content-Type"] == "video/mp4"
    assert initiate.headers["Authorization"].startswith("Bearer ")
    assert last_chunk.headers["Content-Range"] == (
        f"bytes {3 * CHUNK_BYTES}-{FILE_BYTES - 1}/{FILE_BYTES}"
    )
    assert last_chunk.headers["Content-Length"] == str(FILE_BYTES - 3 * CHUNK_BYTES)
    assert youtube.count("chunk") == FILE_CHUNKS


# Resume within one attempt.


def test_upload_cut_halfway_resumes_to_one_video(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    # Chunks of 512 KiB; the second (the rest of the file, 268 KiB) is cut
    # after 260 KiB, of which the server keeps 256 KiB.
    youtube.cut_chunks(260 * KIB, skip=1)
    uploader = make_uploader(chunk_bytes=2 * CHUNK_BYTES)

    result, run = upload(uploader, make_job(video), youtube)

    assert len(youtube.videos) == 1
    assert youtube.videos[0].data == video.read_bytes()
    assert result.remote_id == youtube.videos[0].id
    assert youtube.session_count == 1
    assert youtube.count("initiate") == 1
    assert youtube.count("query") == 1
    assert chunk_starts(youtube) == [0, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES]
    assert len(run.sessions) == 1


def test_upload_server_error_resumes(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.fail("chunk", 503)

    upload(make_uploader(), make_job(video), youtube)

    assert len(youtube.videos) == 1
    assert youtube.videos[0].data == video.read_bytes()
    assert youtube.count("chunk") == FILE_CHUNKS + 1
    assert youtube.count("query") == 1
    assert youtube.count("initiate") == 1


def test_upload_always_cut_fails_retryable(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.cut_chunks(100 * KIB, times=None, skip=1)
    uploader = make_uploader()

    with pytest.raises(UploadFailed) as caught:
        upload(uploader, make_job(video), youtube)

    assert caught.value.retryable
    assert "interrupted 6 times" in str(caught.value)
    assert youtube.count("chunk") == 1 + uploader.max_resumes + 1
    assert youtube.count("query") == uploader.max_resumes
    assert youtube.count("initiate") == 1
    assert youtube.videos == []


# Resume across attempts.


def test_upload_next_attempt_resumes_stored_session(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.cut_chunks(100 * KIB, times=None, skip=1)
    uploader = make_uploader()
    first = Run()
    with pytest.raises(UploadFailed):
        upload(uploader, make_job(video), youtube, first)
    youtube.clear_faults()
    chunks_before = youtube.count("chunk")

    result, second = upload(
        uploader, make_job(video, session=first.sessions[0], attempt=2), youtube
    )

    assert len(youtube.videos) == 1
    assert youtube.videos[0].data == video.read_bytes()
    assert result.remote_id == youtube.videos[0].id
    assert youtube.count("initiate") == 1
    assert second.sessions == []
    assert chunk_starts(youtube)[chunks_before:] == [
        CHUNK_BYTES,
        2 * CHUNK_BYTES,
        3 * CHUNK_BYTES,
    ]


def test_upload_completed_session_returns_video(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    uploader = make_uploader()
    first, run = upload(uploader, make_job(video), youtube)
    requests_before = len(youtube.requests)

    again, second = upload(
        uploader, make_job(video, session=run.sessions[0], attempt=2), youtube
    )

    assert again == first
    assert len(youtube.videos) == 1
    assert youtube.count("chunk") == FILE_CHUNKS
    assert youtube.count("initiate") == 1
    assert youtube.count("query") == 1
    assert len(youtube.requests) == requests_before + 1
    assert second.sessions == []
    assert second.progress == [FILE_BYTES]


def test_upload_expired_session_starts_new_one(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.cut_chunks(100 * KIB, times=None, skip=1)
    uploader = make_uploader()
    first = Run()
    with pytest.raises(UploadFailed):
        upload(uploader, make_job(video), youtube, first)
    youtube.clear_faults()
    youtube.expire_session(first.sessions[0])
    queries_before = youtube.count("query")

    result, second = upload(
        uploader, make_job(video, session=first.sessions[0], attempt=2), youtube
    )

    assert len(youtube.videos) == 1
    assert youtube.videos[0].data == video.read_bytes()
    assert result.remote_id == youtube.videos[0].id
    assert youtube.count("query") == queries_before + 1
    assert youtube.count("initiate") == 2
    assert len(second.sessions) == 1
    assert second.sessions[0] != first.sessions[0]


def test_upload_unreachable_session_fails_retryable(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    uploader = make_uploader()
    first = Run()
    youtube.cut_chunks(100 * KIB, times=None)
    with pytest.raises(UploadFailed):
        upload(uploader, make_job(video), youtube, first)
    youtube.clear_faults()
    youtube.fail("query", 503)

    with pytest.raises(UploadFailed) as caught:
        upload(uploader, make_job(video, session=first.sessions[0]), youtube)

    assert caught.value.retryable
    assert youtube.count("initiate") == 1
    assert youtube.videos == []


def test_upload_chunk_rate_limited_is_retryable(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.fail("chunk", 429, reason="rateLimitExceeded")

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(), make_job(video), youtube)

    assert caught.value.retryable
    assert youtube.count("chunk") == 1
    assert youtube.count("query") == 0
    assert youtube.count("initiate") == 1


# Tokens.


def test_upload_refreshes_token_before_expiry(
    tmp_path: Path, video: Path, make_uploader: UploaderFactory
) -> None:
    # Tokens that live 30 s are inside the uploader's 60 s margin, so it
    # fetches a new one before every request.
    with YouTubeServer(token_lifetime_s=30) as server:
        credentials = server.write_credentials(tmp_path / "short.json")
        uploader = make_uploader(credentials_file=credentials, api_url=server.url)

        upload(uploader, make_job(video), server)

        assert len(server.videos) == 1
        assert server.count("token") == 1 + FILE_CHUNKS
        assert all(record.status != 401 for record in server.requests)


def test_upload_refreshes_token_on_401(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.expire_tokens_after_chunks(1)

    upload(make_uploader(), make_job(video), youtube)

    assert len(youtube.videos) == 1
    assert youtube.videos[0].data == video.read_bytes()
    assert youtube.count("token") == 2
    assert youtube.count("chunk") == FILE_CHUNKS + 1
    assert [r.status for r in youtube.requests].count(401) == 1


def test_upload_forbidden_is_not_retryable(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.fail("initiate", 403, reason="forbidden", times=None)

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(), make_job(video), youtube)

    assert not caught.value.retryable
    assert str(caught.value) == (
        "YouTube upload of VOD 'vod-1' was denied (HTTP 403, forbidden) after a"
        " token refresh; check YOUTUBE_CREDENTIALS_FILE and that its account may"
        " upload to the channel"
    )
    assert youtube.count("token") == 2
    assert youtube.count("initiate") == 2
    assert youtube.count("chunk") == 0


def test_upload_revoked_token_not_retryable(
    tmp_path: Path, youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    revoked = youtube.write_credentials(
        tmp_path / "revoked.json", refresh_token="revoked-refresh-token"
    )

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(credentials_file=revoked), make_job(video), youtube)

    assert not caught.value.retryable
    assert "invalid_grant" in str(caught.value)
    assert "revoked-refresh-token" not in str(caught.value)
    assert youtube.count("token") == 1
    assert youtube.count("initiate") == 0


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        pytest.param(429, "rateLimitExceeded", id="429"),
        pytest.param(403, "quotaExceeded", id="quota"),
        pytest.param(403, "rateLimitExceeded", id="rate-403"),
        pytest.param(400, "uploadLimitExceeded", id="upload-limit"),
    ],
)
def test_upload_limit_is_retryable(
    youtube: YouTubeServer,
    video: Path,
    make_uploader: UploaderFactory,
    status: int,
    reason: str,
) -> None:
    youtube.fail("initiate", status, reason=reason)

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(), make_job(video), youtube)

    assert caught.value.retryable
    assert reason in str(caught.value)
    assert youtube.count("initiate") == 1
    assert youtube.count("token") == 1
    assert youtube.count("chunk") == 0


def test_upload_invalid_metadata_names_field(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.fail("initiate", 400, reason="invalidCategoryId", location="snippet.x")

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(), make_job(video), youtube)

    assert not caught.value.retryable
    assert "YouTube rejected snippet.x (HTTP 400, invalidCategoryId" in str(
        caught.value
    )
    assert youtube.count("initiate") == 1


def test_upload_logs_no_secrets(
    youtube: YouTubeServer,
    video: Path,
    make_uploader: UploaderFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    youtube.expire_tokens_after_chunks(1)
    caplog.set_level(logging.DEBUG)

    upload(make_uploader(), make_job(video), youtube)

    tokens = {
        record.headers["Authorization"].removeprefix("Bearer ")
        for record in youtube.requests
        if "Authorization" in record.headers
    }
    logged = "\n".join(
        f"{record.getMessage()} {record.__dict__}" for record in caplog.records
    )
    assert len(tokens) == 2
    assert CLIENT_SECRET not in logged
    assert REFRESH_TOKEN not in logged
    assert all(token not in logged for token in tokens)


# Cancel.


def test_upload_cancel_between_chunks(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    def cancel_after_first_chunk(run: Run, sent: int) -> None:
        if sent >= CHUNK_BYTES:
            run.cancelled.set()

    with pytest.raises(UploadCancelled):
        upload(
            make_uploader(),
            make_job(video),
            youtube,
            on_progress=cancel_after_first_chunk,
        )

    assert youtube.count("chunk") == 1
    assert youtube.videos == []


def test_upload_cancel_while_reading_file(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    def cancel_after_first_piece(run: Run, sent: int) -> None:
        run.cancelled.set()

    with pytest.raises(UploadCancelled):
        upload(
            make_uploader(),
            make_job(video),
            youtube,
            on_progress=cancel_after_first_piece,
        )

    # The server records the cut chunk once it has read what arrived.
    wait_for(lambda: youtube.count("chunk") == 1, timeout_s=5.0)
    assert youtube.count("chunk") == 1
    assert youtube.videos == []


# A lost lease (another worker may have taken the upload over).


def test_upload_lost_lease_stops_before_next_chunk(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    run = Run()

    def lease_held() -> bool:
        # Lost once the first chunk's 308 has been read.
        return CHUNK_BYTES not in run.progress

    with pytest.raises(UploadCancelled) as caught:
        upload(make_uploader(), make_job(video), youtube, run, lease_held=lease_held)

    assert str(caught.value) == (
        f"YouTube upload of VOD 'vod-1' stopped at byte {CHUNK_BYTES} of"
        f" {FILE_BYTES} because this worker no longer holds its lease; the worker"
        " that takes the VOD over resumes the same session"
    )
    assert youtube.count("chunk") == 1
    assert youtube.count("query") == 0
    assert youtube.session_bytes(run.sessions[0]) == CHUNK_BYTES
    assert youtube.videos == []


def test_upload_lost_lease_stops_within_one_piece(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    run = Run()

    def lease_held() -> bool:
        # Lost once the first piece of the first chunk is sent.
        return not run.progress

    with pytest.raises(UploadCancelled):
        upload(make_uploader(), make_job(video), youtube, run, lease_held=lease_held)

    # The server replies to the cut chunk once it has read what arrived.
    wait_for(
        lambda: any(r.status for r in youtube.requests if r.kind == "chunk"),
        timeout_s=5.0,
    )
    (chunk,) = [r for r in youtube.requests if r.kind == "chunk"]
    assert chunk.body_bytes == READ_PIECE_BYTES
    assert youtube.session_bytes(run.sessions[0]) == 0
    assert youtube.videos == []


def test_upload_lost_lease_sends_no_request(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    with pytest.raises(UploadCancelled):
        upload(make_uploader(), make_job(video), youtube, lease_held=lambda: False)

    assert youtube.count("initiate") == 0
    assert youtube.count("chunk") == 0


def test_upload_cancel_before_bytes(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    run = Run()
    uploader = make_uploader()

    def cancel_on_session(uri: str) -> None:
        run.sessions.append(uri)
        run.cancelled.set()

    with pytest.raises(UploadCancelled):
        uploader.upload(
            make_job(video),
            cancelled=run.cancelled,
            on_session=cancel_on_session,
            on_progress=run.progress.append,
            lease_held=lambda: True,
        )

    assert len(run.sessions) == 1
    assert youtube.count("chunk") == 0


# Metadata.


def test_title_truncated_to_max_chars(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    _, run = upload(make_uploader(), make_job(video, title="x" * 150), youtube)

    title = youtube.metadata(run.sessions[0])["snippet"]["title"]
    assert title == "x" * MAX_TITLE_CHARS
    assert youtube.count("initiate") == 1


def test_title_control_characters_removed(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    job = make_job(video, title="a\x00b\x07c\td\ne <f>\x7f")

    _, run = upload(make_uploader(), job, youtube)

    assert youtube.metadata(run.sessions[0])["snippet"]["title"] == "abc d e f"
    assert youtube.count("initiate") == 1


def test_title_empty_falls_back_to_vod_id(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    _, run = upload(make_uploader(), make_job(video, title="<>\x01"), youtube)

    assert youtube.metadata(run.sessions[0])["snippet"]["title"] == "vod-1"
    assert youtube.count("initiate") == 1


def test_description_cut_to_max_bytes(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    # Two bytes per character in UTF-8, so the cut falls between characters.
    uploader = make_uploader(description_template="{title}")
    job = make_job(video, title="é" * 3000 + "<b>\x00")

    _, run = upload(uploader, job, youtube)

    description = youtube.metadata(run.sessions[0])["snippet"]["description"]
    assert description == "é" * (MAX_DESCRIPTION_BYTES // 2)
    assert youtube.count("initiate") == 1


def test_description_keeps_line_breaks(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    uploader = make_uploader(description_template="Archive of {title}\r\n<{date}>")

    _, run = upload(uploader, make_job(video), youtube)

    description = youtube.metadata(run.sessions[0])["snippet"]["description"]
    assert description == "Archive of Stream\nundated"
    assert youtube.count("initiate") == 1


def test_privacy_default_is_private(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    _, run = upload(make_uploader(), make_job(video), youtube)

    assert DEFAULT_PRIVACY == "private"
    assert youtube.metadata(run.sessions[0])["status"]["privacyStatus"] == "private"
    assert youtube.count("initiate") == 1


def test_privacy_unlisted_is_sent(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    _, run = upload(make_uploader(privacy="unlisted"), make_job(video), youtube)

    assert youtube.metadata(run.sessions[0])["status"]["privacyStatus"] == "unlisted"
    assert youtube.count("initiate") == 1


# Configuration.


def _credentials_cases(youtube: YouTubeServer) -> dict[str, tuple[str | None, str]]:
    """File contents (None: no file) and the problem each one must report."""
    document = youtube.credentials()
    without_secret = {k: v for k, v in document.items() if k != "refresh_token"}
    return {
        "missing-file": (None, "does not exist"),
        "bad-json": ("{not json", "is not valid JSON (Expecting property name"),
        "not-object": ("[]", "does not contain a JSON object"),
        "missing-field": (json.dumps(without_secret), "missing the field refresh"),
        "empty-field": (
            json.dumps({**document, "client_id": " "}),
            "is missing the field client_id",
        ),
        "client-file": (
            json.dumps({"installed": {"client_id": "x", "client_secret": "y"}}),
            "is an OAuth client file without a refresh token",
        ),
        "service-account": (
            json.dumps({**document, "type": "service_account"}),
            "has type 'service_account'",
        ),
        "bad-token-uri": (
            json.dumps({**document, "token_uri": "ftp://127.0.0.1/"}),
            "has a token_uri that is not an http(s) URL",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing-file",
        "bad-json",
        "not-object",
        "missing-field",
        "empty-field",
        "client-file",
        "service-account",
        "bad-token-uri",
    ],
)
def test_credentials_invalid_file_config_error(
    tmp_path: Path,
    youtube: YouTubeServer,
    make_uploader: UploaderFactory,
    case: str,
) -> None:
    content, problem = _credentials_cases(youtube)[case]
    path = tmp_path / "broken.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(ConfigError) as caught:
        make_uploader(credentials_file=path)

    message = str(caught.value)
    assert message.startswith(f"YOUTUBE_CREDENTIALS_FILE={str(path)!r} ")
    assert problem in message
    assert '"type": "authorized_user"' in message
    assert CLIENT_SECRET not in message
    assert REFRESH_TOKEN not in message
    assert youtube.requests == []


def test_credentials_missing_file_message(
    tmp_path: Path, make_uploader: UploaderFactory
) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(ConfigError) as caught:
        make_uploader(credentials_file=path)

    assert str(caught.value) == (
        f"YOUTUBE_CREDENTIALS_FILE={str(path)!r} does not exist; write it as JSON"
        ' such as {"type": "authorized_user", "client_id":'
        ' "1234.apps.googleusercontent.com", "client_secret": "...",'
        ' "refresh_token": "..."}'
    )


def test_credentials_token_uri_defaults_to_google(
    tmp_path: Path, youtube: YouTubeServer, make_uploader: UploaderFactory
) -> None:
    document = {k: v for k, v in youtube.credentials().items() if k != "token_uri"}
    path = tmp_path / "default.json"
    path.write_text(json.dumps(document))

    uploader = make_uploader(credentials_file=path)

    assert uploader.credentials.token_uri == DEFAULT_TOKEN_URI
    assert youtube.requests == []


def test_credentials_repr_hides_secrets(make_uploader: UploaderFactory) -> None:
    text = repr(make_uploader().credentials)

    assert CLIENT_SECRET not in text
    assert REFRESH_TOKEN not in text


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        pytest.param({"privacy": "secret"}, "YOUTUBE_PRIVACY", id="privacy"),
        pytest.param({"chunk_bytes": 1000}, "YOUTUBE_CHUNK_SIZE", id="chunk-size"),
        pytest.param({"chunk_bytes": 0}, "YOUTUBE_CHUNK_SIZE", id="chunk-zero"),
        pytest.param({"timeout_s": 0.0}, "YOUTUBE_TIMEOUT", id="timeout"),
        pytest.param({"api_url": "127.0.0.1"}, "YOUTUBE_API_URL", id="api-url"),
        pytest.param(
            {"title_template": "{nope}"}, "YOUTUBE_TITLE_TEMPLATE", id="title"
        ),
        pytest.param(
            {"title_template": "fixed"}, "YOUTUBE_TITLE_TEMPLATE", id="title-fixed"
        ),
        pytest.param(
            {"description_template": "{"},
            "YOUTUBE_DESCRIPTION_TEMPLATE",
            id="description",
        ),
    ],
)
def test_uploader_invalid_setting_config_error(
    youtube: YouTubeServer,
    make_uploader: UploaderFactory,
    overrides: dict[str, object],
    variable: str,
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_uploader(**overrides)

    assert str(caught.value).startswith(f"{variable}=")
    assert youtube.requests == []


def test_uploader_accepts_fixed_description(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    uploader = make_uploader(description_template="Archived by vodq")

    _, run = upload(uploader, make_job(video), youtube)

    description = youtube.metadata(run.sessions[0])["snippet"]["description"]
    assert description == "Archived by vodq"
    assert youtube.count("initiate") == 1


def test_upload_size_mismatch_not_retryable(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    job = make_job(video)
    video.write_bytes(b"short")

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(), job, youtube)

    assert not caught.value.retryable
    assert "download the VOD again" in str(caught.value)
    assert youtube.requests == []


def test_upload_ts_file_sent_as_octet_stream(
    tmp_path: Path, youtube: YouTubeServer, make_uploader: UploaderFactory
) -> None:
    # mimetypes maps .ts to a text type on many systems, which YouTube rejects.
    path = tmp_path / "vod.ts"
    path.write_bytes(os.urandom(1000))

    upload(make_uploader(), make_job(path), youtube)

    initiate = next(r for r in youtube.requests if r.kind == "initiate")
    assert initiate.headers["X-Upload-Content-Type"] == "application/octet-stream"
    assert len(youtube.videos) == 1
    assert youtube.count("chunk") == 1


def test_upload_initiate_server_error_is_retryable(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.fail("initiate", 500)

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(), make_job(video), youtube)

    assert caught.value.retryable
    assert str(caught.value) == (
        "YouTube upload of VOD 'vod-1' failed: opening the upload session"
        " returned HTTP 500; the next attempt tries again"
    )
    assert youtube.count("initiate") == 1
    assert youtube.count("chunk") == 0


def test_upload_foreign_stored_session_not_retryable(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    # Port 9 on 127.0.0.1 is never contacted: the host check comes first.
    foreign = "http://127.0.0.1:9/upload/youtube/v3/videos?upload_id=x"

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(), make_job(video, session=foreign), youtube)

    assert not caught.value.retryable
    assert "set YOUTUBE_API_URL back" in str(caught.value)
    assert youtube.requests == []


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        pytest.param(403, "quotaExceeded", id="quota-403"),
        pytest.param(400, "uploadLimitExceeded", id="upload-limit-400"),
        pytest.param(403, "uploadLimitExceeded", id="upload-limit-403"),
    ],
)
def test_upload_daily_limit_waits_for_reset(
    youtube: YouTubeServer,
    video: Path,
    make_uploader: UploaderFactory,
    status: int,
    reason: str,
) -> None:
    youtube.fail("initiate", status, reason=reason)

    with pytest.raises(UploadQuotaExceeded) as caught:
        upload(make_uploader(), make_job(video), youtube)

    assert caught.value.retryable is True
    assert caught.value.retry_after_s is not None
    assert caught.value.retry_after_s > 60
    # A daily limit is no permission problem, so it costs no token refresh
    # and no second request.
    assert youtube.count("initiate") == 1, (
        f"HTTP {status} {reason} sent the request again before the quota wait"
    )
    assert youtube.count("token") == 1, (
        f"HTTP {status} {reason} refreshed the access token before the quota wait"
    )


def test_chunk_upload_limit_waits_for_reset(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.fail("chunk", 403, reason="uploadLimitExceeded")

    with pytest.raises(UploadQuotaExceeded) as caught:
        upload(make_uploader(), make_job(video), youtube)

    assert "the channel reached its daily upload limit" in str(caught.value)
    assert youtube.count("chunk") == 1
    assert youtube.count("token") == 1


def test_upload_rate_limit_is_not_quota(
    youtube: YouTubeServer, video: Path, make_uploader: UploaderFactory
) -> None:
    youtube.fail("initiate", 403, reason="rateLimitExceeded")

    with pytest.raises(UploadFailed) as caught:
        upload(make_uploader(), make_job(video), youtube)

    # A rate limit clears within the backoff, so its attempt counts.
    assert not isinstance(caught.value, UploadQuotaExceeded)
    assert caught.value.retryable is True


def test_quota_reset_is_next_pacific_midnight() -> None:
    # 07:00 UTC on 4 December is 23:00 the day before in Los Angeles (PST).
    now = datetime(2026, 12, 4, 7, 0, tzinfo=UTC)

    assert seconds_to_quota_reset(now) == 3600 + 60


@pytest.mark.parametrize(
    ("now", "hours_to_midnight"),
    [
        # 00:30 PDT on 7 November 2027; clocks go back an hour at 02:00, so
        # the next midnight (PST) is 24.5 hours away.
        pytest.param(datetime(2027, 11, 7, 7, 30, tzinfo=UTC), 24.5, id="dst-ends"),
        # 01:00 PST on 14 March 2027; clocks go forward an hour at 02:00, so
        # the next midnight (PDT) is 22 hours away.
        pytest.param(datetime(2027, 3, 14, 9, 0, tzinfo=UTC), 22.0, id="dst-starts"),
    ],
)
def test_quota_reset_across_daylight_saving_change(
    now: datetime, hours_to_midnight: float
) -> None:
    expected_s = hours_to_midnight * 3600 + 60

    waited_s = seconds_to_quota_reset(now)

    assert waited_s == expected_s, (
        f"the quota wait from {now.isoformat()} is {waited_s} s, not {expected_s} s;"
        " subtract the two times in UTC"
    )


# The upload stage with UPLOADER=youtube.

FINISHED = {VodState.DONE, VodState.FAILED}


def youtube_service(
    make_service: ServiceFactory, youtube: YouTubeServer, credentials: Path, **env: str
) -> Service:
    return make_service(
        UPLOADER="youtube",
        YOUTUBE_CREDENTIALS_FILE=str(credentials),
        YOUTUBE_API_URL=youtube.url,
        YOUTUBE_CHUNK_SIZE="256K",
        YOUTUBE_TIMEOUT="10s",
        UPLOAD_BACKOFF_BASE="0.05s",
        **env,
    )


def test_stage_quota_wait_counts_no_attempt(
    make_service: ServiceFactory,
    media_server: MediaServer,
    youtube: YouTubeServer,
    credentials: Path,
    db_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vodq.upload")
    data = os.urandom(FILE_BYTES)
    youtube.fail("initiate", 403, reason="quotaExceeded")
    # One attempt only: a quota wait that counted would fail the VOD.
    service = youtube_service(
        make_service, youtube, credentials, DB_DSN=db_dsn, UPLOAD_MAX_ATTEMPTS="1"
    )
    service.add_vod(NewVod(vod_id="q", url=media_server.add_file("q.mp4", data)))

    wait_for(lambda: service.queue.get("q").error_class == "upload_quota")
    waiting = service.queue.get("q")
    assert waiting.state is VodState.DOWNLOADED
    assert waiting.upload_attempts == 0
    assert waiting.upload_next_at is not None
    assert waiting.upload_next_at - service.queue.clock() > timedelta(seconds=30)
    assert str(waiting.last_error).startswith(
        "YouTube upload of VOD 'q' failed: the API quota of the Google Cloud project"
    )

    # As an operator would once the quota is raised.
    with service.engine.begin() as conn:
        conn.execute(text("UPDATE vods SET upload_next_at = NULL WHERE vod_id = 'q'"))
    stage = service.upload_stage
    assert stage is not None
    stage.wake()
    done = wait_for_state(service, "q", FINISHED)
    assert done.state is VodState.DONE, done.last_error
    assert done.upload_attempts == 1
    assert [video.data for video in youtube.videos] == [data]
    quota_logs = [
        r for r in caplog.records if getattr(r, "action", "") == "upload_quota"
    ]
    assert len(quota_logs) == 1
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_stage_records_upload_progress(
    make_service: ServiceFactory,
    media_server: MediaServer,
    youtube: YouTubeServer,
    credentials: Path,
    db_dsn: str,
) -> None:
    data = os.urandom(FILE_BYTES)
    youtube.hold_reply(after_chunks=2)
    service = youtube_service(make_service, youtube, credentials, DB_DSN=db_dsn)
    service.add_vod(NewVod(vod_id="p", url=media_server.add_file("p.mp4", data)))

    try:
        assert youtube.wait_held(20.0), "the upload never reached its second chunk"
        # The worker waits for the reply, with two chunks sent.
        wait_for(lambda: service.queue.get("p").bytes_done == 2 * CHUNK_BYTES)
        # No bytes move while the reply is held.
        wait_for(lambda: service.queue.get("p").speed_bps == 0)
        running = service.queue.get("p")
        api_vod: dict[str, Any] = Api(service).vod("p")
    finally:
        youtube.release_reply()

    assert running.state is VodState.UPLOADING
    assert running.bytes_total == FILE_BYTES
    assert api_vod["bytes_done"] == 2 * CHUNK_BYTES
    assert api_vod["progress"] == pytest.approx(2 * CHUNK_BYTES / FILE_BYTES)
    done = wait_for_state(service, "p", FINISHED)
    assert done.state is VodState.DONE, done.last_error
    assert done.bytes_done == FILE_BYTES
    assert done.speed_bps is None


def test_stage_writes_progress_per_heartbeat_not_chunk(
    make_service: ServiceFactory,
    media_server: MediaServer,
    youtube: YouTubeServer,
    credentials: Path,
) -> None:
    chunks = 32
    data = os.urandom(chunks * CHUNK_BYTES)
    service = youtube_service(make_service, youtube, credentials)
    progress_writes: list[str] = []

    def count_progress_writes(
        _conn: object, _cursor: object, statement: str, *_args: object
    ) -> None:
        # The upload store's statements that set bytes_done on an uploading
        # VOD: heartbeats, and the one that records the result.
        words = ("UPDATE vods", "bytes_done", "'uploading'")
        if all(word in statement for word in words):
            progress_writes.append(statement)

    event.listen(service.engine, "before_cursor_execute", count_progress_writes)
    try:
        service.add_vod(NewVod(vod_id="h", url=media_server.add_file("h.mp4", data)))
        done = wait_for_state(service, "h", FINISHED)
    finally:
        event.remove(service.engine, "before_cursor_execute", count_progress_writes)

    assert done.state is VodState.DONE, done.last_error
    assert youtube.count("chunk") == chunks
    assert done.upload_ms is not None
    heartbeats = done.upload_ms / 1000 / HEARTBEAT_S
    assert len(progress_writes) <= heartbeats + 2, (
        f"{len(progress_writes)} progress writes in {done.upload_ms} ms"
    )


def test_stage_cancel_then_reprocess_starts_afresh(
    make_service: ServiceFactory,
    media_server: MediaServer,
    youtube: YouTubeServer,
    credentials: Path,
    db_dsn: str,
) -> None:
    data = os.urandom(FILE_BYTES)
    youtube.hold_reply(after_chunks=2)
    # A free slot beside the stopping upload lets the stage claim the VOD
    # again while it stops. One attempt only: an attempt counted for the
    # stopping upload would fail the VOD. The lease (seconds) outlasts the
    # waits below, so that no lease expiry can hide a claim left behind.
    service = youtube_service(
        make_service,
        youtube,
        credentials,
        DB_DSN=db_dsn,
        MAX_CONCURRENT_UPLOADS="2",
        UPLOAD_MAX_ATTEMPTS="1",
        LEASE_DURATION="30s",
    )
    api = Api(service)
    service.add_vod(NewVod(vod_id="r", url=media_server.add_file("r.mp4", data)))

    try:
        assert youtube.wait_held(20.0), "the upload never reached its second chunk"
        cancel = api.post("/admin/vod/cancel", {"vod_id": "r"})
        assert cancel.status_code == 200, cancel.text
        reprocess = api.post("/admin/vod/reprocess", {"vod_id": "r"})
        assert reprocess.status_code == 200, reprocess.text
        # The reprocess wakes the stage at once, and the stage also looks for
        # uploads every POLL_INTERVAL_S, so within this wait it has looked at
        # least once while the cancelled upload still waits for its reply.
        time.sleep(POLL_INTERVAL_S + 0.5)
        while_stopping = service.queue.get("r")
    finally:
        youtube.release_reply()

    assert while_stopping.state is VodState.DOWNLOADED, (
        f"VOD r is {while_stopping.state} while its cancelled upload still stops;"
        " it must wait in downloaded until that upload has ended"
    )
    done = wait_for_state(service, "r", FINISHED, timeout_s=10.0)
    assert done.state is VodState.DONE, done.last_error
    assert done.upload_attempts == 1
    assert [video.data for video in youtube.videos] == [data]


def test_shutdown_releases_unstopped_upload(
    make_service: ServiceFactory,
    media_server: MediaServer,
    youtube: YouTubeServer,
    credentials: Path,
    db_dsn: str,
) -> None:
    data = os.urandom(FILE_BYTES)
    youtube.hold_reply(after_chunks=2)
    # One attempt only, so that a counted shutdown fails the VOD. The second
    # service is this worker restarted, so it looks for its own leases.
    worker = {"DB_DSN": db_dsn, "UPLOAD_MAX_ATTEMPTS": "1", "WORKER_ID": "restarts"}
    service = youtube_service(make_service, youtube, credentials, **worker)
    stage = service.upload_stage
    assert stage is not None
    service.add_vod(NewVod(vod_id="s", url=media_server.add_file("s.mp4", data)))

    try:
        assert youtube.wait_held(20.0), "the upload never reached its second chunk"
        # The server keeps the reply back past this stop timeout (seconds),
        # as a slow destination may keep it past the default of 10 s.
        stage.stop(timeout_s=0.5)
        stopped = service.queue.get("s")
    finally:
        youtube.release_reply()

    assert stopped.state is VodState.DOWNLOADED, (
        f"VOD s is {stopped.state} after a shutdown that its upload outlived;"
        " stop() must release the lease"
    )
    assert stopped.upload_attempts == 0, "a shutdown counted an upload attempt"
    assert stopped.lease_owner is None
    assert stage.wait_stopped("s", 10.0), "the held upload never stopped"

    restarted = youtube_service(make_service, youtube, credentials, **worker)
    done = wait_for_state(restarted, "s", FINISHED, timeout_s=10.0)
    assert done.state is VodState.DONE, done.last_error
    assert done.upload_attempts == 1
    assert [video.data for video in youtube.videos] == [data]


def given_back(caplog: pytest.LogCaptureFixture, vod_id: str) -> list[str]:
    """Return the messages of claims of ``vod_id`` that the stage gave back."""
    return [
        record.getMessage()
        for record in caplog.records
        if getattr(record, "action", "") == "upload_claim"
        and getattr(record, "vod_id", "") == vod_id
        and "given back" in record.getMessage()
    ]


def test_cancel_during_claim_releases_claim(
    make_service: ServiceFactory,
    media_server: MediaServer,
    youtube: YouTubeServer,
    credentials: Path,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vodq.upload")
    data = os.urandom(FILE_BYTES)
    youtube.hold_reply(after_chunks=2)
    service = youtube_service(
        make_service,
        youtube,
        credentials,
        DB_DSN=db_dsn,
        MAX_CONCURRENT_UPLOADS="2",
        UPLOAD_MAX_ATTEMPTS="1",
        LEASE_DURATION="30s",
    )
    stage = service.upload_stage
    assert stage is not None
    service.add_vod(NewVod(vod_id="c", url=media_server.add_file("c.mp4", data)))
    armed = threading.Event()
    raced = threading.Event()
    real_claim = stage.store.claim

    def claim_after_cancel(*args: Any, **kwargs: Any) -> Any:
        # The cancel and the reprocess land after the stage listed its
        # stopping uploads and before it claims, the narrowest timing.
        if armed.is_set() and not raced.is_set():
            service.cancel_vod("c")
            service.reprocess_vod("c")
            raced.set()
        return real_claim(*args, **kwargs)

    try:
        assert youtube.wait_held(20.0), "the upload never reached its second chunk"
        monkeypatch.setattr(stage.store, "claim", claim_after_cancel)
        armed.set()
        stage.wake()
        assert raced.wait(10.0), "the stage never looked for uploads again"
        # The stage handles the claim right after it returns. If it never
        # gives the claim back, the asserts below report which step failed.
        deadline = time.monotonic() + 5.0
        while not given_back(caplog, "c") and time.monotonic() < deadline:
            time.sleep(0.02)
        while_stopping = service.queue.get("c")
    finally:
        youtube.release_reply()

    assert while_stopping.state is VodState.DOWNLOADED, (
        f"VOD c is {while_stopping.state} while its cancelled upload still stops;"
        " the claim made during the cancel must go back"
    )
    assert given_back(caplog, "c") == [
        "claim of VOD c given back without counting an attempt because its "
        "earlier upload is still stopping in this worker"
    ]
    done = wait_for_state(service, "c", FINISHED, timeout_s=10.0)
    assert done.state is VodState.DONE, done.last_error
    assert done.upload_attempts == 1
    assert [video.data for video in youtube.videos] == [data]

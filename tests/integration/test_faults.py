"""A misbehaving server against the real scheduler and yt-dlp.

Every fault comes from the local media server. Each test counts the
requests the server received, so that a retry storm, a lost resume or an
extra download fails it. Retries are fast (DOWNLOAD_BACKOFF_BASE 0.05 s,
no cooldown), the stall timeout is 2 s, and results are read from the API's
``/vods/{id}`` where the test checks what an operator reads.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import text

from conftest import ServiceFactory, tiny_filesystem, wait_for, wait_for_state
from mediaserver import Fault, MediaServer, RequestRecord
from vodq.api.app import create_app
from vodq.bandwidth import TokenBucket
from vodq.download import DownloadJob
from vodq.download.files import ArchiveLayout
from vodq.download.validators import Sidecar, SourceValidators, write_sidecar
from vodq.download.ytdlp import YtDlpDownloader
from vodq.errors import DownloadFailed
from vodq.models import VodState
from vodq.service import NewVod, Service

KIB = 1024
FINISHED = {VodState.DONE, VodState.FAILED}
STALL_TIMEOUT_S = 2.0
FAST = {
    "DOWNLOAD_BACKOFF_BASE": "0.05s",
    "PROCESSING_RETRY_COOLDOWN": "0s",
    "DOWNLOAD_STALL_TIMEOUT": "2s",
    "CIRCUIT_FAILURE_THRESHOLD": "50",
}
NOISE = ("ERROR:", "\r", "\x1b", "[download]", "caused by")


def media(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def start(make_service: ServiceFactory, **env: str) -> Service:
    return make_service(**{**FAST, **env})


def add(service: Service, vod_id: str, url: str) -> None:
    service.add_vod(NewVod(vod_id=vod_id, url=url))


def gets(server: MediaServer, url: str) -> list[RequestRecord]:
    server.wait_idle(10)
    return [r for r in server.requests_for(url) if r.method == "GET"]


def heads(server: MediaServer, url: str) -> list[RequestRecord]:
    server.wait_idle(10)
    return [r for r in server.requests_for(url) if r.method == "HEAD"]


def range_start(record: RequestRecord) -> int | None:
    if record.range_header is None:
        return None
    return int(record.range_header.removeprefix("bytes=").split("-")[0])


def api_vod(service: Service, vod_id: str) -> dict[str, Any]:
    """GET /vods/{id} from the real app, as an operator reads it."""
    app = create_app(service, manage_lifecycle=False)

    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", trust_env=False
        ) as client:
            return await client.get(f"/vods/{vod_id}")

    response = anyio.run(fetch)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def archived(service: Service, vod_id: str) -> bytes:
    vod = service.queue.get(vod_id)
    assert vod.file_path is not None
    return Path(vod.file_path).read_bytes()


def partial_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "partial"


# -- 5xx, resets and truncated bodies: transient, retried with backoff --------


def test_server_error_retried_until_done(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(128 * KIB, seed=1)
    url = media_server.add_file("e500.mp4", data)
    media_server.script(url, [Fault.status(500), Fault.status(503)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="3")
    add(service, "e500", url)
    vod = wait_for_state(service, "e500", FINISHED)
    assert vod.state is VodState.DONE
    assert archived(service, "e500") == data
    assert [r.status for r in gets(media_server, url)] == [500, 503, 200]
    assert heads(media_server, url) == []


def test_server_error_exhausts_attempts_as_transient(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("e502.mp4", media(32 * KIB, seed=2))
    media_server.script(url, [Fault.status(502)] * 10)
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="3")
    add(service, "e502", url)
    wait_for_state(service, "e502", {VodState.FAILED})
    body = api_vod(service, "e502")
    assert body["error_class"] == "transient"
    assert body["attempts"] == 3
    assert body["last_error"].startswith("the server answered HTTP 502 Bad Gateway")
    assert body["last_error"].endswith(
        "Not retried: all 3 attempts are used; reprocess the VOD to try again"
    )
    assert "Retried with backoff" not in body["last_error"]
    assert len(gets(media_server, url)) == 3


def test_server_error_message_has_no_ytdlp_noise(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("noise.mp4", media(32 * KIB, seed=3))
    media_server.script(url, [Fault.status(500)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="1")
    add(service, "noise", url)
    wait_for_state(service, "noise", {VodState.FAILED})
    last_error = api_vod(service, "noise")["last_error"]
    for noise in NOISE:
        assert noise not in last_error, noise


def test_connection_reset_retried(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(96 * KIB, seed=4)
    url = media_server.add_file("reset.mp4", data)
    media_server.script(url, [Fault.reset()])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="3")
    add(service, "reset", url)
    vod = wait_for_state(service, "reset", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.attempts == 2
    assert archived(service, "reset") == data
    assert [r.status for r in gets(media_server, url)] == [0, 200]


def test_connection_reset_message_says_network_error(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("reset1.mp4", media(32 * KIB, seed=5))
    media_server.script(url, [Fault.reset()])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="1")
    add(service, "reset1", url)
    wait_for_state(service, "reset1", {VodState.FAILED})
    body = api_vod(service, "reset1")
    assert body["error_class"] == "transient"
    assert body["last_error"].startswith("network error")
    assert "reset" in body["last_error"].lower()
    assert len(gets(media_server, url)) == 1


def test_truncated_body_resumes_from_partial(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(512 * KIB, seed=6)
    url = media_server.add_file("cut.mp4", data)
    media_server.script(url, [Fault.truncate(200 * KIB)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="3")
    add(service, "cut", url)
    vod = wait_for_state(service, "cut", FINISHED)
    assert vod.state is VodState.DONE
    assert archived(service, "cut") == data
    requests = gets(media_server, url)
    assert len(requests) == 2
    offset = range_start(requests[1])
    assert offset is not None
    assert 0 < offset <= 200 * KIB
    # One HEAD checks the validators before the resume.
    assert len(heads(media_server, url)) == 1


def test_truncated_body_message(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("cut1.mp4", media(256 * KIB, seed=7))
    media_server.script(url, [Fault.truncate(64 * KIB)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="1")
    add(service, "cut1", url)
    wait_for_state(service, "cut1", {VodState.FAILED})
    body = api_vod(service, "cut1")
    assert body["error_class"] == "transient"
    assert body["last_error"].startswith(
        "the server closed the connection before the end of the file"
    )
    assert len(gets(media_server, url)) == 1


# -- 429: rate limited, the server's Retry-After honoured ---------------------


def test_rate_limited_waits_retry_after(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(64 * KIB, seed=8)
    url = media_server.add_file("slowdown.mp4", data)
    media_server.script(url, [Fault.too_many(2)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="3")
    add(service, "slowdown", url)
    vod = wait_for_state(service, "slowdown", FINISHED)
    assert vod.state is VodState.DONE
    assert archived(service, "slowdown") == data
    first, second = gets(media_server, url)
    assert first.status == 429
    # The backoff alone would wait 0.025 to 0.05 s.
    assert second.started - first.started >= 2.0


def test_rate_limited_class_and_message(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("limit.mp4", media(32 * KIB, seed=9))
    media_server.script(url, [Fault.too_many(30)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="1")
    add(service, "limit", url)
    wait_for_state(service, "limit", {VodState.FAILED})
    body = api_vod(service, "limit")
    assert body["error_class"] == "rate_limited"
    assert body["last_error"].startswith(
        "rate limited: the server answered HTTP 429 Too Many Requests"
    )
    assert "asked to wait 30s" in body["last_error"]
    assert len(gets(media_server, url)) == 1


def test_rate_limited_retry_scheduled_after_retry_after(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("later.mp4", media(32 * KIB, seed=10))
    media_server.script(url, [Fault.too_many(120)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="3")
    add(service, "later", url)
    wait_for(lambda: service.queue.get("later").attempts == 1)
    vod = service.queue.get("later")
    assert vod.state is VodState.QUEUED
    assert vod.next_attempt_at is not None
    assert vod.updated_at is not None
    assert (vod.next_attempt_at - vod.updated_at).total_seconds() >= 119.0
    assert len(gets(media_server, url)) == 1


def _run_downloader(tmp_path: Path, vod_id: str, url: str) -> DownloadFailed:
    downloader = YtDlpDownloader(
        ArchiveLayout(tmp_path / "dl"), socket_timeout_s=STALL_TIMEOUT_S
    )
    job = DownloadJob(vod_id=vod_id, source_url=url, attempt=1)
    with pytest.raises(DownloadFailed) as raised:
        downloader.download(
            job,
            on_progress=lambda _progress: None,
            cancelled=threading.Event(),
            bucket=TokenBucket(None),
        )
    return raised.value


def test_retry_after_of_direct_download(
    media_server: MediaServer, tmp_path: Path
) -> None:
    url = media_server.add_file("ra1.mp4", media(32 * KIB, seed=11))
    media_server.script(url, [Fault.too_many(7)])
    failure = _run_downloader(tmp_path, "ra1", url)
    assert failure.error_class == "rate_limited"
    assert failure.retry_after_s == 7.0


def test_retry_after_of_extraction(media_server: MediaServer, tmp_path: Path) -> None:
    # No media extension: the generic extractor requests the page first.
    url = media_server.add_file("ra2", media(32 * KIB, seed=12))
    media_server.script(url, [Fault.too_many(8)])
    failure = _run_downloader(tmp_path, "ra2", url)
    assert failure.error_class == "rate_limited"
    assert failure.retry_after_s == 8.0


def test_retry_after_of_hls_fragment(media_server: MediaServer, tmp_path: Path) -> None:
    url = media_server.add_hls("ra3", [media(16 * KIB, seed=13 + i) for i in range(3)])
    media_server.script("/hls/ra3/seg1.ts", [Fault.too_many(9)])
    failure = _run_downloader(tmp_path, "ra3", url)
    assert failure.error_class == "rate_limited"
    assert failure.retry_after_s == 9.0


# -- 401, 403, 404, 410 and unsupported URLs: not retried ---------------------


@pytest.mark.parametrize(
    ("code", "error_class", "start_of_message"),
    [
        pytest.param(
            401, "needs_auth", "the server answered HTTP 401 Unauthorized", id="401"
        ),
        pytest.param(
            403, "needs_auth", "the server answered HTTP 403 Forbidden", id="403"
        ),
        pytest.param(404, "gone", "the server answered HTTP 404 Not Found", id="404"),
        pytest.param(410, "gone", "the server answered HTTP 410 Gone", id="410"),
    ],
)
def test_permanent_status_not_retried(
    make_service: ServiceFactory,
    media_server: MediaServer,
    code: int,
    error_class: str,
    start_of_message: str,
) -> None:
    url = media_server.add_file(f"p{code}.mp4", media(32 * KIB, seed=code))
    media_server.script(url, [Fault.status(code)] * 5)
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="5")
    add(service, f"p{code}", url)
    wait_for_state(service, f"p{code}", {VodState.FAILED})
    body = api_vod(service, f"p{code}")
    assert body["error_class"] == error_class
    assert body["attempts"] == 1
    assert body["last_error"].startswith(start_of_message)
    assert "Not retried" in body["last_error"]
    assert len(gets(media_server, url)) == 1


def test_forbidden_does_not_count_against_breaker(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = start(make_service, CIRCUIT_FAILURE_THRESHOLD="2")
    for index in range(3):
        url = media_server.add_file(f"f{index}.mp4", media(8 * KIB, seed=index))
        media_server.script(url, [Fault.status(403)])
        add(service, f"f{index}", url)
    for index in range(3):
        wait_for_state(service, f"f{index}", {VodState.FAILED})
    assert service.status()["circuit_failures"] == 0


@pytest.mark.slow
def test_unsupported_url_not_retried(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file(
        "page.html",
        b"<html><body>no video here</body></html>",
        content_type="text/html",
    )
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="5")
    add(service, "page", url)
    wait_for_state(service, "page", {VodState.FAILED})
    body = api_vod(service, "page")
    assert body["error_class"] == "unsupported"
    assert body["last_error"].startswith("unsupported URL")
    assert len(gets(media_server, url)) == 1


# -- stalls ---------------------------------------------------------------------


@pytest.mark.slow
def test_stall_fails_within_stall_timeout(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("stall1.mp4", media(512 * KIB, seed=14))
    media_server.script(url, [Fault.stall(30, after_bytes=128 * KIB)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="1")
    add(service, "stall1", url)
    wait_for_state(service, "stall1", {VodState.FAILED}, timeout_s=30)
    body = api_vod(service, "stall1")
    assert body["error_class"] == "transient"
    assert body["last_error"].startswith(
        "download stalled: the server sent no data for 2s"
    )
    (stalled,) = gets(media_server, url)
    assert stalled.finished is not None
    # Closed by the client after the 2 s read timeout, long before the 30 s stall.
    assert STALL_TIMEOUT_S - 0.5 <= stalled.finished - stalled.started <= 8.0


@pytest.mark.slow
def test_stall_retry_resumes_from_partial(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(512 * KIB, seed=15)
    url = media_server.add_file("stall2.mp4", data)
    media_server.script(url, [Fault.stall(30, after_bytes=256 * KIB)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="3")
    add(service, "stall2", url)
    vod = wait_for_state(service, "stall2", FINISHED, timeout_s=30)
    assert vod.state is VodState.DONE
    assert archived(service, "stall2") == data
    first, second = gets(media_server, url)
    offset = range_start(second)
    assert offset is not None
    assert 0 < offset <= 256 * KIB
    assert first.bytes_sent + second.bytes_sent < len(data) + 256 * KIB


# -- HLS: never done with a fragment missing ------------------------------------


def test_hls_fragment_error_then_done_equals_segments(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    segments = [media(64 * KIB, seed=20 + i) for i in range(5)]
    url = media_server.add_hls("frag", segments)
    media_server.script("/hls/frag/seg2.ts", [Fault.status(500)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="3")
    add(service, "frag", url)
    vod = wait_for_state(service, "frag", FINISHED)
    assert vod.state is VodState.DONE
    assert archived(service, "frag") == b"".join(segments)
    assert [r.status for r in gets(media_server, "/hls/frag/seg2.ts")] == [500, 200]
    # Resumed from the fragment index: the earlier segments are not fetched again.
    assert len(gets(media_server, "/hls/frag/seg0.ts")) == 1
    assert len(gets(media_server, "/hls/frag/seg1.ts")) == 1


def test_hls_fragment_never_served_not_done(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    segments = [media(32 * KIB, seed=30 + i) for i in range(4)]
    url = media_server.add_hls("hole", segments)
    media_server.script("/hls/hole/seg2.ts", [Fault.status(500)] * 10)
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="2")
    add(service, "hole", url)
    vod = wait_for_state(service, "hole", FINISHED)
    assert vod.state is VodState.FAILED
    assert vod.file_path is None
    assert list((tmp_path / "data" / "vods").iterdir()) == []
    assert len(gets(media_server, "/hls/hole/seg2.ts")) == 2
    # Fetched beside seg2 by another fragment thread, at most once an attempt.
    assert len(gets(media_server, "/hls/hole/seg3.ts")) <= 2


def test_hls_stray_fragment_removed_before_resume(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    segments = [media(32 * KIB, seed=40 + i) for i in range(3)]
    url = media_server.add_hls("stray", segments)
    partial = partial_dir(tmp_path)
    partial.mkdir(parents=True)
    stray = partial / "stray.mp4.part-Frag2"
    stray.write_bytes(b"left by an interrupted download")
    service = start(make_service)
    add(service, "stray", url)
    vod = wait_for_state(service, "stray", FINISHED)
    assert vod.state is VodState.DONE
    assert archived(service, "stray") == b"".join(segments)
    assert not stray.exists()
    assert len(gets(media_server, "/hls/stray/seg2.ts")) == 1


# -- resume safety ----------------------------------------------------------------


def _fail_once_with_partial(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path, name: str
) -> tuple[Service, str]:
    """Start VOD ``name``, cut its body so that a partial file stays, and stop."""
    url = media_server.url(f"/files/{name}.mp4")
    # More than one read block (128 KiB), so that a block reaches the file.
    media_server.script(url, [Fault.truncate(200 * KIB)])
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="1")
    add(service, name, url)
    wait_for_state(service, name, {VodState.FAILED})
    assert (partial_dir(tmp_path) / f"{name}.mp4.part").stat().st_size > 0
    return service, url


@pytest.mark.parametrize(
    "change",
    [
        pytest.param("bytes", id="etag-and-date"),
        pytest.param("size", id="size"),
        pytest.param("date", id="last-modified-only"),
    ],
)
def test_resume_source_changed_starts_over(
    make_service: ServiceFactory,
    media_server: MediaServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    old = media(256 * KIB, seed=50)
    media_server.add_file("changed.mp4", old)
    service, url = _fail_once_with_partial(
        make_service, media_server, tmp_path, "changed"
    )
    if change == "bytes":
        new = media(256 * KIB, seed=51)
        media_server.replace_file("changed.mp4", new)
    elif change == "size":
        new = media(300 * KIB, seed=52)
        media_server.replace_file("changed.mp4", new)
    else:
        # The same bytes and ETag, only a later Last-Modified.
        new = old
        etag = _sidecar(tmp_path, "changed")["etag"]
        media_server.replace_file("changed.mp4", old, etag=etag)
    caplog.set_level(logging.WARNING, logger="vodq.download.ytdlp")
    service.reprocess_vod("changed")
    vod = wait_for_state(service, "changed", FINISHED)
    assert vod.state is VodState.DONE
    assert archived(service, "changed") == new
    _, second = gets(media_server, url)
    assert range_start(second) is None
    assert len(heads(media_server, url)) == 1
    assert "not resuming its partial files" in caplog.text


def _sidecar(tmp_path: Path, stem: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (partial_dir(tmp_path) / f"{stem}.vodq.json").read_text()
    )
    return data


def test_resume_source_unchanged_resumes(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    data = media(256 * KIB, seed=53)
    media_server.add_file("same.mp4", data)
    service, url = _fail_once_with_partial(make_service, media_server, tmp_path, "same")
    service.reprocess_vod("same")
    vod = wait_for_state(service, "same", FINISHED)
    assert vod.state is VodState.DONE
    assert archived(service, "same") == data
    _, second = gets(media_server, url)
    offset = range_start(second)
    assert offset is not None
    assert offset > 0


def test_resume_source_url_changed_starts_over(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    media_server.add_file("first.mp4", media(256 * KIB, seed=54))
    other = media(128 * KIB, seed=55)
    other_url = media_server.add_file("second.mp4", other)
    service, _ = _fail_once_with_partial(make_service, media_server, tmp_path, "first")
    with service.engine.begin() as conn:
        conn.execute(
            text("UPDATE vods SET source_url = :url WHERE vod_id = 'first'"),
            {"url": other_url},
        )
    service.reprocess_vod("first")
    vod = wait_for_state(service, "first", FINISHED)
    assert vod.state is VodState.DONE
    assert archived(service, "first") == other
    (only,) = gets(media_server, other_url)
    assert range_start(only) is None


def test_resume_sidecar_written_next_to_partial(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    media_server.add_file("car.mp4", media(256 * KIB, seed=56))
    _, url = _fail_once_with_partial(make_service, media_server, tmp_path, "car")
    sidecar = json.loads((partial_dir(tmp_path) / "car.vodq.json").read_text())
    assert sidecar["vod_id"] == "car"
    assert sidecar["source_url"] == url
    assert sidecar["size"] == 256 * KIB
    assert sidecar["etag"].startswith('"')


def test_resume_sidecar_removed_when_done(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    url = media_server.add_file("tidy.mp4", media(64 * KIB, seed=57))
    service = start(make_service)
    add(service, "tidy", url)
    wait_for_state(service, "tidy", FINISHED)
    assert list(partial_dir(tmp_path).iterdir()) == []


def test_resume_sidecar_removed_when_failed_before_data(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    url = media_server.add_file("denied.mp4", media(64 * KIB, seed=62))
    media_server.script(url, [Fault.status(403)])
    service = start(make_service)
    add(service, "denied", url)
    wait_for_state(service, "denied", {VodState.FAILED})
    assert list(partial_dir(tmp_path).iterdir()) == []


def test_complete_part_answering_416_restarts_once(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    data = media(200 * KIB, seed=58)
    url = media_server.add_file("whole.mp4", data)
    partial = partial_dir(tmp_path)
    partial.mkdir(parents=True)
    (partial / "whole.mp4.part").write_bytes(data)
    service = start(make_service)
    add(service, "whole", url)
    vod = wait_for_state(service, "whole", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.attempts == 1
    assert archived(service, "whole") == data
    # yt-dlp requests the range past the end twice, then vodq starts over.
    assert [r.status for r in gets(media_server, url)] == [416, 416, 200]


# -- completion: only a complete file is done -------------------------------------


def test_size_mismatch_keeps_vod_out_of_done(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    data = media(128 * KIB, seed=59)
    url = media_server.add_file("size.mp4", data)
    layout = ArchiveLayout(tmp_path / "data")
    layout.ensure()
    # A finished-looking file one byte short, as a crash before the archive
    # step could leave: yt-dlp takes it as already downloaded.
    (layout.partial_dir / "size.mp4").write_bytes(data[:-1])
    write_sidecar(
        layout.sidecar_path("size"),
        Sidecar("size", url, SourceValidators(size=len(data))),
    )
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="1")
    add(service, "size", url)
    wait_for_state(service, "size", {VodState.FAILED})
    body = api_vod(service, "size")
    assert body["error_class"] == "incomplete"
    assert body["last_error"].startswith("incomplete download: size.mp4 has 131071")
    assert list(layout.archive_dir.iterdir()) == []
    assert gets(media_server, url) == []


def test_size_mismatch_next_attempt_downloads_again(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    data = media(128 * KIB, seed=60)
    url = media_server.add_file("size2.mp4", data)
    layout = ArchiveLayout(tmp_path / "data")
    layout.ensure()
    (layout.partial_dir / "size2.mp4").write_bytes(data[:-1])
    write_sidecar(
        layout.sidecar_path("size2"),
        Sidecar("size2", url, SourceValidators(size=len(data))),
    )
    service = start(make_service, DOWNLOAD_MAX_ATTEMPTS="2")
    add(service, "size2", url)
    vod = wait_for_state(service, "size2", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.attempts == 2
    assert archived(service, "size2") == data
    assert len(gets(media_server, url)) == 1


# -- disk full ---------------------------------------------------------------------


def grow_filesystem(path: Path, size: str) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=30
    )


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    with tiny_filesystem(tmp_path / f"small-{uuid.uuid4().hex[:6]}", "2m") as path:
        yield path


@pytest.mark.slow
def test_disk_full_fails_as_disk_full_and_waits_for_space(
    make_service: ServiceFactory,
    media_server: MediaServer,
    tmp_path: Path,
    small_data_dir: Path,
) -> None:
    data = media(3 * 1024 * KIB, seed=61)
    url = media_server.add_file("big.mp4", data)
    service = start(
        make_service,
        DATA_DIR=str(small_data_dir),
        DB_DSN=f"sqlite:///{tmp_path / 'disk.db'}",
        MIN_FREE_DISK="512K",
        DOWNLOAD_MAX_ATTEMPTS="3",
        CIRCUIT_FAILURE_THRESHOLD="1",
    )
    add(service, "big", url)
    wait_for(lambda: service.queue.get("big").attempts == 1, timeout_s=30)
    body = api_vod(service, "big")
    assert body["error_class"] == "disk_full"
    assert body["last_error"].startswith("disk full")
    assert service.status()["circuit_failures"] == 0
    part = small_data_dir / "partial" / "big.mp4.part"
    assert part.stat().st_size > 1024 * KIB

    # Below MIN_FREE_DISK nothing new starts, however often the loop polls.
    time.sleep(3.0)
    assert service.queue.get("big").attempts == 1
    assert service.queue.get("big").state is VodState.QUEUED
    assert len(gets(media_server, url)) == 1

    grow_filesystem(small_data_dir, "8m")
    vod = wait_for_state(service, "big", FINISHED, timeout_s=30)
    assert vod.state is VodState.DONE
    assert archived(service, "big") == data
    _, second = gets(media_server, url)
    offset = range_start(second)
    assert offset is not None
    assert offset > 1024 * KIB


def test_disk_full_oserror_classified(tmp_path: Path) -> None:
    # The errno yt-dlp's write error carries, from a real write to a full disk.
    with (
        tiny_filesystem(tmp_path / "full", "64k") as path,
        pytest.raises(OSError) as raised,
    ):
        (path / "x").write_bytes(b"\0" * 256 * KIB)
    assert raised.value.errno == errno.ENOSPC

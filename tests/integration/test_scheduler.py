"""The scheduler end to end: real yt-dlp downloading from the local media server."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import ServiceFactory, wait_for, wait_for_state
from mediaserver import Fault, MediaServer
from vodq.models import VodState
from vodq.service import NewVod, Service

FINISHED = {VodState.DONE, VodState.FAILED}
KIB = 1024


def media(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def add_url(service: Service, vod_id: str, url: str, **fields: object) -> None:
    service.add_vod(NewVod(vod_id=vod_id, url=url, **fields))  # type: ignore[arg-type]


def body_requests(server: MediaServer, url: str) -> list[object]:
    """GETs of ``url`` that transferred media bytes (the probe reads only headers)."""
    return [
        r for r in server.requests_for(url) if r.method == "GET" and r.bytes_sent > 0
    ]


def start_order(service: Service, vod_ids: list[str]) -> list[str]:
    vods = [service.queue.get(vod_id) for vod_id in vod_ids]
    return [vod.vod_id for vod in sorted(vods, key=lambda vod: vod.started_at)]


def test_download_file_equals_source(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(700 * KIB, seed=1)
    url = media_server.add_file("one.mp4", data)
    service = make_service()
    add_url(service, "one", url)
    vod = wait_for_state(service, "one", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.processed is True
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == data
    assert vod.bytes_done == len(data)


def test_download_hls_equals_segments(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    segments = [media(150 * KIB, seed=10 + index) for index in range(5)]
    url = media_server.add_hls("stream", segments)
    service = make_service()
    add_url(service, "hls", url)
    vod = wait_for_state(service, "hls", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == b"".join(segments)


def test_file_name_cannot_escape_data_dir(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    url = media_server.add_file("escape.mp4", media(64 * KIB, seed=2))
    service = make_service()
    service.add_vod(NewVod(vod_id="x..y", url=url))
    vod = wait_for_state(service, "x..y", FINISHED)
    assert vod.file_path is not None
    assert Path(vod.file_path).parent == (tmp_path / "data" / "vods").absolute()
    assert Path(vod.file_path).name == "undated - [x..y].mp4"


def test_priority_order_with_one_slot(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    dsn = f"sqlite:///{tmp_path / 'order.db'}"
    api = make_service(run_worker=False, DB_DSN=dsn)
    vods = [
        ("low", -10, "2024-01-01"),
        ("mid-new", 0, "2024-03-01"),
        ("mid-old", 0, "2024-02-01"),
        ("top", 100, "2024-06-01"),
    ]
    for vod_id, priority, date in vods:
        url = media_server.add_file(f"{vod_id}.mp4", media(64 * KIB, seed=priority))
        add_url(api, vod_id, url, priority=priority, date=date)
    worker = make_service(DB_DSN=dsn, MAX_CONCURRENT_DOWNLOADS="1")
    for vod_id, _, _ in vods:
        wait_for_state(worker, vod_id, FINISHED)
    assert start_order(worker, [v[0] for v in vods]) == [
        "top",
        "mid-old",
        "mid-new",
        "low",
    ]


def test_bump_takes_next_free_slot(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(MAX_CONCURRENT_DOWNLOADS="1")
    slow = media_server.add_file("slow.mp4", media(300 * KIB, seed=3), rate=300 * KIB)
    add_url(service, "slow", slow, priority=10)
    wait_for(lambda: service.queue.get("slow").state is VodState.DOWNLOADING)
    for vod_id, date in (
        ("first", "2024-01-01"),
        ("second", "2024-01-02"),
        ("late", "2024-09-01"),
    ):
        url = media_server.add_file(f"{vod_id}.mp4", media(32 * KIB, seed=len(vod_id)))
        add_url(service, vod_id, url, date=date)
    service.set_priority("late", 1000)
    for vod_id in ("slow", "first", "second", "late"):
        wait_for_state(service, vod_id, FINISHED)
    assert start_order(service, ["slow", "first", "second", "late"]) == [
        "slow",
        "late",
        "first",
        "second",
    ]


def test_three_slots_overlap_and_fourth_waits(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(MAX_CONCURRENT_DOWNLOADS="3")
    urls = {
        f"v{index}": media_server.add_file(
            f"v{index}.mp4", media(400 * KIB, seed=20 + index), rate=400 * KIB
        )
        for index in range(4)
    }
    for vod_id, url in urls.items():
        add_url(service, vod_id, url)
    for vod_id in urls:
        wait_for_state(service, vod_id, FINISHED, timeout_s=30)
    assert media_server.max_concurrent("/files/") == 3
    vods = sorted((service.queue.get(v) for v in urls), key=lambda v: v.started_at)
    first_finish = min(v.finished_at for v in vods[:3])
    assert vods[3].started_at >= first_finish


def test_each_vod_downloaded_once(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(MAX_CONCURRENT_DOWNLOADS="3")
    urls = {}
    for index in range(8):
        data = media(96 * KIB, seed=40 + index)
        urls[f"v{index}"] = (media_server.add_file(f"once{index}.mp4", data), len(data))
    for vod_id, (url, _) in urls.items():
        add_url(service, vod_id, url)
        add_url(service, vod_id, url)
    for vod_id in urls:
        wait_for_state(service, vod_id, FINISHED, timeout_s=30)
    for vod_id, (url, size) in urls.items():
        full = [r for r in body_requests(media_server, url) if r.bytes_sent == size]
        assert len(full) == 1, vod_id
        assert service.queue.get(vod_id).attempts == 1


def test_server_errors_retried_then_succeed(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(128 * KIB, seed=5)
    url = media_server.add_file("flaky.mp4", data)
    media_server.script(url, [Fault.status(500), Fault.status(500)])
    service = make_service(DOWNLOAD_BACKOFF_BASE="0.2s")
    add_url(service, "flaky", url)
    vod = wait_for_state(service, "flaky", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.attempts == 3
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == data
    statuses = [r.status for r in media_server.requests_for(url) if r.method == "GET"]
    assert statuses[:2] == [500, 500]
    assert statuses.count(500) == 2


def test_server_errors_back_off_between_attempts(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("backoff.mp4", media(32 * KIB, seed=6))
    media_server.script(url, [Fault.status(503), Fault.status(503)])
    service = make_service(DOWNLOAD_BACKOFF_BASE="0.4s")
    add_url(service, "backoff", url)
    wait_for_state(service, "backoff", FINISHED)
    failures = [r for r in media_server.requests_for(url) if r.status == 503]
    following = [
        r for r in media_server.requests_for(url) if r.started > failures[1].started
    ]
    first_gap = failures[1].started - failures[0].started
    second_gap = following[0].started - failures[1].started
    # Attempt n waits half to all of base * 2**(n-1): 0.2-0.4 s, then 0.4-0.8 s.
    assert first_gap >= 0.2
    assert second_gap >= 0.4


def test_not_found_fails_without_retry(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.url("/files/missing.mp4")
    service = make_service(DOWNLOAD_MAX_ATTEMPTS="5")
    add_url(service, "missing", url)
    vod = wait_for_state(service, "missing", FINISHED)
    assert vod.state is VodState.FAILED
    assert vod.error_class == "gone"
    assert vod.last_error is not None
    assert "404" in vod.last_error
    assert vod.attempts == 1
    assert len(media_server.requests_for(url)) == 1


def test_attempts_exhausted_stays_failed(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("broken.mp4", media(32 * KIB, seed=7))
    media_server.script(url, [Fault.status(500)] * 10)
    service = make_service(DOWNLOAD_MAX_ATTEMPTS="3", DOWNLOAD_BACKOFF_BASE="0.05s")
    add_url(service, "broken", url)
    vod = wait_for_state(service, "broken", {VodState.FAILED})
    assert vod.attempts == 3
    assert vod.error_class == "transient"
    assert len(media_server.requests_for(url)) == 3


def test_unexpected_client_error_not_retried(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    url = media_server.add_file("odd.mp4", media(32 * KIB, seed=8))
    media_server.script(url, [Fault.status(418)])
    service = make_service()
    add_url(service, "odd", url)
    vod = wait_for_state(service, "odd", FINISHED)
    assert vod.state is VodState.FAILED
    assert vod.error_class == "http_error"
    assert len(media_server.requests_for(url)) == 1


def test_truncated_download_resumes_with_range(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(512 * KIB, seed=9)
    url = media_server.add_file("cut.mp4", data)
    media_server.script(url, [Fault.truncate(200 * KIB)])
    service = make_service()
    add_url(service, "cut", url)
    vod = wait_for_state(service, "cut", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.attempts == 2
    resumed = body_requests(media_server, url)[-1].range_header
    # yt-dlp keeps what it wrote before the cut: whole read blocks, so the
    # resume offset is above zero and at most the bytes that were sent.
    assert resumed is not None
    offset = int(resumed.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 200 * KIB
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == data


def test_partial_file_from_earlier_run_resumes(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    data = media(400 * KIB, seed=11)
    url = media_server.add_file("earlier.mp4", data)
    partial = tmp_path / "data" / "partial"
    partial.mkdir(parents=True)
    (partial / "earlier.mp4.part").write_bytes(data[: 100 * KIB])
    service = make_service()
    add_url(service, "earlier", url)
    vod = wait_for_state(service, "earlier", FINISHED)
    ranges = [r.range_header for r in body_requests(media_server, url)]
    assert "bytes=102400-" in ranges
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == data


def test_sql_priority_change_without_restart(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(MAX_CONCURRENT_DOWNLOADS="1")
    slow = media_server.add_file("hold.mp4", media(300 * KIB, seed=12), rate=300 * KIB)
    add_url(service, "hold", slow, priority=10)
    wait_for(lambda: service.queue.get("hold").state is VodState.DOWNLOADING)
    for vod_id, date in (("sept", "2024-09-15"), ("oct", "2024-10-15")):
        url = media_server.add_file(f"{vod_id}.mp4", media(32 * KIB, seed=len(vod_id)))
        add_url(service, vod_id, url, date=date)
    with service.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE vods SET priority = 50 WHERE date >= '2024-10-01' "
                "AND date < '2024-11-01' AND processed = false"
            )
        )
    for vod_id in ("hold", "sept", "oct"):
        wait_for_state(service, vod_id, FINISHED)
    assert start_order(service, ["hold", "sept", "oct"]) == ["hold", "oct", "sept"]


def test_sql_insert_picked_up_by_poll(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service()
    url = media_server.add_file("sql.mp4", media(32 * KIB, seed=13))
    now = "2026-01-01 00:00:00"
    with service.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO vods (vod_id, source_url, priority, state, created_at, "
                "updated_at) VALUES ('sql', :url, 0, 'queued', :now, :now)"
            ),
            {"url": url, "now": now},
        )
    vod = wait_for_state(service, "sql", FINISHED, timeout_s=10)
    assert vod.state is VodState.DONE


def test_progress_recorded_while_running(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    size = 600 * KIB
    url = media_server.add_file("progress.mp4", media(size, seed=14), rate=300 * KIB)
    service = make_service()
    add_url(service, "progress", url)
    wait_for(lambda: 0 < service.queue.get("progress").bytes_done < size, timeout_s=10)
    running = service.queue.get("progress")
    assert running.state is VodState.DOWNLOADING
    assert running.bytes_total == size
    wait_for_state(service, "progress", FINISHED)


def test_rate_limit_slows_download(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    size = 512 * KIB
    url = media_server.add_file("limited.mp4", media(size, seed=15))
    service = make_service(DOWNLOAD_RATE_LIMIT="512K")
    add_url(service, "limited", url)
    vod = wait_for_state(service, "limited", FINISHED)
    assert vod.state is VodState.DONE
    # 512 KiB at 512 KiB/s minus the bucket's quarter-second burst.
    assert vod.download_ms is not None
    assert vod.download_ms >= 600


def test_shutdown_keeps_partial_for_resume(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    data = media(600 * KIB, seed=16)
    url = media_server.add_file("stop.mp4", data, rate=200 * KIB)
    dsn = f"sqlite:///{tmp_path / 'stop.db'}"
    first = make_service(DB_DSN=dsn)
    add_url(first, "stop", url)
    wait_for(lambda: first.queue.get("stop").bytes_done > 100 * KIB, timeout_s=10)
    first.stop()
    stopped = first.queue.get("stop")
    assert stopped.state is VodState.QUEUED
    assert stopped.attempts == 0
    assert os.path.getsize(tmp_path / "data" / "partial" / "stop.mp4.part") > 0

    media_server.set_rate(url, None)
    second = make_service(DB_DSN=dsn)
    vod = wait_for_state(second, "stop", FINISHED)
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == data
    resumed = body_requests(media_server, url)[-1]
    assert resumed.range_header is not None


@pytest.mark.postgres
def test_download_on_postgres(
    postgres_dsn: str, make_service: ServiceFactory, media_server: MediaServer
) -> None:
    data = media(200 * KIB, seed=17)
    url = media_server.add_file("pg.mp4", data)
    service = make_service(DB_DSN=postgres_dsn, MAX_CONCURRENT_DOWNLOADS="2")
    add_url(service, "pg", url)
    vod = wait_for_state(service, "pg", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == data


def test_claim_fault_keeps_scheduler_running(
    make_service: ServiceFactory,
    media_server: MediaServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = make_service()
    claim = service.queue.claim
    calls = []

    def failing_once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a fault the scheduler does not expect")
        return claim(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service.queue, "claim", failing_once)
    # The fault first, then the VOD, because a claim already running when the
    # patch was applied could otherwise take the VOD without the patched call.
    wait_for(lambda: len(calls) >= 1, timeout_s=10)
    add_url(service, "after", media_server.add_file("after.mp4", media(64 * KIB, 2)))
    vod = wait_for_state(service, "after", FINISHED, timeout_s=30)
    assert len(calls) >= 2
    assert vod.state is VodState.DONE

"""Admin operations over the real app: cancel, reprocess, pause, priority, delete.

Requests go through ``httpx.ASGITransport`` from a loopback peer, which the
admin guard lets in when no credentials are configured. Downloads run with the
real yt-dlp against the local media server. Throttled files keep a download
running while an operation acts on it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import ServiceFactory, wait_for, wait_for_state
from mediaserver import MediaServer, RequestRecord
from vodq.api.app import create_app
from vodq.models import VodState
from vodq.service import MAX_BATCH_IDS, Service

KIB = 1024
FINISHED = {VodState.DONE, VodState.FAILED}
LOOPBACK = ("127.0.0.1", 5000)
# A size and server rate that keep a download running for about four seconds.
SLOW_SIZE = 600 * KIB
SLOW_RATE = 150 * KIB
# Maximum time from an admin call until the media server records the end of
# the transfer.
STOP_WITHIN_S = 2.0
# Never fetched: the services that use it run no worker.
UNUSED_URL = "http://127.0.0.1:9/files/{}.mp4"


def media(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Api:
    """The real app of ``service``, called in process from a loopback client."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.app = create_app(service, manage_lifecycle=False)

    def request(
        self, method: str, path: str, body: Any = None, **params: Any
    ) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, client=LOOPBACK)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", trust_env=False
            ) as client:
                return await client.request(
                    method, path, json=body, params=params or None
                )

        return anyio.run(send)

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return self.request("POST", path, body)

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def delete(self, path: str, **params: Any) -> httpx.Response:
        return self.request("DELETE", path, **params)

    def add(self, vod_id: str, url: str, **fields: Any) -> httpx.Response:
        return self.post("/admin/vods", {"vod_id": vod_id, "url": url, **fields})

    def vod(self, vod_id: str) -> dict[str, Any]:
        response = self.get(f"/vods/{vod_id}")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data


def gets(server: MediaServer, url: str) -> list[RequestRecord]:
    return [r for r in server.requests_for(url) if r.method == "GET"]


def body_requests(server: MediaServer, url: str) -> list[RequestRecord]:
    return [r for r in gets(server, url) if r.bytes_sent > 0]


def wait_for_transfer(server: MediaServer, url: str) -> None:
    """Wait until the server has sent the first body bytes of ``url``."""
    wait_for(lambda: bool(body_requests(server, url)), timeout_s=10)


def transfer_end(server: MediaServer, url: str) -> float:
    """Wait until no GET of ``url`` is in flight, then return when the last ended."""
    wait_for(lambda: server.active(url) == 0, timeout_s=10)
    ends = [r.finished for r in gets(server, url) if r.finished is not None]
    return max(ends)


def settle(service: Service) -> None:
    """Wait until the download threads of ``service`` have all ended."""
    assert service.scheduler is not None
    scheduler = service.scheduler
    wait_for(lambda: not scheduler.running(), timeout_s=10)


def partial_file(tmp_path: Path, vod_id: str) -> Path:
    return tmp_path / "data" / "partial" / f"{vod_id}.mp4.part"


def failed_total(api: Api) -> float:
    lines = api.get("/metrics").text.splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("vod_downloads_failed_total")
    )


def start_slow(
    api: Api, server: MediaServer, vod_id: str, seed: int
) -> tuple[str, bytes]:
    """Queue a throttled VOD and wait until its body is being transferred."""
    data = media(SLOW_SIZE, seed=seed)
    url = server.add_file(f"{vod_id}.mp4", data, rate=SLOW_RATE)
    assert api.add(vod_id, url).status_code == 201
    wait_for_transfer(server, url)
    return url, data


# -- cancel ------------------------------------------------------------------


def test_cancel_running_download_stops_transfer(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    api = Api(make_service())
    url, _ = start_slow(api, media_server, "running", seed=1)
    failed_before = failed_total(api)
    called = time.monotonic()
    response = api.post("/admin/vod/cancel", {"vod_id": "running"})
    ended = transfer_end(media_server, url)
    settle(api.service)
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert ended - called < STOP_WITHIN_S
    assert body_requests(media_server, url)[-1].bytes_sent < SLOW_SIZE
    vod = api.vod("running")
    assert vod["state"] == "cancelled"
    assert vod["attempts"] == 0
    assert partial_file(tmp_path, "running").stat().st_size > 0
    assert failed_total(api) == failed_before


def test_cancel_records_partial_file_size(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    api = Api(make_service())
    start_slow(api, media_server, "partial", seed=2)
    # Past a heartbeat, so that a stale progress report would differ.
    time.sleep(1.5)
    api.post("/admin/vod/cancel", {"vod_id": "partial"})
    settle(api.service)
    size = partial_file(tmp_path, "partial").stat().st_size
    assert size > 0
    assert api.vod("partial")["bytes_done"] == size


def test_cancel_queued_vod_is_cancelled(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    api.add("waiting", UNUSED_URL.format("waiting"))
    response = api.post("/admin/vod/cancel", {"vod_id": "waiting"})
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert api.vod("waiting")["attempts"] == 0


def test_cancel_done_vod_conflicts(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service()
    api = Api(service)
    api.add("finished", media_server.add_file("finished.mp4", media(32 * KIB, 2)))
    wait_for_state(service, "finished", FINISHED)
    response = api.post("/admin/vod/cancel", {"vod_id": "finished"})
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/json"
    assert "done" in response.json()["error"]
    assert api.vod("finished")["state"] == "done"


def test_cancel_unknown_vod_not_found(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    response = api.post("/admin/vod/cancel", {"vod_id": "nobody"})
    assert response.status_code == 404
    assert "nobody" in response.json()["error"]


# -- reprocess -----------------------------------------------------------------


def test_reprocess_failed_vod_resets_attempts(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service()
    api = Api(service)
    url = media_server.url("/files/late.mp4")
    api.add("late", url)
    failed = wait_for_state(service, "late", FINISHED)
    assert failed.state is VodState.FAILED
    assert failed.attempts == 1
    data = media(64 * KIB, seed=3)
    media_server.add_file("late.mp4", data)
    response = api.post("/admin/vod/reprocess", {"vod_id": "late"})
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "queued"
    assert body["attempts"] == 0
    assert body["last_error"] is None
    assert body["error_class"] is None
    done = wait_for_state(service, "late", FINISHED)
    assert done.state is VodState.DONE
    assert done.file_path is not None
    assert Path(done.file_path).read_bytes() == data


def test_reprocess_cancelled_vod_resumes_partial(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    service = make_service()
    api = Api(service)
    url, data = start_slow(api, media_server, "resume", seed=4)
    api.post("/admin/vod/cancel", {"vod_id": "resume"})
    settle(service)
    partial_size = partial_file(tmp_path, "resume").stat().st_size
    assert 0 < partial_size < SLOW_SIZE
    media_server.set_rate(url, None)
    response = api.post("/admin/vod/reprocess", {"vod_id": "resume"})
    assert response.status_code == 200
    vod = wait_for_state(service, "resume", FINISHED)
    assert vod.state is VodState.DONE
    expected_range = f"bytes={partial_size}-"
    assert body_requests(media_server, url)[-1].range_header == expected_range
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == data


def test_reprocess_queued_vod_conflicts(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    api.add("fresh", UNUSED_URL.format("fresh"))
    response = api.post("/admin/vod/reprocess", {"vod_id": "fresh"})
    assert response.status_code == 409
    assert "queued" in response.json()["error"]


# -- pause and resume ----------------------------------------------------------


def test_pause_holds_queue_until_resume(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service()
    api = Api(service)
    paused = api.post("/admin/queue/pause")
    assert paused.status_code == 200
    assert paused.json() == {"status": "ok", "paused": True, "stopped": 0}
    url = media_server.add_file("held.mp4", media(32 * KIB, seed=5))
    api.add("held", url)
    time.sleep(2.0)
    assert api.vod("held")["state"] == "queued"
    assert gets(media_server, url) == []
    assert api.get("/status").json()["paused"] is True

    resumed = api.post("/admin/queue/resume")
    assert resumed.json() == {"status": "ok", "paused": False, "stopped": 0}
    assert wait_for_state(service, "held", FINISHED, timeout_s=10).state is (
        VodState.DONE
    )
    assert api.get("/status").json()["paused"] is False


def test_pause_lets_running_download_finish(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(MAX_CONCURRENT_DOWNLOADS="1")
    api = Api(service)
    data = media(300 * KIB, seed=6)
    url = media_server.add_file("busy.mp4", data, rate=300 * KIB)
    api.add("busy", url, priority=10)
    api.add("next", media_server.add_file("next.mp4", media(32 * KIB, seed=7)))
    wait_for_transfer(media_server, url)
    assert api.post("/admin/queue/pause").json()["stopped"] == 0
    vod = wait_for_state(service, "busy", FINISHED)
    assert vod.state is VodState.DONE
    assert vod.file_path is not None
    assert Path(vod.file_path).read_bytes() == data
    time.sleep(1.0)
    assert api.vod("next")["state"] == "queued"


def test_pause_stop_running_requeues_download(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    service = make_service()
    api = Api(service)
    url, data = start_slow(api, media_server, "halted", seed=8)
    called = time.monotonic()
    response = api.post("/admin/queue/pause", {"stop_running": True})
    ended = transfer_end(media_server, url)
    settle(service)
    assert response.json() == {"status": "ok", "paused": True, "stopped": 1}
    assert ended - called < STOP_WITHIN_S
    vod = api.vod("halted")
    assert vod["state"] == "queued"
    assert vod["attempts"] == 0
    partial_size = partial_file(tmp_path, "halted").stat().st_size
    assert partial_size > 0

    media_server.set_rate(url, None)
    api.post("/admin/queue/resume")
    done = wait_for_state(service, "halted", FINISHED)
    assert done.state is VodState.DONE
    assert done.attempts == 1
    expected_range = f"bytes={partial_size}-"
    assert body_requests(media_server, url)[-1].range_header == expected_range
    assert done.file_path is not None
    assert Path(done.file_path).read_bytes() == data


# -- batch priority ------------------------------------------------------------


def add_plain(api: Api, vod_id: str, **fields: Any) -> None:
    response = api.add(vod_id, UNUSED_URL.format(vod_id), **fields)
    assert response.status_code == 201, response.text


def priorities(api: Api, vod_ids: list[str]) -> dict[str, int]:
    return {vod_id: api.vod(vod_id)["priority"] for vod_id in vod_ids}


def test_batch_priority_by_ids_counts_matches(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    for vod_id in ("a", "b", "c"):
        add_plain(api, vod_id)
    response = api.post(
        "/admin/vods/priority", {"vod_ids": ["a", "c", "ghost"], "priority": 100}
    )
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "priority": 100, "updated": 2}
    assert priorities(api, ["a", "b", "c"]) == {"a": 100, "b": 0, "c": 100}


def test_batch_priority_by_date_range(
    db_dsn: str, make_service: ServiceFactory
) -> None:
    api = Api(make_service(run_worker=False, DB_DSN=db_dsn))
    dates = {
        "sep30": "2024-09-30T23:59:59+00:00",
        "oct01": "2024-10-01",
        "oct31": "2024-10-31T23:00:00Z",
        "nov01": "2024-11-01T00:00:00+00:00",
        # 01:00 UTC on 1 November, though it reads as 31 October.
        "east": "2024-10-31T20:00:00-05:00",
    }
    for vod_id, date in dates.items():
        add_plain(api, vod_id, date=date)
    add_plain(api, "undated")
    response = api.post(
        "/admin/vods/priority",
        {"date_from": "2024-10-01", "date_to": "2024-11-01", "priority": 50},
    )
    assert response.json()["updated"] == 2
    assert priorities(api, [*dates, "undated"]) == {
        "sep30": 0,
        "oct01": 50,
        "oct31": 50,
        "nov01": 0,
        "east": 0,
        "undated": 0,
    }


def test_batch_priority_by_channel_and_states(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    for vod_id, channel in (("x1", "alpha"), ("x2", "alpha"), ("y1", "beta")):
        add_plain(api, vod_id, channel=channel)
    api.post("/admin/vod/cancel", {"vod_id": "x2"})
    by_channel = api.post(
        "/admin/vods/priority", {"channel": "alpha", "priority": 7}
    ).json()
    both = api.post(
        "/admin/vods/priority",
        {"channel": "alpha", "states": ["queued"], "priority": 100},
    ).json()
    assert by_channel["updated"] == 2
    assert both["updated"] == 1
    assert priorities(api, ["x1", "x2", "y1"]) == {"x1": 100, "x2": 7, "y1": 0}


def test_batch_priority_without_selection_rejected(
    make_service: ServiceFactory,
) -> None:
    api = Api(make_service(run_worker=False))
    add_plain(api, "kept")
    response = api.post("/admin/vods/priority", {"priority": 100})
    assert response.status_code == 400
    assert "vod_ids" in response.json()["error"]
    assert api.vod("kept")["priority"] == 0


def test_batch_priority_empty_id_list_noop(
    make_service: ServiceFactory,
) -> None:
    api = Api(make_service(run_worker=False))
    add_plain(api, "kept")
    response = api.post("/admin/vods/priority", {"vod_ids": [], "priority": 100})
    assert response.status_code == 200
    assert response.json()["updated"] == 0
    assert api.vod("kept")["priority"] == 0


def test_batch_priority_over_id_limit_rejected(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    add_plain(api, "v0")
    vod_ids = [f"v{index}" for index in range(MAX_BATCH_IDS + 1)]
    response = api.post("/admin/vods/priority", {"vod_ids": vod_ids, "priority": 9})
    assert 400 <= response.status_code < 500
    assert "vod_ids" in response.json()["error"]
    assert api.vod("v0")["priority"] == 0


def test_batch_priority_at_id_limit_accepted(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    add_plain(api, "v0")
    vod_ids = [f"v{index}" for index in range(MAX_BATCH_IDS)]
    response = api.post("/admin/vods/priority", {"vod_ids": vod_ids, "priority": 9})
    assert response.status_code == 200
    assert response.json()["updated"] == 1


# -- delete --------------------------------------------------------------------


def test_delete_vod_removes_row(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    add_plain(api, "gone")
    response = api.delete("/admin/vod/gone")
    assert response.status_code == 200
    assert response.json()["vod_id"] == "gone"
    assert api.get("/vods/gone").status_code == 404
    assert api.delete("/admin/vod/gone").status_code == 404


def test_delete_with_files_removes_download(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(MAX_CONCURRENT_DOWNLOADS="2")
    api = Api(service)
    for vod_id in ("purge", "keep"):
        api.add(vod_id, media_server.add_file(f"{vod_id}.mp4", media(48 * KIB, 9)))
    files = {}
    for vod_id in ("purge", "keep"):
        vod = wait_for_state(service, vod_id, FINISHED)
        assert vod.file_path is not None
        files[vod_id] = Path(vod.file_path)
    purged = api.delete("/admin/vod/purge", delete_files="true")
    row_only = api.delete("/admin/vod/keep")
    assert purged.status_code == 200
    assert row_only.status_code == 200
    assert not files["purge"].exists()
    assert files["keep"].exists()


def test_delete_running_vod_stops_download(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service()
    api = Api(service)
    url, _ = start_slow(api, media_server, "doomed", seed=10)
    called = time.monotonic()
    response = api.delete("/admin/vod/doomed")
    ended = transfer_end(media_server, url)
    settle(service)
    assert response.status_code == 200
    assert ended - called < STOP_WITHIN_S
    assert api.get("/vods/doomed").status_code == 404


# -- skip upload ---------------------------------------------------------------


def test_skip_upload_shows_on_vod(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    add_plain(api, "clip")
    assert api.vod("clip")["skip_upload"] is False
    marked = api.post("/admin/vod/skip-upload", {"vod_id": "clip"})
    assert marked.status_code == 200
    assert api.vod("clip")["skip_upload"] is True
    api.post("/admin/vod/skip-upload", {"vod_id": "clip", "skip": False})
    assert api.vod("clip")["skip_upload"] is False


def test_skip_upload_unknown_vod_not_found(make_service: ServiceFactory) -> None:
    api = Api(make_service(run_worker=False))
    response = api.post("/admin/vod/skip-upload", {"vod_id": "nobody"})
    assert response.status_code == 404


# -- PostgreSQL ----------------------------------------------------------------


@pytest.mark.postgres
def test_cancel_running_on_postgres(
    postgres_dsn: str, make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(DB_DSN=postgres_dsn)
    api = Api(service)
    url, _ = start_slow(api, media_server, "pg-running", seed=11)
    called = time.monotonic()
    response = api.post("/admin/vod/cancel", {"vod_id": "pg-running"})
    ended = transfer_end(media_server, url)
    settle(service)
    assert response.json()["state"] == "cancelled"
    assert ended - called < STOP_WITHIN_S
    assert api.vod("pg-running")["attempts"] == 0


def test_delete_running_with_files_leaves_nothing(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    service = make_service()
    api = Api(service)
    start_slow(api, media_server, "wiped", seed=12)
    response = api.delete("/admin/vod/wiped", delete_files="true")
    settle(service)
    assert response.status_code == 200
    assert list((tmp_path / "data" / "partial").glob("wiped.*")) == []

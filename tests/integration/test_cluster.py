"""Several workers in one PostgreSQL database: limits, wake-ups, the registry."""

from __future__ import annotations

import random

import pytest

from conftest import ServiceFactory, wait_for, wait_for_state
from mediaserver import MediaServer
from vodq import scheduler
from vodq.models import VodState
from vodq.service import NewVod

pytestmark = pytest.mark.postgres

KIB = 1024
FINISHED = {VodState.DONE, VodState.FAILED}


def test_cluster_limit_holds_across_workers(
    make_service: ServiceFactory, media_server: MediaServer, postgres_dsn: str
) -> None:
    env = {"DB_DSN": postgres_dsn, "MAX_CONCURRENT_DOWNLOADS": "2"}
    api = make_service(run_worker=False, **env)
    workers = [make_service(WORKER_ID=f"w{index}", **env) for index in range(3)]
    for index in range(6):
        url = media_server.add_file(
            f"c{index}.mp4", random.randbytes(200 * KIB), rate=400 * KIB
        )
        api.add_vod(NewVod(vod_id=f"c{index}", url=url))
    for index in range(6):
        wait_for_state(api, f"c{index}", FINISHED, timeout_s=40)
    attempts = {api.queue.get(f"c{index}").attempts for index in range(6)}
    assert len(workers) == 3
    assert media_server.max_concurrent("/files/") == 2
    assert attempts == {1}


def test_notify_wakes_idle_worker(
    make_service: ServiceFactory,
    media_server: MediaServer,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With polling all but off, only a NOTIFY from the API process can wake
    # the worker in time.
    monkeypatch.setattr(scheduler, "POLL_INTERVAL_S", 60.0)
    worker = make_service(DB_DSN=postgres_dsn, WORKER_ID="idle")
    api = make_service(run_worker=False, DB_DSN=postgres_dsn)
    wait_for(lambda: worker.wakeups._thread is not None, timeout_s=5)
    url = media_server.add_file("wake.mp4", random.randbytes(32 * KIB))
    api.add_vod(NewVod(vod_id="wake", url=url))
    vod = wait_for_state(api, "wake", FINISHED, timeout_s=10)
    assert vod.state is VodState.DONE
    assert vod.lease_owner is None


def test_status_lists_workers_and_downloads(
    make_service: ServiceFactory, media_server: MediaServer, postgres_dsn: str
) -> None:
    env = {"DB_DSN": postgres_dsn, "MAX_CONCURRENT_DOWNLOADS": "2"}
    api = make_service(run_worker=False, **env)
    make_service(WORKER_ID="alpha", **env)
    make_service(WORKER_ID="beta", **env)
    for index in range(2):
        url = media_server.add_file(
            f"s{index}.mp4", random.randbytes(400 * KIB), rate=100 * KIB
        )
        api.add_vod(NewVod(vod_id=f"s{index}", url=url))
    wait_for(lambda: api.status()["active_downloads"] == 2, timeout_s=10)
    status = api.status()
    workers = {worker["worker_id"]: worker for worker in status["workers"]}
    held = sorted(vod for worker in workers.values() for vod in worker["downloads"])
    assert set(workers) == {"alpha", "beta"}
    assert all(worker["alive"] for worker in workers.values())
    assert held == ["s0", "s1"]


def test_stopped_worker_leaves_registry(
    make_service: ServiceFactory, postgres_dsn: str
) -> None:
    api = make_service(run_worker=False, DB_DSN=postgres_dsn)
    worker = make_service(DB_DSN=postgres_dsn, WORKER_ID="leaving")
    assert [w["worker_id"] for w in api.status()["workers"]] == ["leaving"]
    worker.stop()
    assert api.status()["workers"] == []


def test_per_worker_cap_limits_one_worker(
    make_service: ServiceFactory, media_server: MediaServer, postgres_dsn: str
) -> None:
    service = make_service(
        DB_DSN=postgres_dsn,
        MAX_CONCURRENT_DOWNLOADS="4",
        MAX_DOWNLOADS_PER_WORKER="1",
    )
    for index in range(3):
        url = media_server.add_file(
            f"p{index}.mp4", random.randbytes(100 * KIB), rate=400 * KIB
        )
        service.add_vod(NewVod(vod_id=f"p{index}", url=url))
    for index in range(3):
        wait_for_state(service, f"p{index}", FINISHED, timeout_s=30)
    assert media_server.max_concurrent("/files/") == 1

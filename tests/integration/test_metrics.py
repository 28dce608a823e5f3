"""Prometheus metrics: exact changes around real downloads, read from /metrics.

Every check reads the exposition over the real app and compares two scrapes,
so a test depends only on what happened between them. A metric with labels
that has no sample yet counts as 0.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from conftest import ServiceFactory, wait_for, wait_for_state
from mediaserver import Fault, MediaServer
from vodq.api.app import create_app
from vodq.models import VodState
from vodq.service import NewVod, Service

KIB = 1024
FINISHED = {VodState.DONE, VodState.FAILED}
LOOPBACK = ("127.0.0.1", 5000)
UNUSED_URL = "http://127.0.0.1:9/files/{}.mp4"

STARTED = "vod_downloads_started_total"
SUCCEEDED = "vod_downloads_succeeded_total"
FAILED = "vod_downloads_failed_total"
CANCELLED = "vod_downloads_cancelled_total"
RETRIES = "vod_download_retries_total"
BYTES = "vod_downloaded_bytes_total"
DURATION_COUNT = "vod_download_duration_seconds_count"
DURATION_SUM = "vod_download_duration_seconds_sum"
ACTIVE = "vod_active_downloads"
DEPTH = "vod_queue_depth"

Labels = tuple[tuple[str, str], ...]


def media(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Scrape:
    """One parsed /metrics response: family types by name, sample values by key."""

    def __init__(self, exposition: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(exposition):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def delta(self, before: Scrape, name: str, **labels: str) -> float:
        return self.value(name, **labels) - before.value(name, **labels)

    def delta_total(self, before: Scrape, name: str) -> float:
        return self.total(name) - before.total(name)


class Api:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.app = create_app(service, manage_lifecycle=False)

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, client=LOOPBACK)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", trust_env=False
            ) as client:
                return await client.request(method, path, json=body)

        return anyio.run(send)

    def scrape(self) -> Scrape:
        response = self.request("GET", "/metrics")
        assert response.status_code == 200
        return Scrape(response.text)

    def add(self, vod_id: str, url: str) -> None:
        self.service.add_vod(NewVod(vod_id=vod_id, url=url))

    def settle(self) -> None:
        """Wait until every download thread has ended and counted its attempt."""
        scheduler = self.service.scheduler
        assert scheduler is not None
        wait_for(lambda: not scheduler.running(), timeout_s=10)


@pytest.fixture
def worker(make_service: ServiceFactory) -> Iterator[Api]:
    yield Api(make_service(MAX_CONCURRENT_DOWNLOADS="2"))


def wait_for_transfer(server: MediaServer, url: str) -> None:
    wait_for(
        lambda: any(r.bytes_sent > 0 for r in server.requests_for(url)), timeout_s=10
    )


# -- one download at a time ----------------------------------------------------


def test_metrics_success_counts_one_attempt(
    worker: Api, media_server: MediaServer
) -> None:
    size = 200 * KIB
    url = media_server.add_file("ok.mp4", media(size, seed=1))
    before = worker.scrape()
    worker.add("ok", url)
    wait_for_state(worker.service, "ok", FINISHED)
    worker.settle()
    after = worker.scrape()
    assert after.delta(before, STARTED) == 1
    assert after.delta(before, SUCCEEDED) == 1
    assert after.delta_total(before, FAILED) == 0
    assert after.delta_total(before, CANCELLED) == 0
    assert after.delta(before, DURATION_COUNT) == 1
    assert after.delta(before, DURATION_SUM) > 0
    assert after.delta(before, BYTES) == size


def test_metrics_small_file_counts_its_bytes(
    worker: Api, media_server: MediaServer
) -> None:
    size = 32 * KIB
    url = media_server.add_file("tiny.mp4", media(size, seed=2))
    before = worker.scrape()
    worker.add("tiny", url)
    wait_for_state(worker.service, "tiny", FINISHED)
    worker.settle()
    assert worker.scrape().delta(before, BYTES) == size


def test_metrics_resumed_download_counts_new_bytes(
    worker: Api, media_server: MediaServer, tmp_path: Path
) -> None:
    data = media(300 * KIB, seed=3)
    url = media_server.add_file("resumed.mp4", data)
    partial = tmp_path / "data" / "partial"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "resumed.mp4.part").write_bytes(data[: 100 * KIB])
    before = worker.scrape()
    worker.add("resumed", url)
    vod = wait_for_state(worker.service, "resumed", FINISHED)
    worker.settle()
    assert vod.state is VodState.DONE
    # Only the fetched bytes count, because the first 100 KiB came from disk.
    assert worker.scrape().delta(before, BYTES) == 200 * KIB


def test_metrics_not_found_counts_gone(worker: Api, media_server: MediaServer) -> None:
    before = worker.scrape()
    worker.add("missing", media_server.url("/files/missing.mp4"))
    wait_for_state(worker.service, "missing", FINISHED)
    worker.settle()
    after = worker.scrape()
    assert after.delta(before, STARTED) == 1
    assert after.delta(before, FAILED, error_class="gone") == 1
    assert after.delta_total(before, FAILED) == 1
    assert after.delta(before, SUCCEEDED) == 0
    assert after.delta(before, RETRIES) == 0
    assert after.delta(before, DURATION_COUNT) == 0


def test_metrics_server_errors_count_retries(
    worker: Api, media_server: MediaServer
) -> None:
    url = media_server.add_file("flaky.mp4", media(64 * KIB, seed=4))
    media_server.script(url, [Fault.status(500), Fault.status(500)])
    before = worker.scrape()
    worker.add("flaky", url)
    vod = wait_for_state(worker.service, "flaky", FINISHED)
    worker.settle()
    after = worker.scrape()
    assert vod.state is VodState.DONE
    assert after.delta(before, STARTED) == 3
    assert after.delta(before, FAILED, error_class="transient") == 2
    assert after.delta_total(before, FAILED) == 2
    assert after.delta(before, SUCCEEDED) == 1
    assert after.delta(before, RETRIES) == 2
    assert after.delta(before, DURATION_COUNT) == 1


def test_metrics_cancel_counts_no_failure(
    worker: Api, media_server: MediaServer
) -> None:
    url = media_server.add_file("stop.mp4", media(600 * KIB, seed=5), rate=150 * KIB)
    before = worker.scrape()
    worker.add("stop", url)
    wait_for_transfer(media_server, url)
    worker.request("POST", "/admin/vod/cancel", {"vod_id": "stop"})
    worker.settle()
    after = worker.scrape()
    assert after.delta(before, CANCELLED, reason="cancel") == 1
    assert after.delta_total(before, CANCELLED) == 1
    assert after.delta(before, STARTED) == 1
    assert after.delta_total(before, FAILED) == 0
    assert after.delta(before, SUCCEEDED) == 0
    assert after.delta(before, DURATION_COUNT) == 0


# -- gauges --------------------------------------------------------------------


def test_metrics_active_downloads_follows_running(
    worker: Api, media_server: MediaServer
) -> None:
    urls = [
        media_server.add_file(
            f"par{i}.mp4", media(400 * KIB, seed=6 + i), rate=32 * KIB
        )
        for i in range(2)
    ]
    assert worker.scrape().value(ACTIVE) == 0
    for index, url in enumerate(urls):
        worker.add(f"par{index}", url)
    for url in urls:
        wait_for_transfer(media_server, url)
    assert worker.scrape().value(ACTIVE) == 2
    for url in urls:
        media_server.set_rate(url, None)
    for index in range(2):
        wait_for_state(worker.service, f"par{index}", FINISHED)
    worker.settle()
    assert worker.scrape().value(ACTIVE) == 0


def insert_sql(service: Service, vod_id: str) -> None:
    now = "2026-01-01 00:00:00+00:00"
    with service.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO vods (vod_id, source_url, priority, state, created_at, "
                "updated_at) VALUES (:vod_id, :url, 0, 'queued', :now, :now)"
            ),
            {"vod_id": vod_id, "url": UNUSED_URL.format(vod_id), "now": now},
        )


def update_sql(service: Service, vod_id: str, state: str) -> None:
    with service.engine.begin() as conn:
        conn.execute(
            text("UPDATE vods SET state = :state WHERE vod_id = :vod_id"),
            {"state": state, "vod_id": vod_id},
        )


def test_metrics_queue_depth_follows_sql(
    db_dsn: str, make_service: ServiceFactory
) -> None:
    api = Api(make_service(run_worker=False, DB_DSN=db_dsn))
    assert api.scrape().value(DEPTH) == 0
    for vod_id in ("q1", "q2"):
        api.add(vod_id, UNUSED_URL.format(vod_id))
    assert api.scrape().value(DEPTH) == 2
    insert_sql(api.service, "q3")
    assert api.scrape().value(DEPTH) == 3
    update_sql(api.service, "q1", "failed")
    after_update = api.scrape()
    assert after_update.value(DEPTH) == 2
    assert after_update.value("vod_queue_vods", state="failed") == 1
    api.request("POST", "/admin/vod/cancel", {"vod_id": "q2"})
    assert api.scrape().value(DEPTH) == 1


# -- names and the success rate ------------------------------------------------


def test_metrics_guide_names_exist_at_start(make_service: ServiceFactory) -> None:
    scrape = Api(make_service()).scrape()
    names = scrape.names()
    for name in (
        STARTED,
        SUCCEEDED,
        FAILED,
        DEPTH,
        ACTIVE,
        DURATION_SUM,
        DURATION_COUNT,
    ):
        assert name in names, name
    assert scrape.types["vod_download_duration_seconds"] == "histogram"
    assert scrape.types["vod_downloads_started"] == "counter"
    assert scrape.types[DEPTH] == "gauge"
    assert scrape.types[ACTIVE] == "gauge"


def test_metrics_started_equals_outcomes_mixed(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    api = Api(make_service(MAX_CONCURRENT_DOWNLOADS="3"))
    before = api.scrape()
    flaky = media_server.add_file("mix-flaky.mp4", media(64 * KIB, seed=8))
    media_server.script(flaky, [Fault.status(503)])
    slow = media_server.add_file("mix-slow.mp4", media(600 * KIB, 9), rate=150 * KIB)
    api.add("mix-slow", slow)
    api.add("mix-ok", media_server.add_file("mix-ok.mp4", media(64 * KIB, seed=10)))
    api.add("mix-gone", media_server.url("/files/mix-gone.mp4"))
    api.add("mix-flaky", flaky)
    wait_for_transfer(media_server, slow)
    api.request("POST", "/admin/vod/cancel", {"vod_id": "mix-slow"})
    for vod_id in ("mix-ok", "mix-gone", "mix-flaky"):
        wait_for_state(api.service, vod_id, FINISHED)
    api.settle()
    after = api.scrape()
    outcomes = (
        after.delta(before, SUCCEEDED)
        + after.delta_total(before, FAILED)
        + after.delta_total(before, CANCELLED)
    )
    assert after.delta(before, STARTED) == 5
    assert after.delta(before, STARTED) == outcomes
    assert after.delta(before, SUCCEEDED) / after.delta(before, STARTED) == 0.4


def test_metrics_lost_lease_keeps_outcome_count(
    worker: Api, media_server: MediaServer
) -> None:
    url = media_server.add_file("taken.mp4", media(600 * KIB, 12), rate=150 * KIB)
    before = worker.scrape()
    worker.add("taken", url)
    wait_for_transfer(media_server, url)
    # Another worker takes the VOD over. This worker detects the change at its
    # next heartbeat (and cancels), or when recording the finished file fails.
    with worker.service.engine.begin() as conn:
        conn.execute(
            text("UPDATE vods SET lease_owner = 'other' WHERE vod_id = 'taken'")
        )
    media_server.set_rate(url, None)
    worker.settle()
    after = worker.scrape()
    outcomes = (
        after.delta(before, SUCCEEDED)
        + after.delta_total(before, FAILED)
        + after.delta_total(before, CANCELLED)
    )
    assert after.delta(before, STARTED) == 1
    assert outcomes == 1
    assert after.delta(before, SUCCEEDED) == 0


@pytest.mark.postgres
def test_metrics_success_on_postgres(
    postgres_dsn: str, make_service: ServiceFactory, media_server: MediaServer
) -> None:
    api = Api(make_service(DB_DSN=postgres_dsn))
    size = 128 * KIB
    url = media_server.add_file("pg.mp4", media(size, seed=11))
    before = api.scrape()
    api.add("pg", url)
    wait_for_state(api.service, "pg", FINISHED)
    api.settle()
    after = api.scrape()
    assert after.delta(before, STARTED) == 1
    assert after.delta(before, SUCCEEDED) == 1
    assert after.delta(before, BYTES) == size
    assert after.value(DEPTH) == 0

"""The circuit breaker over the kv table, on SQLite and PostgreSQL, and end to end."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from test_queue_contract import Clock

from conftest import ServiceFactory, wait_for
from mediaserver import Fault, MediaServer
from vodq.breaker import BreakerPolicy
from vodq.db.engine import make_engine
from vodq.db.migrate import upgrade
from vodq.models import Vod
from vodq.queue import VodQueue
from vodq.service import NewVod

LEASE_S = 600.0
COOLDOWN_S = 60.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(db_dsn: str, clock: Clock) -> Iterator[VodQueue]:
    engine = make_engine(db_dsn)
    upgrade(engine)
    queue = VodQueue(
        engine,
        clock=clock,
        breaker_policy=BreakerPolicy(threshold=3, cooldown_s=COOLDOWN_S),
    )
    for index in range(10):
        queue.add(vod_id=f"v{index}", source_url=f"http://127.0.0.1:1/{index}.mp4")
    yield queue
    engine.dispose()


def claim(queue: VodQueue, wanted: int = 1) -> list[Vod]:
    return queue.claim("w1", wanted=wanted, limit=10, lease_s=LEASE_S)


def fail(queue: VodQueue, vod: Vod, error_class: str = "transient") -> None:
    queue.fail(vod.id, "w1", error="boom", error_class=error_class, retry_at=None)


def state(queue: VodQueue) -> dict[str, str]:
    return queue.get_kv(["circuit_state", "circuit_failures"])


def open_breaker(queue: VodQueue) -> None:
    for vod in claim(queue, wanted=3):
        fail(queue, vod)


def test_breaker_opens_after_threshold(queue: VodQueue) -> None:
    open_breaker(queue)
    assert state(queue) == {"circuit_state": "open", "circuit_failures": "3"}
    assert claim(queue, wanted=5) == []


def test_breaker_ignores_vod_specific_errors(queue: VodQueue) -> None:
    for vod in claim(queue, wanted=3):
        fail(queue, vod, error_class="gone")
    assert queue.get_kv(["circuit_state"]) == {}
    assert len(claim(queue, wanted=2)) == 2


def test_breaker_success_resets_count(queue: VodQueue) -> None:
    first, second, third = claim(queue, wanted=3)
    fail(queue, first)
    fail(queue, second)
    queue.finish(third.id, "w1", file_path="/x", size=1, download_ms=1)
    assert state(queue)["circuit_failures"] == "0"


def test_breaker_half_open_admits_one_trial(queue: VodQueue, clock: Clock) -> None:
    open_breaker(queue)
    clock.advance(COOLDOWN_S + 1)
    trial = claim(queue, wanted=5)
    assert len(trial) == 1
    assert state(queue)["circuit_state"] == "half-open"
    assert claim(queue, wanted=5) == []


def test_breaker_trial_success_closes(queue: VodQueue, clock: Clock) -> None:
    open_breaker(queue)
    clock.advance(COOLDOWN_S + 1)
    (trial,) = claim(queue, wanted=5)
    queue.finish(trial.id, "w1", file_path="/x", size=1, download_ms=1)
    assert state(queue) == {"circuit_state": "closed", "circuit_failures": "0"}
    assert len(claim(queue, wanted=3)) == 3


def test_breaker_trial_failure_reopens(queue: VodQueue, clock: Clock) -> None:
    open_breaker(queue)
    clock.advance(COOLDOWN_S + 1)
    (trial,) = claim(queue, wanted=5)
    fail(queue, trial)
    assert state(queue)["circuit_state"] == "open"
    assert claim(queue) == []
    clock.advance(COOLDOWN_S + 1)
    assert len(claim(queue, wanted=5)) == 1


def test_breaker_cancelled_trial_allows_new_trial(
    queue: VodQueue, clock: Clock
) -> None:
    open_breaker(queue)
    clock.advance(COOLDOWN_S + 1)
    (trial,) = claim(queue, wanted=5)
    queue.cancel(trial.vod_id)
    assert len(claim(queue, wanted=5)) == 1
    assert state(queue)["circuit_state"] == "half-open"


def test_breaker_sql_reset_reopens_queue(queue: VodQueue) -> None:
    open_breaker(queue)
    with queue.engine.begin() as conn:
        conn.execute(text("UPDATE kv SET value='closed' WHERE key='circuit_state'"))
        conn.execute(text("UPDATE kv SET value='0' WHERE key='circuit_failures'"))
        conn.execute(text("DELETE FROM kv WHERE key='circuit_open_until'"))
    assert len(claim(queue, wanted=3)) == 3


def test_breaker_stops_requests_end_to_end(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    service = make_service(
        CIRCUIT_FAILURE_THRESHOLD="2",
        CIRCUIT_OPEN_COOLDOWN="1h",
        DOWNLOAD_MAX_ATTEMPTS="1",
    )
    urls = []
    for index in range(5):
        url = media_server.add_file(f"down{index}.mp4", random.randbytes(4096))
        media_server.script(url, [Fault.status(503)] * 5)
        urls.append(url)
        service.add_vod(NewVod(vod_id=f"down{index}", url=url))
    wait_for(lambda: service.status()["circuit_state"] == "open", timeout_s=15)
    seen = len(media_server.requests)
    time.sleep(2.5)
    status = service.status()
    assert status["circuit_failures"] >= 2
    assert status["circuit_open_until"] is not None
    assert len(media_server.requests) == seen
    assert seen <= 3

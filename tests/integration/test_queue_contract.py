"""The storage contract of VodQueue, run on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from vodq.db.engine import make_engine
from vodq.db.migrate import upgrade
from vodq.errors import InvalidTransition, VodNotFound
from vodq.models import Progress, VodState
from vodq.queue import STALE_LEASE_S, VodQueue

LEASE_S = 30.0


class Clock:
    """A settable clock, so lease and retry times are exact."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(db_dsn: str, clock: Clock) -> Iterator[VodQueue]:
    engine = make_engine(db_dsn)
    upgrade(engine)
    yield VodQueue(engine, clock=clock)
    engine.dispose()


def add(
    queue: VodQueue, vod_id: str, priority: int = 0, date: str | None = None
) -> None:
    parsed = datetime.fromisoformat(date).replace(tzinfo=UTC) if date else None
    queue.add(
        vod_id=vod_id,
        source_url=f"http://127.0.0.1:1/{vod_id}.mp4",
        priority=priority,
        date=parsed,
    )


def claim_ids(
    queue: VodQueue, owner: str = "w1", wanted: int = 10, limit: int = 10
) -> list[str]:
    return [
        vod.vod_id
        for vod in queue.claim(owner, wanted=wanted, limit=limit, lease_s=LEASE_S)
    ]


def test_add_new_vod_is_queued(queue: VodQueue) -> None:
    vod, created = queue.add(vod_id="1", source_url="http://127.0.0.1:1/a.mp4")
    assert created
    assert vod.state is VodState.QUEUED
    assert vod.priority == 0
    assert vod.processed is False


def test_add_existing_vod_changes_nothing(queue: VodQueue) -> None:
    queue.add(
        vod_id="1", source_url="http://127.0.0.1:1/a.mp4", priority=5, title="first"
    )
    vod, created = queue.add(
        vod_id="1", source_url="http://127.0.0.1:1/b.mp4", priority=9, title="second"
    )
    assert not created
    assert vod.title == "first"
    assert vod.priority == 5
    assert vod.source_url == "http://127.0.0.1:1/a.mp4"


def test_claim_order_priority_then_oldest_date(queue: VodQueue) -> None:
    add(queue, "low", priority=-10, date="2024-01-01")
    add(queue, "new", priority=0, date="2024-03-01")
    add(queue, "undated", priority=0)
    add(queue, "old", priority=0, date="2024-02-01")
    add(queue, "high", priority=100, date="2024-05-01")
    assert claim_ids(queue) == ["high", "old", "new", "undated", "low"]


def test_claim_respects_limit_across_owners(queue: VodQueue) -> None:
    for index in range(5):
        add(queue, f"v{index}")
    first = claim_ids(queue, "w1", wanted=2, limit=3)
    second = claim_ids(queue, "w2", wanted=2, limit=3)
    third = claim_ids(queue, "w3", wanted=2, limit=3)
    assert len(first) == 2
    assert len(second) == 1
    assert third == []


def test_claim_under_lowered_limit_claims_nothing(queue: VodQueue) -> None:
    for index in range(4):
        add(queue, f"v{index}")
    claim_ids(queue, "w1", wanted=3, limit=3)
    assert claim_ids(queue, "w2", wanted=1, limit=1) == []


def test_claim_never_returns_claimed_vod(queue: VodQueue) -> None:
    add(queue, "a")
    add(queue, "b")
    first = claim_ids(queue, "w1", wanted=1)
    second = claim_ids(queue, "w2", wanted=5)
    assert set(first).isdisjoint(second)
    assert sorted(first + second) == ["a", "b"]


def test_claim_skips_vod_waiting_for_retry(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a", priority=10)
    add(queue, "b")
    (vod,) = queue.claim("w1", wanted=1, limit=5, lease_s=LEASE_S)
    queue.fail(
        vod.id,
        "w1",
        error="boom",
        error_class="transient",
        retry_at=clock.now + timedelta(seconds=20),
    )
    assert claim_ids(queue) == ["b"]
    clock.advance(21)
    assert claim_ids(queue, "w2") == ["a"]


def test_expired_lease_is_reclaimed(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    claim_ids(queue, "dead-worker")
    clock.advance(LEASE_S + 1)
    assert claim_ids(queue, "w2") == ["a"]
    assert queue.get("a").lease_owner == "w2"


def test_expired_lease_frees_its_slot(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    add(queue, "b")
    claim_ids(queue, "dead-worker", wanted=1, limit=1)
    assert claim_ids(queue, "w2", wanted=1, limit=1) == []
    clock.advance(LEASE_S + 1)
    assert len(claim_ids(queue, "w2", wanted=1, limit=1)) == 1


def test_renew_extends_lease_and_records_progress(
    queue: VodQueue, clock: Clock
) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    clock.advance(20)
    held = queue.renew("w1", {vod.id: Progress(500, 1000, 250)}, lease_s=LEASE_S)
    clock.advance(20)
    stored = queue.get("a")
    assert held == {vod.id}
    assert stored.bytes_done == 500
    assert stored.bytes_total == 1000
    assert stored.speed_bps == 250
    assert claim_ids(queue, "w2") == []


def test_active_demands_lists_renewed_demands(queue: VodQueue) -> None:
    add(queue, "slow")
    add(queue, "fast")
    slow, fast = queue.claim("w1", wanted=2, limit=2, lease_s=LEASE_S)
    queue.renew(
        "w1",
        {slow.id: Progress(1, None, None), fast.id: Progress(1, None, None)},
        lease_s=LEASE_S,
        demands={slow.id: 20_480.5, fast.id: None},
    )
    assert queue.active_demands() == {slow.id: 20_480.0, fast.id: None}


def test_active_demands_skips_expired_lease(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    queue.renew(
        "w1", {vod.id: Progress(1, None, None)}, lease_s=LEASE_S, demands={vod.id: 5.0}
    )
    clock.advance(LEASE_S + 1)
    assert queue.active_demands() == {}


def test_active_demands_skips_unrenewed_download(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    assert claim_ids(queue, "w1", wanted=1) == ["a"]
    # Its worker stopped renewing; the lease still runs for most of LEASE_S.
    clock.advance(STALE_LEASE_S + 1)
    assert queue.active_demands() == {}


def test_claim_clears_earlier_demand(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    queue.renew(
        "w1", {vod.id: Progress(1, None, None)}, lease_s=LEASE_S, demands={vod.id: 5.0}
    )
    clock.advance(LEASE_S + 1)
    claim_ids(queue, "w2")
    assert queue.active_demands() == {vod.id: None}


def test_publish_demands_seen_before_renewal(queue: VodQueue) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    queue.renew("w1", {vod.id: Progress(1, None, None)}, lease_s=LEASE_S)
    queue.publish_demands("w1", {vod.id: 30_000.0})
    assert queue.active_demands() == {vod.id: 30_000.0}


def test_publish_demands_by_other_owner_changes_nothing(queue: VodQueue) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    queue.renew(
        "w1", {vod.id: Progress(1, None, None)}, lease_s=LEASE_S, demands={vod.id: 5.0}
    )
    queue.publish_demands("w2", {vod.id: None})
    assert queue.active_demands() == {vod.id: 5.0}


def test_renew_by_other_owner_holds_nothing(queue: VodQueue) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    assert (
        queue.renew("w2", {vod.id: Progress(1, None, None)}, lease_s=LEASE_S) == set()
    )


def test_finish_hands_vod_to_upload_stage(queue: VodQueue) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    assert queue.finish(vod.id, "w1", file_path="/x/a.mp4", size=10, download_ms=1500)
    stored = queue.get("a")
    assert stored.state is VodState.DOWNLOADED
    assert stored.processed is False
    assert stored.file_path == "/x/a.mp4"
    assert stored.attempts == 1
    assert stored.lease_owner is None


def test_finish_takes_path_from_older_record(queue: VodQueue) -> None:
    for vod_id in ("a", "b"):
        add(queue, vod_id)
        (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
        # Both downloads end at one path: a's file was moved away meanwhile.
        queue.finish(vod.id, "w1", file_path="/x/X.mp4", size=1, download_ms=1)
    assert queue.get("a").file_path is None
    assert queue.get("b").file_path == "/x/X.mp4"


def test_finish_by_former_owner_is_rejected(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    clock.advance(LEASE_S + 1)
    claim_ids(queue, "w2")
    assert not queue.finish(vod.id, "w1", file_path="/x", size=1, download_ms=1)
    assert queue.get("a").lease_owner == "w2"


def test_finish_keeps_running_average(queue: VodQueue) -> None:
    for vod_id, duration_ms in (("a", 1000), ("b", 3000)):
        add(queue, vod_id)
        (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
        queue.finish(vod.id, "w1", file_path="/x", size=1, download_ms=duration_ms)
    assert queue.get_kv(["avg_download_ms"]) == {"avg_download_ms": "2000"}


def test_fail_without_retry_is_failed(queue: VodQueue) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    state = queue.fail(
        vod.id, "w1", error="HTTP Error 404", error_class="gone", retry_at=None
    )
    stored = queue.get("a")
    assert state is VodState.FAILED
    assert stored.state is VodState.FAILED
    assert stored.last_error == "HTTP Error 404"
    assert stored.error_class == "gone"
    assert stored.attempts == 1


def test_release_counts_no_attempt(queue: VodQueue) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    assert queue.release(vod.id, "w1", state=VodState.CANCELLED)
    stored = queue.get("a")
    assert stored.state is VodState.CANCELLED
    assert stored.attempts == 0


def test_set_priority_keeps_retry_clock(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    retry_at = clock.now + timedelta(seconds=600)
    queue.fail(vod.id, "w1", error="e", error_class="error", retry_at=retry_at)
    bumped = queue.set_priority("a", 1000)
    assert bumped.priority == 1000
    assert bumped.next_attempt_at == retry_at
    assert bumped.attempts == 1
    assert claim_ids(queue) == []


def test_set_priority_unknown_vod_raises(queue: VodQueue) -> None:
    with pytest.raises(VodNotFound):
        queue.set_priority("missing", 1)


@pytest.mark.parametrize("priority", [2**63 - 1, -(2**63)], ids=["max", "min"])
def test_priority_stores_64_bit_extremes(queue: VodQueue, priority: int) -> None:
    add(queue, "a", priority=priority)
    assert queue.get("a").priority == priority


def test_requeue_failed_resets_attempts(queue: VodQueue) -> None:
    add(queue, "a")
    (vod,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    queue.fail(vod.id, "w1", error="e", error_class="gone", retry_at=None)
    requeued = queue.requeue("a")
    assert requeued.state is VodState.QUEUED
    assert requeued.attempts == 0
    assert requeued.last_error is None


def test_requeue_queued_vod_raises(queue: VodQueue) -> None:
    add(queue, "a")
    with pytest.raises(InvalidTransition):
        queue.requeue("a")


def test_counts_by_priority_highest_first(queue: VodQueue) -> None:
    for vod_id, priority in (("a", 0), ("b", 100), ("c", 0), ("d", -10), ("e", 100)):
        add(queue, vod_id, priority=priority)
    claim_ids(queue, wanted=1)
    counts = queue.counts()
    assert counts.by_priority == [(100, 1), (0, 2), (-10, 1)]
    assert counts.by_state == {"queued": 4, "downloading": 1}
    assert counts.active == 1


def test_operator_sql_priority_update_changes_order(queue: VodQueue) -> None:
    add(queue, "sept", date="2024-09-15")
    add(queue, "oct", date="2024-10-15")
    add(queue, "nov", date="2024-11-15")
    with queue.engine.begin() as conn:
        changed = conn.execute(
            text(
                "UPDATE vods SET priority = 50 WHERE date >= '2024-10-01' "
                "AND date < '2024-11-01' AND processed = false"
            )
        )
    assert changed.rowcount == 1
    assert claim_ids(queue) == ["oct", "sept", "nov"]


def test_operator_sql_cannot_desync_processed(queue: VodQueue) -> None:
    add(queue, "a")
    with pytest.raises(DBAPIError), queue.engine.begin() as conn:
        conn.execute(text("UPDATE vods SET processed = true WHERE vod_id = 'a'"))
    with queue.engine.begin() as conn:
        conn.execute(text("UPDATE vods SET state = 'done' WHERE vod_id = 'a'"))
    assert queue.get("a").processed is True


def test_operator_sql_breaker_reset_runs(queue: VodQueue) -> None:
    queue.set_kv(
        {"circuit_state": "open", "circuit_failures": "7", "circuit_open_until": "x"}
    )
    with queue.engine.begin() as conn:
        conn.execute(text("UPDATE kv SET value='closed' WHERE key='circuit_state'"))
        conn.execute(text("UPDATE kv SET value='0' WHERE key='circuit_failures'"))
        conn.execute(text("DELETE FROM kv WHERE key='circuit_open_until'"))
    stored = queue.get_kv(["circuit_state", "circuit_failures", "circuit_open_until"])
    assert stored == {"circuit_state": "closed", "circuit_failures": "0"}


def test_list_vods_pages_in_insertion_order(queue: VodQueue) -> None:
    for index in range(5):
        add(queue, f"v{index}")
    first = queue.list_vods(limit=2)
    second = queue.list_vods(limit=2, after_id=first[-1].id)
    assert [vod.vod_id for vod in first] == ["v0", "v1"]
    assert [vod.vod_id for vod in second] == ["v2", "v3"]


def test_list_vods_filters_by_state(queue: VodQueue) -> None:
    add(queue, "a")
    add(queue, "b")
    claim_ids(queue, wanted=1)
    running = queue.list_vods(state=VodState.DOWNLOADING)
    assert [vod.vod_id for vod in running] == ["a"]


def test_times_are_utc_aware(queue: VodQueue) -> None:
    add(queue, "a", date="2024-10-15T18:30:00")
    vod = queue.get("a")
    assert vod.date == datetime(2024, 10, 15, 18, 30, tzinfo=UTC)
    assert vod.created_at.tzinfo is not None


def test_migrations_are_idempotent(queue: VodQueue) -> None:
    upgrade(queue.engine)
    add(queue, "a")
    assert queue.get("a").vod_id == "a"


def true_counts(queue: VodQueue) -> dict[str, int]:
    with queue.engine.connect() as conn:
        rows = conn.execute(text("SELECT state, COUNT(*) FROM vods GROUP BY state"))
        return {str(state): int(count) for state, count in rows}


def test_counts_follow_operator_sql(queue: VodQueue) -> None:
    for index in range(6):
        add(queue, f"v{index}", priority=index % 3)
    with queue.engine.begin() as conn:
        conn.execute(
            text("UPDATE vods SET state = 'failed' WHERE vod_id IN ('v0', 'v1')")
        )
        conn.execute(text("UPDATE vods SET priority = 7 WHERE vod_id = 'v2'"))
        conn.execute(text("DELETE FROM vods WHERE vod_id = 'v3'"))
        conn.execute(
            text(
                "INSERT INTO vods (vod_id, source_url, priority, state, created_at, "
                "updated_at) VALUES ('sql', 'http://127.0.0.1:1/x', 7, 'queued', "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
    counts = queue.counts()
    assert counts.by_state == true_counts(queue)
    assert counts.by_priority == [(7, 2), (2, 1), (1, 1)]


def test_counts_follow_queue_operations(queue: VodQueue, clock: Clock) -> None:
    for index in range(8):
        add(queue, f"v{index}", priority=index)
    claimed = queue.claim("w1", wanted=4, limit=10, lease_s=LEASE_S)
    queue.finish(claimed[0].id, "w1", file_path="/x", size=1, download_ms=1)
    queue.fail(claimed[1].id, "w1", error="e", error_class="gone", retry_at=None)
    queue.release(claimed[2].id, "w1", state=VodState.QUEUED)
    queue.set_priorities(100, vod_ids=["v0", "v1"])
    queue.delete("v0")
    clock.advance(LEASE_S + 1)
    queue.claim("w2", wanted=0, limit=10, lease_s=LEASE_S)
    assert queue.counts().by_state == true_counts(queue)


def test_stale_claim_cannot_release_newer_claim(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    (first,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    queue.cancel("a")
    queue.requeue("a")
    clock.advance(1)
    (second,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    released = queue.release(
        first.id, "w1", state=VodState.CANCELLED, started_at=first.started_at
    )
    assert not released
    assert queue.get("a").state is VodState.DOWNLOADING
    assert queue.renew(
        "w1",
        {first.id: Progress(1, None, None)},
        lease_s=LEASE_S,
        started={first.id: second.started_at},
    ) == {first.id}


def test_stale_claim_cannot_finish_newer_claim(queue: VodQueue, clock: Clock) -> None:
    add(queue, "a")
    (first,) = queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    queue.cancel("a")
    queue.requeue("a")
    clock.advance(1)
    queue.claim("w1", wanted=1, limit=1, lease_s=LEASE_S)
    finished = queue.finish(
        first.id,
        "w1",
        file_path="/x",
        size=1,
        download_ms=1,
        started_at=first.started_at,
    )
    assert not finished


def test_claim_limit_ignores_upload_stage(queue: VodQueue, clock: Clock) -> None:
    for vod_id in ("up", "done-down", "a"):
        add(queue, vod_id)
    lease_until = (clock.now + timedelta(seconds=LEASE_S)).isoformat()
    with queue.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE vods SET state = 'uploading', lease_owner = 'uploader', "
                "lease_expires_at = :until WHERE vod_id = 'up'"
            ),
            {"until": lease_until},
        )
        conn.execute(
            text("UPDATE vods SET state = 'downloaded' WHERE vod_id = 'done-down'")
        )
    assert claim_ids(queue, wanted=1, limit=1) == ["a"]


def test_claim_leaves_expired_upload_lease(queue: VodQueue, clock: Clock) -> None:
    add(queue, "up")
    with queue.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE vods SET state = 'uploading', lease_owner = 'uploader', "
                "lease_expires_at = NULL WHERE vod_id = 'up'"
            )
        )
    claim_ids(queue)
    assert queue.get("up").state is VodState.UPLOADING


def test_expired_lease_release_keeps_limit(queue: VodQueue, clock: Clock) -> None:
    for vod_id in ("a", "b", "c"):
        add(queue, vod_id)
    claim_ids(queue, "dead-worker", wanted=2, limit=2)
    clock.advance(LEASE_S + 1)
    claimed = claim_ids(queue, "w2", wanted=3, limit=2)
    assert claimed == ["a", "b"]
    assert queue.count_active() == 2


def test_release_expired_queues_only_expired(queue: VodQueue, clock: Clock) -> None:
    add(queue, "gone")
    add(queue, "live")
    claim_ids(queue, "dead-worker", wanted=1)
    clock.advance(LEASE_S / 2)
    claim_ids(queue, "w2", wanted=1)
    clock.advance(LEASE_S / 2 + 1)
    queue.release_expired()
    assert queue.get("gone").state is VodState.QUEUED
    assert queue.get("gone").lease_owner is None
    assert queue.get("live").state is VodState.DOWNLOADING


def test_requeue_excess_per_worker(queue: VodQueue) -> None:
    for vod_id in ("a1", "a2", "b1"):
        add(queue, vod_id)
    queue.claim("wa", wanted=2, limit=3, lease_s=LEASE_S)
    queue.claim("wb", wanted=1, limit=3, lease_s=LEASE_S)
    assert queue.requeue_excess(3, per_worker=1) == 1
    assert queue.get("a1").state is VodState.DOWNLOADING
    assert queue.get("a2").state is VodState.QUEUED
    assert queue.get("b1").state is VodState.DOWNLOADING


def test_requeue_excess_keeps_highest_priority(queue: VodQueue) -> None:
    add(queue, "low", priority=1)
    add(queue, "high", priority=5)
    queue.claim("w1", wanted=2, limit=2, lease_s=LEASE_S)
    assert queue.requeue_excess(1) == 1
    assert queue.get("high").state is VodState.DOWNLOADING
    assert queue.get("low").state is VodState.QUEUED


def test_claim_while_paused_returns_nothing(queue: VodQueue) -> None:
    add(queue, "a")
    queue.set_paused(True)
    assert claim_ids(queue) == []
    queue.set_paused(False)
    assert claim_ids(queue) == ["a"]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        pytest.param("Closed ", 2, id="closed-with-case-and-space"),
        pytest.param("garbage", 2, id="unknown-reads-closed"),
        pytest.param("OPEN", 0, id="open-with-case"),
    ],
)
def test_claim_reads_operator_breaker_state(
    queue: VodQueue, clock: Clock, stored: str, expected: int
) -> None:
    add(queue, "a")
    add(queue, "b")
    until = (clock.now + timedelta(seconds=60)).isoformat()
    queue.set_kv({"circuit_state": stored, "circuit_open_until": until})
    assert len(claim_ids(queue)) == expected


def test_concurrent_claims_keep_limit(queue: VodQueue) -> None:
    for index in range(20):
        add(queue, f"v{index}")
    claimed = run_concurrent_claims(queue, workers=6, wanted=3, limit=5)
    assert len(claimed) == 5
    assert len(set(claimed)) == 5


def test_concurrent_claims_admit_one_trial(queue: VodQueue, clock: Clock) -> None:
    for index in range(10):
        add(queue, f"v{index}")
    until = (clock.now - timedelta(seconds=1)).isoformat()
    queue.set_kv({"circuit_state": "open", "circuit_open_until": until})
    claimed = run_concurrent_claims(queue, workers=6, wanted=3, limit=10)
    assert len(claimed) == 1
    assert queue.get_kv(["circuit_state"]) == {"circuit_state": "half-open"}


def run_concurrent_claims(
    queue: VodQueue, *, workers: int, wanted: int, limit: int
) -> list[str]:
    """Claim from ``workers`` threads released together; return every VOD id."""
    barrier = threading.Barrier(workers, timeout=10)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def worker(owner: str) -> None:
        try:
            barrier.wait()
            results.append(claim_ids(queue, owner, wanted=wanted, limit=limit))
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(f"w{index}",)) for index in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    return [vod_id for claimed in results for vod_id in claimed]


def test_skip_upload_refused_while_uploading(queue: VodQueue) -> None:
    add(queue, "a")
    with queue.engine.begin() as conn:
        conn.execute(text("UPDATE vods SET state = 'uploading' WHERE vod_id = 'a'"))

    with pytest.raises(InvalidTransition):
        queue.set_skip_upload("a", True)

    assert queue.get("a").skip_upload is False
